"""`make benchmarks` (`QUICK=1`: the short version): every benchmark script in turn, one report.

    .venv/bin/python scripts/benchmarks.py [--quick] [--only NAME ...] [--readme] [--no-run]

Each script measures its pipeline figure and its in-memory baseline side by side and writes report rows
(benchmarks/common.py: record). This collects them into var/benchmarks/report.json (a list of rows: name, baseline,
pipeline, ratio, goal, met, machine) and report.md, logs them to MLflow as a run of the `sparkvision-benchmarks`
experiment with a plot of each scaling curve, and with --readme puts the table into README.md's benchmark section
under this machine's CPU kind, keeping the other kinds' tables. --no-run rebuilds the report from the last rows.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "var" / "benchmarks"
START, END = "<!-- benchmarks:start (scripts/benchmarks.py --readme writes this part) -->", "<!-- benchmarks:end -->"
# script: (the full run's arguments, the quick run's)
PLAN: dict[str, tuple[list[str], list[str]]] = {
    "ingest_folder.py": ([], ["--images", "300", "--scale", "300", "600", "1200", "--scale-width", "160",
                             "--skip-idx"]),
    "inference.py": ([], ["--rows", "5000", "--scale", "2000", "8000", "32000"]),
    "train_throughput.py": ([], ["--model", "lenet5", "--epochs", "2", "--batch-size", "256"]),
    "storage_feed.py": ([], ["--images", "120", "--sizes", "64", "--seconds", "1", "--train-steps", "2"]),
    "streaming.py": ([], ["--files", "60", "--rate", "30"]),
    "tune_parallelism.py": ([], ["--trials", "2", "--epochs", "1", "--rows", "1000"]),
    "time_to_accuracy.py": ([], ["--profiles", "default", "--targets", "0.70,0.80", "--set", "train.model=lenet5",
                                 "--set", "train.epochs=2"]),
}


def machine() -> dict:
    """What the figures depend on: the CPU model, cores, AMX / AVX-512 flags, the training precision `auto` picks."""
    sys.path.insert(0, str(ROOT))
    from pipelines.train.devices import cpu_flags, precision_policy

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    flags = cpu_flags()
    amx = "amx_bf16" in flags
    return {"cpu": model, "cores": os.cpu_count(), "amx": amx, "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "precision": precision_policy("auto", False, amx)}


def cpu_kind(m: dict) -> str:
    extras = [f for f, on in (("AMX", m["amx"]), ("AVX-512", m["avx512"]), ("AVX-512 bf16", m["avx512_bf16"])) if on]
    return f"{m['cpu']}, {m['cores']} cores, {' + '.join(extras) or 'no AVX-512'}, training in {m['precision']}"


def run_scripts(rows_file: Path, quick: bool, only: list[str], today: str) -> list[str]:
    """Run each planned script (quick or full arguments); the names of those that failed. The rows of scripts not
    run this time stay, and so do all of the other kind's (quick or full: a report shows one kind), so `--only`
    updates a report piece by piece and a quick check never wipes a full run; each row keeps the date it was
    measured."""
    planned = [s for s in PLAN if not only or s.removesuffix(".py") in only]
    kept = [r for r in read_rows(rows_file) if r["script"] not in planned or r.get("quick") != quick]
    write_rows(rows_file, kept)
    env = {**os.environ, "SPARKVISION_BENCH_ROWS": str(rows_file)}
    failed = []
    for script in planned:
        args = PLAN[script][1] if quick else PLAN[script][0]
        print(f"[benchmarks] {script} {' '.join(args)}".rstrip(), file=sys.stderr, flush=True)
        if subprocess.call([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env):
            failed.append(script)
            print(f"[benchmarks] {script} FAILED", file=sys.stderr, flush=True)
    write_rows(rows_file, [{"measured": today, "quick": quick, **r} for r in read_rows(rows_file)])
    return failed


def read_rows(rows_file: Path) -> list[dict]:
    return [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []


def write_rows(rows_file: Path, rows: list[dict]) -> None:
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))


def figure(stats: dict | None) -> str:
    if not stats:
        return ""
    fmt = (lambda v: f"{v:,.0f}") if abs(stats["median"]) >= 100 else (lambda v: f"{v:.3g}")
    if stats["n"] == 1:
        return fmt(stats["median"])
    return f"{fmt(stats['min'])} / **{fmt(stats['median'])}** / {fmt(stats['max'])}"


def markdown(rows: list[dict], m: dict, quick: bool) -> str:
    """The report's table: each row's baseline and pipeline (min / median / max), ratio, goal and verdict."""
    dates = sorted({r["measured"] for r in rows})
    when = "; ".join(f"{d} by " + ", ".join(sorted({f"`{r['script']}`" for r in rows if r["measured"] == d}))
                     for d in dates)
    lines = [f"Measured on {cpu_kind(m)}{' (quick run)' if quick else ''}: {when}.",
             "Figures are min / **median** / max of the repetitions; the ratio is of the medians, above 1 in the "
             "pipeline's favour.", "",
             "| benchmark | baseline | pipeline | unit | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x ({r['ratio_of']})"
        goal = "" if r["goal"] is None else f"{r['goal']:.2f}x"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['name']}{note} | {figure(r['baseline'])} | {figure(r['pipeline'])} | {r['unit']} | "
                     f"{ratio} | {goal} | {met} |")
    return "\n".join(lines) + "\n"


def metric_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. /]", "", name.replace(",", "").replace("->", "to"))[:240].strip()


def log_to_mlflow(rows: list[dict], m: dict, quick: bool) -> str:
    """One run of the `sparkvision-benchmarks` experiment in the local store: each row's ratio and pipeline median,
    the machine as params, the report files and one PNG per scaling curve."""
    sys.path.insert(0, str(ROOT))
    from pipelines.config import load_config
    from pipelines.console import quiet_libraries

    quiet_libraries(False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    from pipelines import tracking

    cfg = load_config([ROOT / "conf/local.yaml"], ["mlflow.experiment=sparkvision-benchmarks"])
    tracking.configure(cfg)
    with mlflow.start_run(run_name="benchmarks-quick" if quick else "benchmarks") as run:
        mlflow.set_tags({"sparkvision.stage": "benchmarks", "quick": str(quick).lower(), "cpu_kind": cpu_kind(m)})
        mlflow.log_params({k: str(v) for k, v in m.items()})
        for r in rows:
            key = metric_key(r["name"])
            if r["pipeline"]:
                mlflow.log_metric(f"{key}/pipeline", r["pipeline"]["median"])
            if r["ratio"] is not None:
                mlflow.log_metric(f"{key}/ratio", r["ratio"])
            if r["curve"]:
                c = r["curve"]
                fig, ax = plt.subplots(figsize=(6, 4))
                ax.plot(c["x"], c["y"], "o-")
                ax.set(xscale="log", xlabel=c["x_label"], ylabel=c["y_label"], title=r["name"], ylim=(0, None))
                ax.title.set_fontsize(8)
                mlflow.log_figure(fig, f"scaling/{re.sub(r'[^0-9A-Za-z]+', '_', r['name']).strip('_')}.png")
                plt.close(fig)
        mlflow.log_artifact(str(OUT / "report.md"))
        mlflow.log_artifact(str(OUT / "report.json"))
        return run.info.run_id


def readme_heading(m: dict) -> str:
    """The CPU model and its widest matrix or vector unit: two AMD EPYC VMs, one with AVX-512 and one with AVX2 only,
    are different kinds (the same model name, different figures)."""
    unit = "AMX" if m["amx"] else "AVX-512, no AMX" if m["avx512"] else "AVX2, no AVX-512"
    return f"{m['cpu']} ({unit})"


def update_readme(table: str, m: dict) -> None:
    """Replace this CPU kind's block in README.md's benchmark section; other kinds' blocks stay."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} section to update")
    head, rest = text.split(START, 1)
    body, tail = rest.split(END, 1)
    kind = f"#### {readme_heading(m)}"
    blocks = [b.strip() for b in re.split(r"(?m)^(?=#### )", body) if b.strip().startswith("#### ")]
    blocks = [b for b in blocks if b.splitlines()[0] != kind] + [f"{kind}\n\n{table.strip()}"]
    readme.write_text(f"{head}{START}\n" + "\n\n".join(sorted(blocks)) + f"\n{END}{tail}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the short version: small inputs, the same code paths")
    ap.add_argument("--only", nargs="*", default=[], help="script names without .py")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md (full runs)")
    ap.add_argument("--no-run", action="store_true", help="rebuild the report from the last run's rows")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    rows_file = OUT / "rows.jsonl"
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    failed = [] if args.no_run else run_scripts(rows_file, args.quick, args.only, today)
    m = machine()
    rows = [{"measured": today, **r, "machine": m} for r in read_rows(rows_file) if r.get("quick", args.quick) ==
            args.quick]
    (OUT / "report.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown(rows, m, args.quick)
    (OUT / "report.md").write_text(f"# sparkvision benchmarks\n\n{table}")
    run_id = log_to_mlflow(rows, m, args.quick)
    if args.readme and not args.quick:
        update_readme(table, m)
    missed = [r["name"] for r in rows if r["met"] is False]
    print(f"[benchmarks] {len(rows)} rows, {len(missed)} below their goal, {len(failed)} script(s) failed: "
          f"{OUT / 'report.md'}, MLflow run {run_id}", file=sys.stderr)
    print(json.dumps({"report": str(OUT / "report.json"), "rows": len(rows), "missed": missed, "failed": failed,
                      "run_id": run_id}))
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
