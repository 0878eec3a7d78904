"""The petastorm -> tf.data feed of one worker's shard: streamed and cached, on a small Parquet split built here."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import AugmentConfig
from pipelines.train.data import FeedOptions, cache_shard, open_batch_reader, split_dataset

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


@pytest.mark.parametrize("cache", [False, True])
def test_every_feed_runs_without_tf_datas_autotune_model_thread(split_url, cache):
    # that thread delays an iterator's destruction until its next wake-up: seconds at the end of every training run
    from pipelines.train.data import ValidationFeed

    opts = FeedOptions(SHAPE, batch_size=10, shard=0, shard_count=1, cache=cache, reader_threads=1)
    with split_dataset(split_url, opts, endless=True) as train, ValidationFeed(split_url, opts).one_pass() as val:
        for ds in (train, val):
            assert ds.options().autotune.enabled is False
            assert len(list(ds.take(2))) == 2


def test_cache_budget_counts_one_workers_share_of_raw_pixels():
    # Fashion-MNIST train: 54,000 x 784 bytes = 40.4 MiB in all, 20.2 MiB per worker of 2
    assert cache_shard(54_000, 2, (28, 28, 1), cache_mb=21)
    assert not cache_shard(54_000, 2, (28, 28, 1), cache_mb=20)
    assert cache_shard(54_000, 1, (28, 28, 1), cache_mb=41)
    assert not cache_shard(54_000, 2, (28, 28, 1), cache_mb=0)


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


@pytest.mark.parametrize("cache", [False, True])
def test_class_weights_weigh_each_example_by_its_label(split_url, cache):
    weights = tuple(float(k + 1) for k in range(10))
    opts = FeedOptions(SHAPE, batch_size=25, shard=0, shard_count=1, class_weights=weights, reader_threads=1,
                       cache=cache)
    with split_dataset(split_url, opts, endless=True) as ds:
        for _, y, w in ds.take(4):
            assert np.allclose(w.numpy(), np.asarray(weights)[y.numpy()])


def test_without_class_weights_every_example_weighs_one(split_url):
    opts = FeedOptions(SHAPE, batch_size=25, shard=0, shard_count=1, reader_threads=1, cache=True)
    with split_dataset(split_url, opts, endless=True) as ds:
        _, _, w = next(iter(ds))
    assert np.all(w.numpy() == 1.0)


@pytest.mark.parametrize("cache", [False, True])
def test_augmentation_moves_each_training_image_its_own_way_and_never_a_validation_image(tmp_path, cache):
    """Row i's image is one bright pixel at (i % 8, 3) of an 8x8 image: augmented batches keep the shape and dtype
    but move the pixel (Keras' RandomTranslation by up to 2 px, RandomFlip), each image by its own offset within one
    batch; validation images are never augmented."""
    shape = (8, 8, 1)
    root = tmp_path / "train"
    root.mkdir()
    pixels = np.zeros((64, 8, 8, 1), np.uint8)
    pixels[np.arange(64), np.arange(64) % 8, 3, 0] = 255
    pq.write_table(pa.table({"image": pa.array([p.tobytes() for p in pixels], pa.binary()),
                             "label": pa.array(np.arange(64) % 8, pa.int64())}), root / "part-0.parquet",
                   row_group_size=16)
    aug = AugmentConfig(translate=0.25, flip="horizontal", rotate=0.0, zoom=0.0, brightness=0.0, contrast=0.0)
    opts = FeedOptions(shape, batch_size=16, shard=0, shard_count=1, augment=aug, reader_threads=1, cache=cache)
    moved, offsets_per_batch = 0, []
    with split_dataset(root.as_uri(), opts, endless=True) as ds:
        for x, y, _ in ds.take(8):
            x, y = x.numpy(), y.numpy()
            assert x.shape == (16, 8, 8, 1) and x.dtype == np.uint8
            assert x.max() == 255
            moved += sum(not x[i, y[i], 3, 0] for i in range(16))  # no longer where the label says it was
            spots = {i: np.argwhere(x[i, :, :, 0] == 255) for i in range(16)}  # a pixel shifted out may be gone
            offsets_per_batch.append(len({(spot[0][0] - y[i], spot[0][1]) for i, spot in spots.items() if len(spot)}))
    assert moved > 8 * 16 // 3
    assert min(offsets_per_batch) > 2  # one shared offset per batch would give 1
    with split_dataset(root.as_uri(), opts, endless=False) as ds:
        for x, y, _ in ds:
            x, y = x.numpy(), y.numpy()
            assert all(x[i, y[i], 3, 0] == 255 for i in range(len(y)))
