"""Ingest: sources (idx, folder, table) -> validate -> dedupe/split/balance -> publish."""
