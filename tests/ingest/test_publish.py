"""Publishing a dataset version: staging folders of killed runs are removed by the next run, live ones are kept, and
ingests publishing at once never leave a mixed version or LATEST behind the newest."""
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from pipelines.dataset.contract import latest_version, read_manifest
from pipelines.ingest.publish import Staging

HOLD = """
import sys, time
from pipelines.ingest.publish import Staging
s = Staging(sys.argv[1], "ds")
(s.path / "part-0.parquet").write_bytes(b"half")
print(s.path, flush=True)
time.sleep(600)
"""


def hold_a_staging(root) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


@pytest.mark.fault("a killed ingest's staging folder beside a live one", kind='fault',
                   shows="the next run removes the killed one's at once (its lock is free) and never the live one's")
def test_the_next_run_removes_a_killed_runs_staging_and_keeps_a_live_ones(tmp_path):
    killed, killed_path = hold_a_staging(tmp_path)
    live, live_path = hold_a_staging(tmp_path)
    try:
        os.kill(killed.pid, signal.SIGKILL)  # no handler runs: its staging folder stays behind
        killed.wait()
        assert os.path.isdir(killed_path)
        mine = Staging(str(tmp_path), "ds")
        assert mine.removed_stale == 1
        assert not os.path.exists(killed_path) and os.path.isdir(live_path)  # a live run's folder is not touched
        mine.discard()
        assert not mine.path.exists()
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in (tmp_path / "ds").iterdir() if not p.name.startswith(".")) == \
        [os.path.basename(live_path)]  # left for the next run, whose lock it now is


def publish(root: str, digest: str, rows: int, out) -> None:
    staging = Staging(root, "ds")
    (staging.path / "train").mkdir()
    (staging.path / "train" / "part-0.parquet").write_bytes(os.urandom(rows))
    out.put(staging.publish_unless_same({"content_digest": digest, "rows": rows}))


@pytest.mark.fault('ingests of one dataset at once', kind='fault',
                   shows='the same content: one version; different content: one whole version each, LATEST the newest')
def test_ingests_publishing_at_once_give_whole_versions_and_latest_is_the_newest(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    same = [ctx.Process(target=publish, args=(str(tmp_path), "same", 10, results)) for _ in range(3)]
    for p in same:
        p.start()
    for p in same:
        p.join(60)
    got = sorted(results.get(timeout=5) for _ in same)
    assert got == [("v0001", False), ("v0001", True), ("v0001", True)]  # one version of the same content
    other = [ctx.Process(target=publish, args=(str(tmp_path), f"d{i}", 20 + i, results)) for i in range(3)]
    for p in other:
        p.start()
    for p in other:
        p.join(60)
    versions = sorted(results.get(timeout=5)[0] for _ in other)
    assert versions == ["v0002", "v0003", "v0004"]
    assert latest_version(tmp_path, "ds") == "v0004"
    for v in ["v0001", *versions]:  # each whole: its manifest and the rows it wrote, nothing of another
        manifest = read_manifest(tmp_path / "ds" / v).data
        assert (tmp_path / "ds" / v / "train" / "part-0.parquet").stat().st_size == manifest["rows"]
    assert not list((tmp_path / "ds").glob("_staging-*")) and not list((tmp_path / "ds").glob(".staging-*"))


def test_write_parts_puts_each_value_in_its_own_folder_sorted_and_gives_an_empty_part_its_schema(spark, tmp_path):
    rows = [(f"{i:04d}", bytes([i % 256]) * 8, "train" if i % 4 else "test") for i in range(200)]
    df = spark.createDataFrame(rows, "id string, image binary, split string")
    staging = Staging(str(tmp_path), "ds")
    staging.write_parts(df, "split", ("train", "validation", "test"), files=3, row_group_bytes=1 << 20, sort_by="id")

    assert sorted(p.name for p in staging.path.iterdir()) == ["test", "train", "validation"]  # no _parts left
    for part, expected in (("train", 150), ("test", 50), ("validation", 0)):
        back = staging.read(spark, part)
        assert back.columns == ["id", "image"] and back.count() == expected
    import pyarrow.parquet as pq
    train_files = sorted((staging.path / "train").glob("*.parquet"))
    for f in train_files:
        ids = pq.read_table(f).column("id").to_pylist()
        assert ids == sorted(ids) and all(int(i) % 4 for i in ids)
    for part, rows in (("train", 150), ("test", 50)):  # exactly `files` files each, none holding two buckets
        counts = [pq.read_metadata(f).num_rows for f in (staging.path / part).glob("*.parquet")]
        assert len(counts) == 3 and sum(counts) == rows and max(counts) < 0.5 * rows
    assert pq.read_schema(next((staging.path / "validation").glob("*.parquet"))).names == ["id", "image"]
    staging.discard()


def test_an_empty_part_is_written_without_spark_and_reads_back_with_its_schema(spark, tmp_path):
    from pipelines.ingest.publish import parquet_rows

    schema = spark.createDataFrame([], "path string, label string, reason string, detail string").schema
    staging = Staging(str(tmp_path), "ds")
    staging.write_empty("quarantine", schema)
    assert parquet_rows(staging.path / "quarantine") == 0
    assert staging.read(spark, "quarantine").count() == 0
    assert spark.read.parquet(staging.url("quarantine")).schema == schema  # as a user reading the folder sees it
    staging.write(spark.createDataFrame([("a", "b", "c", "d")] * 3, schema), "two", 1)
    assert parquet_rows(staging.path / "two") == 3
    staging.discard()
