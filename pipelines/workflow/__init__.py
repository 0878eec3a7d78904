"""Workflows: Databricks-format multi-task jobs run locally as spark-submit processes, scheduled, or deployed."""
