"""The ingest job on a real local SparkSession: folder and IDX sources, invariants, publish, petastorm."""
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import ConfigError
from pipelines.dataset.contract import SPLITS, latest_version, resolve_dataset
from pipelines.errors import PipelineError
from pipelines.ingest import job as ingest_job, sources
from pipelines.ingest.job import run_ingest
from pipelines.raw_files import decode_tasks
from tests.fixtures import build_image_tree, write_idx_slice

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos") / "images"
    return root, build_image_tree(root)


def folder_cfg(cfg_factory, root, *extra):
    return cfg_factory(
        "ingest.name=photos", "ingest.source.type=folder", f"ingest.source.path={root}",
        "ingest.image.height=32", "ingest.image.width=32",
        "ingest.image.channels=3", "ingest.max_pixels=4000000", "ingest.split.validation=0.2",
        "ingest.split.test=0.2", "ingest.files_per_split=1", *extra)


@pytest.mark.fault('every corrupt image kind in a folder (empty, truncated, not an image, too many pixels, unknown label, label conflict, duplicates)', kind='bad_input',
                   shows='each quarantined with its reason; rows + quarantined + duplicates = files seen')
def test_folder_ingest_accounts_for_every_file(spark, cfg_factory, tree, capsys):
    root, expected = tree
    out = run_ingest(spark, folder_cfg(cfg_factory, root))  # no allow-list: the labels are the folders' names
    counts = out["counts"]
    seen = counts["seen"]
    assert counts["rows"] + counts["quarantined"] + counts["duplicates_dropped"] == seen
    assert counts["rows"] == expected["good"]
    assert counts["duplicates_dropped"] == expected["duplicates"]
    for reason in ("label_conflict", "empty_file", "truncated", "not_an_image", "too_many_pixels", "unknown_label"):
        assert counts["quarantine_reasons"].get(reason) == expected[reason], reason
    assert counts["skipped"] == {"hidden": expected["hidden"], "not_image_extension": expected["not_image_extension"]}
    # where the job's time went, step by step: every step timed, together no more than the whole job
    steps = out["step_seconds"]
    assert list(steps) == ["listing", "decoding", "splitting", "writing", "verifying"]
    assert all(t >= 0 for t in steps.values()) and steps["decoding"] > 0
    assert sum(steps.values()) <= out["seconds"] + 0.1

    # the scratch copy every candidate was decoded into is not published with the version
    assert sorted(p.name for p in Path(out["path"]).iterdir()) == sorted(
        [*SPLITS, "quarantine", "duplicates", "manifest.json"])
    ds = resolve_dataset(out["path"].rsplit("/", 2)[0], "photos")
    manifest = ds.manifest()
    assert manifest.label_names == ["cat", "coffee", "space"]
    per_label = {n: sum(manifest.data["counts"]["per_class"][s][n] for s in SPLITS) for n in manifest.label_names}
    assert f"[ingest] 3 labels: cat {per_label['cat']}, coffee {per_label['coffee']}, space {per_label['space']}" \
        in capsys.readouterr().err
    assert manifest.shape == (32, 32, 3)
    q = spark.read.parquet(ds.split_path("quarantine").as_uri())
    assert set(q.columns) >= {"path", "reason", "detail"}
    # every good image is readable pixels of the canonical shape (checked on executors: length only)
    for split in SPLITS:
        lengths = {r[0] for r in spark.read.parquet(ds.split_path(split).as_uri()).selectExpr("length(image)").distinct().collect()}
        assert lengths <= {32 * 32 * 3}
    non_ascii = spark.read.parquet(*[ds.split_path(s).as_uri() for s in SPLITS]).where("source_path like '%chïnä temple ✓.jpg'").count()
    assert non_ascii == 1


def test_ingest_is_idempotent_and_keeps_splits_stable(spark, cfg_factory, tree):
    root, _ = tree
    cfg = folder_cfg(cfg_factory, root)
    first = run_ingest(spark, cfg)
    second = run_ingest(spark, cfg)
    assert second["content_digest"] == first["content_digest"]
    assert second["unchanged"] and second["version"] == first["version"]


