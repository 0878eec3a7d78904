"""What a study or an experiment leaves behind: best.yaml (an overlay `train` accepts), Optuna's history and
importance plots, and an experiment's comparison plots and table. Each file is written whole or not at all."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import optuna
import yaml

from pipelines.config import Config
from pipelines.tune.space import as_overlay


def write_atomically(path: Path, data: bytes) -> None:
    """`path` holds `data` or what it held before: never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def save_figure(fig: Any, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_atomically(path, buf.getvalue())
    return path


def best_overlay_text(study: Any, cfg: Config) -> str:
    """best.yaml: the best trial's values as a config overlay, with where they came from."""
    best = study.best_trial
    head = (f"# best trial {best.number} of Optuna study {study.study_name}: val_accuracy {best.value:.4f} after "
            f"{cfg.tune.epochs} epoch(s) on one worker\n# use: sparkvision train --conf conf/local.yaml --conf "
            f"best.yaml\n")
    return head + yaml.safe_dump(as_overlay(best.params), sort_keys=True, default_flow_style=False)


def study_outputs(study: Any, cfg: Config, study_dir: Path) -> dict[str, Path]:
    """best.yaml, optimization_history.png and param_importances.png (when at least two trials completed)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization.matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # Optuna's matplotlib plots
    out = {"best_yaml": study_dir / "best.yaml"}
    write_atomically(out["best_yaml"], best_overlay_text(study, cfg).encode())
    out["history_png"] = save_figure(ovm.plot_optimization_history(study).figure, study_dir / "optimization_history.png")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(complete) >= 2 and any(len({str(t.params.get(k)) for t in complete}) > 1 for k in study.best_params):
        out["importance_png"] = save_figure(ovm.plot_param_importances(study).figure,
                                            study_dir / "param_importances.png")
    return out


def log_study_outputs(client: Any, run_id: str, study: Any, outputs: dict[str, Path]) -> None:
    """The parent run: best params (best.*), best value, best trial, and the files."""
    import mlflow

    best = study.best_trial
    client.log_batch(run_id, metrics=[mlflow.entities.Metric("best_val_accuracy", best.value, 0, len(study.trials))],
                     tags=[mlflow.entities.RunTag("best_trial", str(best.number)),
                           mlflow.entities.RunTag("best_run_id", best._trial_id),
                           *[mlflow.entities.RunTag(f"best.{k}", str(v)) for k, v in best.params.items()]])
    for path in outputs.values():
        client.log_artifact(run_id, str(path))


def seconds_to_reach(history: list[dict[str, float]], target: float) -> float | None:
    """Training seconds until the first epoch whose validation accuracy reached `target`; None if none did."""
    total = 0.0
    for m in history:
        total += m["epoch_seconds"]
        if m.get("val_accuracy", 0.0) >= target:
            return total
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    import numpy as np

    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def variant_row(label: str, runs: list[dict[str, Any]], reach: float, labels: list[str],
                per_class: bool) -> dict[str, Any]:
    """One line of the table: a variant over its seeds."""
    val = [r["history"][-1]["val_accuracy"] for r in runs]
    test = [r["scores"]["test"]["accuracy"] for r in runs]
    gap = [r["scores"]["train"]["accuracy"] - r["history"][-1]["val_accuracy"] for r in runs]
    best = [1 + max(range(len(r["history"])), key=lambda i: r["history"][i]["val_accuracy"]) for r in runs]
    reached = [t for t in (seconds_to_reach(r["history"], reach) for r in runs) if t is not None]
    row = {"variant": label, "runs": len(runs), "val_accuracy": _mean_std(val), "test_accuracy": _mean_std(test),
           "best_epoch": sum(best) / len(best), "train_minus_val": _mean_std(gap),
           f"seconds_to_{reach:g}": (sum(reached) / len(reached), len(reached)) if reached else None}
    if per_class:
        for i, name in enumerate(labels):
            row[f"recall {name}"] = _mean_std([r["scores"]["test"]["recall"][i] or 0.0 for r in runs])
    return row


def cell(value: Any, runs: int) -> str:
    if value is None:
        return "not reached"
    if isinstance(value, tuple) and isinstance(value[1], int):  # seconds to reach, by how many seeds
        return f"{value[0]:.0f}" + ("" if value[1] == runs else f" ({value[1]}/{runs} seeds)")
    if isinstance(value, tuple):
        return f"{value[0]:.4f} ± {value[1]:.4f}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def table_text(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The table as markdown and as CSV (means and standard deviations in columns of their own)."""
    import csv
    import io

    heads = list(rows[0])
    md = ["| " + " | ".join(h.replace("_", " ") for h in heads) + " |", "|" + "---|" * len(heads)]
    md += ["| " + " | ".join(cell(r[h], r["runs"]) for h in heads) + " |" for r in rows]
    buf = io.StringIO()
    writer = csv.writer(buf)
    flat_heads = [x for h in heads for x in ((f"{h}_mean", f"{h}_std") if isinstance(rows[0][h], tuple)
                                              and not h.startswith("seconds") else (h,))]
    writer.writerow(flat_heads)
    for r in rows:
        writer.writerow([x for h in heads for x in (
            r[h] if isinstance(r[h], tuple) and not h.startswith("seconds")
            else ((r[h][0] if r[h] else ""),) if h.startswith("seconds") else (r[h],))])
    return "\n".join(md) + "\n", buf.getvalue()


def curves_figure(by_variant: dict[str, list[dict[str, Any]]], title: str):
    """Validation accuracy per epoch, one line per variant (mean over seeds), the seeds' spread shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, runs in by_variant.items():
        n = min(len(r["history"]) for r in runs)
        acc = np.array([[r["history"][e]["val_accuracy"] for e in range(n)] for r in runs])
        epochs = np.arange(1, n + 1)
        ax.plot(epochs, acc.mean(0), marker="o", label=label)
        ax.fill_between(epochs, acc.min(0), acc.max(0), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def loss_figure(by_variant: dict[str, list[dict[str, Any]]], title: str):
    """Training (solid) and validation (dashed) loss per epoch, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, runs in by_variant.items():
        n = min(len(r["history"]) for r in runs)
        epochs = np.arange(1, n + 1)
        train = np.mean([[r["history"][e]["loss"] for e in range(n)] for r in runs], 0)
        val = np.mean([[r["history"][e]["val_loss"] for e in range(n)] for r in runs], 0)
        line, = ax.plot(epochs, train, label=f"{label} train")
        ax.plot(epochs, val, linestyle="--", color=line.get_color(), label=f"{label} validation")
    ax.set(xlabel="epoch", ylabel="loss (validation: cross-entropy)", title=title)
    ax.legend(fontsize="x-small", ncol=2)
    ax.grid(alpha=0.3)
    return fig


def experiment_outputs(exp: Any, units: list[Any], results: dict[str, dict[str, Any]], labels: list[str],
                       out_dir: Path) -> dict[str, Path]:
    """table.md, table.csv, accuracy.png and loss.png under `out_dir`, which is replaced whole."""
    import shutil

    by_variant: dict[str, list[dict[str, Any]]] = {}
    for u in units:
        if "error" not in results[u.run_id]:
            by_variant.setdefault(u.variant, []).append(results[u.run_id])
    rows = [variant_row(v, runs, exp.reach, labels, exp.per_class_recall) for v, runs in by_variant.items()]
    md, csv_text = table_text(rows)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "table.md").write_text(f"{exp.question}\n\n{md}")
    (staging / "table.csv").write_text(csv_text)
    save_figure(curves_figure(by_variant, f"{exp.name}: validation accuracy (seeds shaded)"), staging / "accuracy.png")
    save_figure(loss_figure(by_variant, f"{exp.name}: training vs validation loss"), staging / "loss.png")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return {"table_md": out_dir / "table.md", "table_csv": out_dir / "table.csv",
            "accuracy_png": out_dir / "accuracy.png", "loss_png": out_dir / "loss.png"}
