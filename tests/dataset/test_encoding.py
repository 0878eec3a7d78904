"""Encoded storage (ingest.storage encoded): photos ingested as PNG come out of the training feed and out of
evaluation's and inference's decoding as exactly the pixels a `pixels` ingest stores; JPEG comes out as its decoder
gives it, in far fewer bytes."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from pipelines.dataset.contract import resolve_dataset
from pipelines.dataset.encoding import decode_one, encode_pixels, with_pixels
from pipelines.ingest.job import run_ingest
from pipelines.train.data import FeedOptions, read_shard, split_dataset
from tests.fixtures import build_photo_classes

SHAPE = (40, 40, 3)


def test_png_round_trips_exactly_and_jpeg_closely():
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(0, 3, SHAPE), axis=1).clip(0, 255).astype(np.uint8)  # photo-like gradients
    for shape, pixels in ((SHAPE, smooth), ((40, 40, 1), smooth[:, :, :1].copy())):
        png = decode_one(tf.constant(encode_pixels(pixels.tobytes(), shape, "png", 90)), shape).numpy()
        assert np.array_equal(png, pixels)
        jpeg = decode_one(tf.constant(encode_pixels(pixels.tobytes(), shape, "jpeg", 95)), shape).numpy()
        assert jpeg.shape == shape and np.abs(jpeg.astype(int) - pixels).mean() < 3


@pytest.fixture(scope="module")
def three_storages(spark, tmp_path_factory):
    from tests.conftest import make_config

    root = tmp_path_factory.mktemp("encoding")
    build_photo_classes(root / "photos", per_class=8)
    versions = {}
    for storage, fmt in (("pixels", "png"), ("encoded", "png"), ("encoded", "jpeg")):
        cfg = make_config(root, f"ingest.name={storage}_{fmt}", "ingest.source.type=folder",
                          f"ingest.source.path={root / 'photos'}", "ingest.image.height=40", "ingest.image.width=40",
                          "ingest.image.channels=3", "ingest.files_per_split=1", "ingest.row_group_rows=4",
                          f"ingest.storage={storage}", f"ingest.encoding.format={fmt}")
        out = run_ingest(spark, cfg)
        versions[f"{storage}_{fmt}"] = resolve_dataset(f"{root}/datasets", out["dataset"])
    return versions


def stored_images(ds, split="train") -> dict[str, bytes]:
    table = pq.read_table(ds.split_path(split), columns=["id", "image"])  # test-sized data, read here
    return dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))


@pytest.mark.parametrize("cache", [True, False])
def test_the_feed_decodes_png_to_the_exact_pixels_and_jpeg_as_its_decoder_does(three_storages, cache):
    raw, png, jpeg = (three_storages[k] for k in ("pixels_png", "encoded_png", "encoded_jpeg"))
    assert png.manifest().encoded and not raw.manifest().encoded
    assert raw.manifest().digest != png.manifest().digest != jpeg.manifest().digest  # never "unchanged" across
    feeds = {}
    for name, ds in (("raw", raw), ("png", png), ("jpeg", jpeg)):
        opts = FeedOptions(SHAPE, batch_size=4, shard=0, shard_count=1, reader_threads=1, cache=cache,
                           encoded=ds.manifest().encoded)
        if cache:
            pixels, _ = read_shard(ds.split_path("train").as_uri(), opts)
            feeds[name] = pixels.numpy()
        else:
            with split_dataset(ds.split_path("validation").as_uri(), opts, endless=False) as batches:
                feeds[name] = np.concatenate([x.numpy() for x, _, _ in batches])
    split = "train" if cache else "validation"
    ordered = {name: sorted(p.tobytes() for p in pixels) for name, pixels in feeds.items()}
    assert ordered["png"] == ordered["raw"] == sorted(stored_images(raw, split).values())
    decoded = sorted(decode_one(tf.constant(b), SHAPE).numpy().tobytes() for b in stored_images(jpeg, split).values())
    assert ordered["jpeg"] == decoded
    jpeg_bytes = sum(map(len, stored_images(jpeg).values()))
    assert jpeg_bytes < sum(map(len, stored_images(raw).values())) / 2  # 40x40: the headers weigh; 224: README


def test_evaluation_and_inference_see_the_pixels_the_feed_sees(spark, three_storages):
    raw, png = three_storages["pixels_png"], three_storages["encoded_png"]
    df = with_pixels(spark.read.parquet(png.split_path("test").as_uri()), png.manifest())
    joined = df.alias("p").join(spark.read.parquet(raw.split_path("test").as_uri()).alias("r"), "id")
    assert joined.count() == png.manifest().count("test") > 0
    assert joined.where("p.image != r.image").count() == 0  # compared on the executors
