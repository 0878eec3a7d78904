"""The petastorm -> tf.data feed of one worker's shard: streamed and cached, on a small Parquet split built here."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.train.data import FeedOptions, open_batch_reader, split_dataset
from pipelines.train.worker import (BestEpoch, cache_shard, core_group, cores_per_worker, policy_setting,
                                    precision_policy, reader_threads)

SHAPE = (4, 4, 1)


@pytest.fixture(scope="module")
def split_url(tmp_path_factory):
    """200 rows in 4 row groups of 50; row i has label i % 10 and its id i in the first two pixel bytes."""
    root = tmp_path_factory.mktemp("feed") / "train"
    root.mkdir()
    ids = np.arange(200)
    pixels = np.zeros((200, 16), np.uint8)
    pixels[:, 0], pixels[:, 1] = ids // 256, ids % 256
    table = pa.table({"image": pa.array([p.tobytes() for p in pixels], pa.binary()),
                      "label": pa.array(ids % 10, pa.int64())})
    pq.write_table(table, root / "part-0.parquet", row_group_size=50)
    return root.as_uri()


def row_ids(x: np.ndarray) -> list[int]:
    return list(x[:, 0, 0, 0].astype(int) * 256 + x[:, 0, 1, 0].astype(int))


def shard_ids(url: str, shard: int) -> set[int]:
    ids = set()
    with open_batch_reader(url, columns=["image"], shard=shard, shard_count=2) as reader:
        for batch in reader:
            for raw in batch.image:
                ids.add(raw[0] * 256 + raw[1])
    return ids


@pytest.mark.parametrize("cache", [False, True])
def test_training_feed_serves_every_row_of_its_shard_each_pass(split_url, cache):
    mine = shard_ids(split_url, 0)
    assert len(mine) == 100 and not mine & shard_ids(split_url, 1)
    opts = FeedOptions(SHAPE, batch_size=10, shard=0, shard_count=2, seed=7, shuffle_buffer=20, cache=cache,
                       reader_threads=1)
    with split_dataset(split_url, opts, endless=True) as ds:
        batches = iter(ds)
        passes = []
        for _ in range(3):
            seen = []
            for _ in range(10):
                x, y, w = (t.numpy() for t in next(batches))
                assert x.shape == (10, *SHAPE) and (y == np.array(row_ids(x)) % 10).all() and (w == 1).all()
                seen += row_ids(x)
            passes.append(seen)
    for seen in passes:
        if cache:  # a cached pass is an exact permutation of the shard
            assert sorted(seen) == sorted(mine)
        else:  # a streamed pass may hold rows of the next one in its shuffle buffer
            assert set(seen) <= mine and len(set(seen)) > 80
    assert passes[0] != sorted(passes[0]), "rows must be shuffled"
    assert passes[0] != passes[1] != passes[2], "each pass must be shuffled anew"


def test_cache_budget_counts_one_workers_share_of_raw_pixels():
    # Fashion-MNIST train: 54,000 x 784 bytes = 40.4 MiB in all, 20.2 MiB per worker of 2
    assert cache_shard(54_000, 2, (28, 28, 1), cache_mb=21)
    assert not cache_shard(54_000, 2, (28, 28, 1), cache_mb=20)
    assert cache_shard(54_000, 1, (28, 28, 1), cache_mb=41)
    assert not cache_shard(54_000, 2, (28, 28, 1), cache_mb=0)


def test_reader_threads_split_the_cores_between_workers_on_one_machine():
    assert reader_threads(0, cores_per_worker(2, workers_here=2, bound=False)) == 1
    assert reader_threads(0, cores_per_worker(16, workers_here=4, bound=False)) == 4
    assert reader_threads(0, cores_per_worker(2, workers_here=4, bound=False)) == 1
    assert reader_threads(3, cores_per_worker(2, workers_here=2, bound=False)) == 3
    # bound: the worker's own core group (already its share) is all its own
    assert reader_threads(0, cores_per_worker(3, workers_here=2, bound=True)) == 3


def test_precision_policy_follows_the_device():
    assert precision_policy("auto", has_gpu=True, cpu_amx=True) == "mixed_float16"
    assert precision_policy("auto", has_gpu=False, cpu_amx=True) == "mixed_bfloat16"  # AMX: bfloat16 matrix units
    assert precision_policy("auto", has_gpu=False, cpu_amx=False) == "float32"
    assert precision_policy("on", has_gpu=True, cpu_amx=False) == "mixed_float16"
    assert precision_policy("on", has_gpu=False, cpu_amx=False) == "mixed_bfloat16"  # float16 is emulated on CPUs
    assert precision_policy("bfloat16", has_gpu=True, cpu_amx=False) == "mixed_bfloat16"
    assert precision_policy("float16", has_gpu=False, cpu_amx=True) == "mixed_float16"
    assert precision_policy("off", has_gpu=True, cpu_amx=True) == "float32"


def test_a_resolved_policy_resolves_to_itself_on_any_hardware():
    """What a resume relies on to keep a checkpoint's precision wherever it runs."""
    for policy in ("mixed_float16", "mixed_bfloat16", "float32"):
        for gpu, amx in ((True, True), (True, False), (False, True), (False, False)):
            assert precision_policy(policy_setting(policy), has_gpu=gpu, cpu_amx=amx) == policy