@pytest.mark.fault('ingest failing while verifying', kind='fault', shows='previous version untouched, no staging left')
def test_failed_publish_leaves_previous_version_untouched(spark, cfg_factory, tree, monkeypatch):
    root, _ = tree
    cfg = folder_cfg(cfg_factory, root)
    first = run_ingest(spark, cfg)

    def boom(*a, **k):
        raise RuntimeError("simulated crash while verifying")

    monkeypatch.setattr(ingest_job, "verify_and_describe", boom)
    changed = folder_cfg(cfg_factory, root, "ingest.image.height=16")  # would be a new version
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_ingest(spark, changed)
    name_dir = cfg.paths.datasets_root + "/photos"
    import os

    assert latest_version(cfg.paths.datasets_root, "photos") == first["version"]
    assert sorted(n for n in os.listdir(name_dir) if n != ".publish.lock") == ["LATEST", first["version"]]  # no
    # partial version, no staging left


@pytest.mark.fault('ingest SIGKILLed mid-write', kind='fault',
                   shows="the previous version's files unchanged and still LATEST, no partial version visible; "
                         "the next run removes the staging folder and publishes")
def test_an_ingest_killed_mid_write_leaves_the_previous_version_whole_and_the_next_run_cleans_up(
        spark, cfg_factory, tree, observe):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root, _ = tree
    cfg = folder_cfg(cfg_factory, root)
    first = run_ingest(spark, cfg)
    name_dir = f"{cfg.paths.datasets_root}/photos"
    files = lambda: {p: os.path.getsize(p) for p in _files_under(f"{name_dir}/{first['version']}")}  # noqa: E731
    before = files()
    sets = ["ingest.name=photos", "ingest.source.type=folder", f"ingest.source.path={root}",
            "ingest.image.height=16", "ingest.image.width=16",
            "ingest.image.channels=3", "ingest.max_pixels=4000000", "ingest.files_per_split=1",
            f"paths.datasets_root={cfg.paths.datasets_root}", "spark.shuffle_partitions=4"]  # a new version's data
    cmd = [sys.executable, "-m", "pipelines.cli", "ingest", *(x for o in sets for x in ("--set", o))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:  # the step before the write has ended: the write starts now
        if line.startswith("[ingest] splitting, balancing"):
            break
    deadline = time.monotonic() + 120
    while not any(True for p in _files_under(name_dir) if "_staging-" in p) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # driver and JVM at once, mid-write: no handler, no clean-up runs
    proc.communicate(timeout=60)
    assert any(p.name.startswith("_staging-") for p in Path(name_dir).iterdir())
    # the previous version is whole and still the latest; nothing partial is visible as a version
    assert latest_version(cfg.paths.datasets_root, "photos") == first["version"] and files() == before
    assert sorted(n for n in os.listdir(name_dir) if not n.startswith(("_", "."))) == ["LATEST", first["version"]]
    assert spark.read.parquet(f"{name_dir}/{first['version']}/train").count() == first["counts"]["splits"]["train"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "[ingest] removed 1 staging folder(s) left by a killed ingest of photos" in again.stderr
    assert not [n for n in os.listdir(name_dir) if n.startswith(("_staging-", ".staging-"))]
    assert latest_version(cfg.paths.datasets_root, "photos") != first["version"] and files() == before
    observe(**{"previous version's files unchanged": len(before),
               "after the next run": f"LATEST {latest_version(cfg.paths.datasets_root, 'photos')}, no staging left"})


def _files_under(folder: str) -> list[str]:
    import os

    return [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]


def test_oversample_balances_training_split_only(spark, cfg_factory, tree):
    root, _ = tree
    out = run_ingest(spark, folder_cfg(cfg_factory, root, "ingest.name=balanced", "ingest.balance=oversample"))
    per_class = out["counts"]["per_class"]
    ds = resolve_dataset(out["path"].rsplit("/", 2)[0], "balanced")
    train = spark.read.parquet(ds.split_path("train").as_uri())
    by_label = {r["label_name"]: r["count"] for r in train.groupBy("label_name").count().collect()}
    target = max(per_class["train"].values())
    assert all(abs(n - target) <= 1 for n in by_label.values()), by_label
    assert out["counts"]["splits"]["validation"] == sum(per_class["validation"].values())
    weights = ds.manifest().class_weights
    assert len(weights) == 3 and all(w > 0 for w in weights.values())


def test_idx_slice_keeps_its_own_test_set_and_petastorm_reads_every_split(spark, cfg_factory, tmp_path):
    src = write_idx_slice(tmp_path / "idx", train=3000, test=500)
    out = run_ingest(spark, cfg_factory(f"ingest.source.path={src}", "ingest.row_group_rows=200"))
    splits = out["counts"]["splits"]
    assert splits["test"] == 500 and out["counts"]["quarantined"] == 0  # the source's own test set, whole
    assert splits["train"] + splits["validation"] + splits["test"] == out["counts"]["rows"]
    assert abs(splits["validation"] - 0.1 * (out["counts"]["rows"] - splits["test"])) < 15  # stratified 10%
    ds = resolve_dataset(out["path"].rsplit("/", 2)[0], "fashion_mnist")
    manifest = ds.manifest()
    assert manifest.data["parquet"]["row_groups"]["train"] >= 8  # many row groups to shard
    assert 0.2 < manifest.mean[0] < 0.4

    from pipelines.train.data import open_batch_reader

    for split in SPLITS:
        for _ in range(10):  # stock petastorm 0.13.1 ended ~1 read in 60 early (see open_batch_reader)
            rows = 0
            with open_batch_reader(ds.split_path(split).as_uri(), columns=["image", "label"]) as reader:
                for batch in reader:
                    pixels = np.frombuffer(batch.image[0], dtype=np.uint8)
                    assert pixels.shape == (784,)
                    rows += len(batch.label)
            assert rows == splits[split]


@pytest.mark.fault('IDX files with a wrong magic or mismatched counts', kind='bad_input',
                   shows='one error naming the file')
def test_bad_idx_files_are_clear_errors(spark, cfg_factory, tmp_path):
    src = write_idx_slice(tmp_path / "idx", train=100, test=10)
    import gzip
    import struct

    with gzip.open(src / "train-labels-idx1-ubyte.gz", "wb") as fh:  # count mismatch
        fh.write(struct.pack(">II", 0x801, 99) + bytes(99))
    with pytest.raises(PipelineError, match="has 100 images but .* has 99 labels"):
        run_ingest(spark, cfg_factory(f"ingest.source.path={src}"))
    with gzip.open(src / "train-labels-idx1-ubyte.gz", "wb") as fh:  # wrong magic
        fh.write(struct.pack(">II", 0x803, 100) + bytes(100))
    with pytest.raises(PipelineError, match="wrong IDX magic number"):
        run_ingest(spark, cfg_factory(f"ingest.source.path={src}"))
    with gzip.open(src / "train-labels-idx1-ubyte.gz", "wb") as fh:  # truncated
        fh.write(struct.pack(">II", 0x801, 100) + bytes(50))
    with pytest.raises(PipelineError, match="truncated IDX file"):
        run_ingest(spark, cfg_factory(f"ingest.source.path={src}"))


@pytest.mark.fault('an empty or missing input folder, or only bad images', kind='bad_input',
                   shows='one error, nothing published')
def test_missing_or_all_bad_input_fails_clearly(spark, cfg_factory, tmp_path):
    with pytest.raises(PipelineError, match="image folder not found"):
        run_ingest(spark, folder_cfg(cfg_factory, tmp_path / "nope"))
    bad = tmp_path / "bad" / "label"
    bad.mkdir(parents=True)
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_bytes(b"garbage" * 10)
    with pytest.raises(PipelineError, match="no valid image among the 2 files"):
        run_ingest(spark, folder_cfg(cfg_factory, tmp_path / "bad"))
    assert latest_version(cfg_factory().paths.datasets_root, "photos") is None


def test_table_source_reads_a_csv_manifest(spark, cfg_factory, tree, tmp_path):
    root, _ = tree
    csv = tmp_path / "manifest.csv"
    csv.write_text("file,kind\n" + f"{root}/cat/baseline.jpg,cat\n{root}/coffee/rgb.png,coffee\n"
                   f"{root}/space/astronaut.bmp,space\n{root}/missing.jpg,cat\n")
    out = run_ingest(spark, cfg_factory(
        "ingest.name=tabled", "ingest.source.type=table", f"ingest.source.path={csv}",
        "ingest.source.path_column=file", "ingest.source.label_column=kind",
        "ingest.image.height=16", "ingest.image.width=16", "ingest.split.validation=0", "ingest.split.test=0"))
    assert out["counts"]["rows"] == 3
    assert out["counts"]["quarantine_reasons"] == {"missing_file": 1}
    assert json.loads(json.dumps(out))["version"] == "v0001"
    listed = sources.table_source(spark, str(csv), "file", "kind").rows  # one CSV file: one task, unless spread
    assert listed.rdd.getNumPartitions() == decode_tasks(None, spark.sparkContext.defaultParallelism)


def test_a_skewed_ingest_cuts_the_named_classes_in_training_only(spark, cfg_factory, tmp_path):
    src = write_idx_slice(tmp_path / "idx", train=2000, test=300)
    plain = run_ingest(spark, cfg_factory(f"ingest.source.path={src}"))
    skewed = run_ingest(spark, cfg_factory(f"ingest.source.path={src}", "ingest.name=skewed",
                                           "ingest.skew_classes=[Shirt, Coat]", "ingest.skew_fraction=0.1"))
    before, after = plain["counts"]["per_class"], skewed["counts"]["per_class"]
    for name in ("Shirt", "Coat"):
        assert 0 < after["train"][name] <= 0.2 * before["train"][name]
    assert after["train"]["Bag"] == before["train"]["Bag"]
    assert after["test"] == before["test"] and after["validation"] == before["validation"]
    assert resolve_dataset(skewed["path"].rsplit("/", 2)[0], "skewed").manifest().data["skew"] == {
        "classes": ["Shirt", "Coat"], "fraction": 0.1}
    with pytest.raises(ConfigError, match="ingest.skew_classes: Shrit not among the labels"):
        run_ingest(spark, cfg_factory(f"ingest.source.path={src}", "ingest.name=typo", "ingest.skew_classes=[Shrit]"))


@pytest.mark.fault('an output path that cannot be written', kind='fault',
                   shows='one line naming paths.datasets_root, before any decoding')
def test_an_unwritable_datasets_root_is_refused_before_any_work(tree, tmp_path):
    import subprocess
    import sys

    root, _ = tree
    (tmp_path / "a_file").write_text("")
    sets = ["ingest.name=photos", "ingest.source.type=folder", f"ingest.source.path={root}",
            f"paths.datasets_root={tmp_path}/a_file/datasets"]
    cmd = [sys.executable, "-m", "pipelines.cli", "ingest", *(x for o in sets for x in ("--set", o))]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [f"error: cannot write to paths.datasets_root "
                                                   f"{tmp_path}/a_file/datasets/photos: Not a directory"]


@pytest.mark.fault('a write that fails midway (a full disk: a file-size limit on the job)', kind='fault',
                   shows='one line with the cause (java.io.IOException: File too large), nothing published, '
                         'LATEST unchanged')
def test_a_write_that_fails_midway_publishes_nothing_and_names_the_cause(spark, cfg_factory, tmp_path):
    import os
    import resource
    import subprocess
    import sys

    src = write_idx_slice(tmp_path / "idx", train=4000, test=200)
    sets = [f"ingest.source.path={src}", "ingest.files_per_split=1", f"paths.datasets_root={tmp_path}/datasets"]
    first = run_ingest(spark, cfg_factory(*sets))

    def files_up_to_1mb():  # as a disk that fills up: a file's write past 1 MB fails
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    full = subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", *(x for o in sets for x in ("--set", o))],
                          capture_output=True, text=True, timeout=300, preexec_fn=files_up_to_1mb)
    last = full.stderr.strip().splitlines()[-1]
    assert full.returncode == 1
    assert last.startswith(f"error: writing the new version of fashion_mnist under {tmp_path}/datasets/fashion_mnist "
                           f"failed (java.io.IOException: File too large); nothing was published"), last
    name_dir = tmp_path / "datasets" / "fashion_mnist"
    assert latest_version(tmp_path / "datasets", "fashion_mnist") == first["version"]
    assert sorted(n for n in os.listdir(name_dir) if not n.startswith(".")) == ["LATEST", first["version"]]
