"""`make reliability`: run every test marked `fault` (the faults and bad inputs of the README's reliability
section), collect what each observed, and regenerate that section's tables in README.md.

    .venv/bin/python scripts/reliability.py [--no-run] [pytest args...]

--no-run rebuilds the tables from the last run's var/reliability/observed.jsonl.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "var" / "reliability"
START, END = "<!-- reliability:start (make reliability writes this part) -->", "<!-- reliability:end -->"
KINDS = {"fault": "Faults", "bad_input": "Bad input", "security": "Security"}


def run_tests(observed: Path, pytest_args: list[str]) -> int:
    observed.unlink(missing_ok=True)
    env = {**os.environ, "SPARKVISION_FAULT_REPORT": str(observed)}
    return subprocess.call([sys.executable, "-m", "pytest", "-m", "fault", "-p", "no:cacheprovider", *pytest_args],
                           cwd=ROOT, env=env)


def cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def tables(rows: list[dict]) -> str:
    """One markdown table per kind: the fault, what its test observed, the test, pass or fail."""
    parts = []
    for kind, title in KINDS.items():
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        parts += [f"**{title}**", "", "| case | what the test checks and observed | test | result |", "|---|---|---|---|"]
        for r in sorted(mine, key=lambda r: r["test"]):
            seen = "; ".join([r["shows"], *(f"{k} {v}" for k, v in r["observed"].items())]).strip("; ")
            test = r["test"].split("::", 1)
            parts.append(f"| {cell(r['fault'])} | {cell(seen)} | `{test[0]}` `{cell(test[-1])}` | "
                         f"{'pass' if r['passed'] else '**FAIL**'} ({r['seconds']:.0f}s) |")
        parts.append("")
    return "\n".join(parts)


def update_readme(text: str) -> None:
    readme = ROOT / "README.md"
    current = readme.read_text()
    if START not in current or END not in current:
        raise SystemExit(f"README.md has no {START} ... {END} section to update")
    head, rest = current.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: list[str]) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    observed = OUT / "observed.jsonl"
    code = 0 if "--no-run" in argv else run_tests(observed, [a for a in argv if a != "--no-run"])
    rows = [json.loads(line) for line in observed.read_text().splitlines()] if observed.exists() else []
    if not rows:
        print("no fault test reported a row", file=sys.stderr)
        return code or 1
    text = tables(rows)
    (OUT / "report.md").write_text(text + "\n")
    update_readme(text)
    failed = sum(not r["passed"] for r in rows)
    print(f"[reliability] {len(rows)} rows, {failed} failed: README.md and {OUT / 'report.md'} updated", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