def test_core_groups_split_the_allowed_cores_without_overlap():
    assert core_group([0, 1], 0, 2) == [0] and core_group([0, 1], 1, 2) == [1]
    groups = [core_group([4, 5, 6, 7, 8], r, 2) for r in range(2)]
    assert groups == [[4, 5], [6, 7, 8]]  # every allowed core used, none twice
    assert core_group([3, 1, 2, 0], 0, 1) == [0, 1, 2, 3]
    # more workers than cores: one core each, shared round-robin
    assert [core_group([0, 1], r, 4) for r in range(4)] == [[0], [1], [0], [1]]


@pytest.mark.parametrize("cache", [False, True])
def test_validation_feed_covers_its_shard_once_per_epoch(split_url, tmp_path, cache):
    import shutil
    from urllib.parse import urlparse

    from pipelines.train.data import ValidationFeed

    local = tmp_path / "validation"
    shutil.copytree(Path(urlparse(split_url).path), local)
    mine = shard_ids(local.as_uri(), 0)
    feed = ValidationFeed(local.as_uri(), FeedOptions(SHAPE, batch_size=30, shard=0, shard_count=2, cache=cache,
                                                      reader_threads=1))

    def one_pass() -> list[int]:
        with feed.one_pass() as ds:
            return [i for x, _, _ in ds for i in row_ids(x.numpy())]

    first = one_pass()
    assert sorted(first) == sorted(mine)
    if cache:  # later epochs come from memory: the files are no longer read
        shutil.rmtree(local)
    assert sorted(one_pass()) == sorted(mine)


def test_a_damaged_parquet_file_is_named_instead_of_petastorms_missing_metadata(split_url, tmp_path):
    import shutil
    from urllib.parse import urlparse

    damaged = tmp_path / "train"
    shutil.copytree(urlparse(split_url).path, damaged)
    shutil.copy(damaged / "part-0.parquet", damaged / "part-1.parquet")
    with open(damaged / "part-1.parquet", "r+b") as fh:
        fh.truncate((damaged / "part-1.parquet").stat().st_size // 2)  # as a copy cut short
    with pytest.raises(RuntimeError, match=r"part-1\.parquet is not a readable Parquet file .*ingest it again"):
        open_batch_reader(damaged.as_uri(), columns=["image"])
    with open_batch_reader(split_url, columns=["image"]) as reader:  # the intact split still opens and reads
        assert sum(len(batch.image) for batch in reader) == 200


def test_best_epoch_counts_epochs_without_a_real_improvement():
    best = BestEpoch()
    assert best.observe(0, 1.0) and best.epoch == 0 and best.stale == 0
    assert not best.observe(1, 0.99995)  # within 1e-4: not an improvement
    assert best.stale == 1 and best.epoch == 0
    assert best.observe(2, 0.5) and (best.epoch, best.stale) == (2, 0)
    assert not best.observe(3, 0.7) and best.stale == 1
