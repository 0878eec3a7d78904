"""The benchmark report: rows as the scripts record them, the markdown table, the README's per-CPU blocks."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return _load("bench_common", ROOT / "benchmarks" / "common.py")


@pytest.fixture(scope="module")
def runner():
    return _load("bench_runner", ROOT / "scripts" / "benchmarks.py")


def test_a_row_has_the_spread_of_each_side_and_the_ratio_of_medians(common, tmp_path, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(common.ROWS_VAR, str(rows))
    faster = common.record("speed", [100, 90, 110], [85, 70, 80], "img/s", 0.8)
    slower = common.record("cost", [2.0], [3.0], "s", 0.9, lower_is_better=True)
    common.record("no baseline", None, [4.0], "%", None)
    assert faster["baseline"] == {"min": 90, "median": 100, "max": 110, "n": 3}
    assert faster["ratio"] == pytest.approx(0.8) and faster["met"] is True
    assert slower["ratio"] == pytest.approx(2 / 3) and slower["met"] is False  # 3 s against 2 s: a third slower
    written = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["name"] for r in written] == ["speed", "cost", "no baseline"]
    assert written[2]["ratio"] is None and written[2]["met"] is None


def test_a_two_sided_goal_is_missed_when_the_cost_falls_or_grows_by_more_than_it_allows(common):
    per_k = lambda small, large: common.record("scaling", [small], [large], "s", None,  # noqa: E731
                                               lower_is_better=True, within=1.2)
    assert per_k(0.55, 0.52)["met"] is True
    assert per_k(0.75, 0.52)["met"] is False   # falls by 44%: a fixed cost the small size cannot hide
    assert per_k(0.50, 0.70)["met"] is False   # grows by 40%
    assert per_k(0.75, 0.52)["goal"] == pytest.approx(1 / 1.2)


def test_the_table_shows_min_median_max_and_which_goals_were_missed(common, runner, tmp_path, monkeypatch):
    monkeypatch.delenv(common.ROWS_VAR, raising=False)
    rows = [{**common.record("inference", [5000, 6000, 6500], [4000, 4100, 4500], "img/s", 0.8), "measured": "d"}]
    m = {"cpu": "AMD EPYC", "cores": 2, "amx": False, "avx512": True, "avx512_bf16": True, "precision": "float32"}
    table = runner.markdown(rows, m, quick=False)
    assert "| inference | 5,000 / **6,000** / 6,500 | 4,000 / **4,100** / 4,500 | img/s | 0.68x" in table
    assert table.rstrip().endswith("| 0.80x | **no** |")
    assert "AMD EPYC, 2 cores, AVX-512 + AVX-512 bf16, training in float32" in table


def test_the_readme_keeps_every_cpu_kinds_table_and_replaces_this_ones(runner, tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{runner.START}\n#### Intel Xeon (AMX)\n\nold intel\n\n#### AMD EPYC (AVX-512, no AMX)\n\n"
                      f"old amd\n{runner.END}\nafter\n")
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    runner.update_readme("new amd", {"cpu": "AMD EPYC", "amx": False, "avx512": True})
    text = readme.read_text()
    assert "old intel" in text and "new amd" in text and "old amd" not in text
    assert text.startswith("intro\n") and text.endswith(f"{runner.END}\nafter\n")
    runner.update_readme("an AMX one", {"cpu": "Intel Sapphire", "amx": True, "avx512": True})
    assert readme.read_text().count("#### ") == 3
    runner.update_readme("an AVX2 amd", {"cpu": "AMD EPYC", "amx": False, "avx512": False})  # same model, no AVX-512
    text = readme.read_text()
    assert text.count("#### ") == 4 and "new amd" in text and "#### AMD EPYC (AVX2, no AVX-512)\n\nan AVX2 amd" in text


def test_a_goal_never_reached_is_a_row_with_no_pipeline_figure_and_its_note(common, runner, monkeypatch):
    monkeypatch.delenv(common.ROWS_VAR, raising=False)
    row = common.record("seconds to 0.93", None, [], "s", None, lower_is_better=True, note="not reached (best 0.91)")
    assert row["pipeline"] is None and row["ratio"] is None and row["met"] is None
    m = {"cpu": "AMD EPYC", "cores": 2, "amx": False, "avx512": True, "avx512_bf16": True, "precision": "float32"}
    assert "| seconds to 0.93 (not reached (best 0.91)) |  |  | s |" in runner.markdown([{**row, "measured": "d"}], m,
                                                                                         quick=False)


def test_time_to_accuracy_is_the_first_epoch_at_or_above_the_target(common):
    tta = _load("bench_tta", ROOT / "benchmarks" / "time_to_accuracy.py")
    curve = [(30.0, 0.85), (55.0, 0.91), (80.0, 0.90), (105.0, 0.925)]
    assert tta.seconds_to(curve, 0.90) == 55.0 and tta.seconds_to(curve, 0.92) == 105.0
    assert tta.seconds_to(curve, 0.93) is None


def test_a_run_of_some_scripts_replaces_their_rows_and_keeps_the_others_with_their_dates(runner, tmp_path,
                                                                                          monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    for name in ("fast", "slow"):  # each appends one row where scripts/benchmarks.py says, as common.record does
        (tmp_path / "benchmarks" / f"{name}.py").write_text(
            "import json, os, sys\n"
            f"open(os.environ['SPARKVISION_BENCH_ROWS'], 'a').write(json.dumps({{'name': '{name}', "
            f"'script': '{name}.py', 'args': sys.argv[1:]}}) + '\\n')\n")
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    monkeypatch.setattr(runner, "PLAN", {"fast.py": (["--full"], ["--quick"]), "slow.py": ([], ["--quick"])})
    rows = tmp_path / "rows.jsonl"
    assert runner.run_scripts(rows, False, [], "2026-12-04") == []
    assert runner.run_scripts(rows, False, ["fast"], "2026-12-05") == []
    by_name = {r["name"]: r for r in runner.read_rows(rows)}
    assert {n: (r["measured"], r["args"]) for n, r in by_name.items()} == {"slow": ("2026-12-04", []),
                                                                           "fast": ("2026-12-05", ["--full"])}
    # a quick run keeps the full run's rows (a report shows one kind) and replaces only its own kind's
    assert runner.run_scripts(rows, True, ["slow"], "2026-12-06") == []
    assert runner.run_scripts(rows, True, ["slow"], "2026-12-07") == []
    assert sorted((r["name"], r["quick"], r["measured"]) for r in runner.read_rows(rows)) == [
        ("fast", False, "2026-12-05"), ("slow", False, "2026-12-04"), ("slow", True, "2026-12-07")]
