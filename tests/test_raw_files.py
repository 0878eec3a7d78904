"""The shared raw-file reader: folder and glob listings, the decode spec from config, decoding on the executors."""
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pyspark.sql import functions as F

from pipelines.errors import PipelineError
from pipelines.images import EMPTY_FILE, NOT_AN_IMAGE
from pipelines.raw_files import (MISSING_FILE, RAW_SCHEMA, decode_batches, decode_candidates, decode_tasks, image_spec,
                                 list_files, list_folder, list_glob)
from tests.fixtures import photo


@pytest.fixture
def tree(tmp_path):
    """ROOT/<label>/ with two photos, a nested one, an empty file, a text file, a hidden file and a loose photo."""
    root = tmp_path / "photos"
    for rel in ("cat/a.jpg", "cat/nested/b.png", "dog/c.jpg", "loose.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        photo("chelsea").resize((40, 30)).save(root / rel)
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / ".hidden.jpg").write_bytes(b"x")
    return root


def test_a_folder_lists_images_with_labels_from_the_first_folder_and_counts_what_it_skipped(spark, tree):
    listing = list_folder(spark, str(tree))
    got = {r["path"].split("photos/", 1)[1]: r["label"] for r in listing.rows.select("path", "label").collect()}
    assert got == {"cat/a.jpg": "cat", "cat/nested/b.png": "cat", "dog/c.jpg": "dog", "dog/empty.jpg": "dog",
                   "loose.jpg": None}
    assert listing.skipped == {"hidden": 1, "not_image_extension": 1} and listing.files == 5
    assert listing.rows.schema == RAW_SCHEMA


def test_a_folder_listing_follows_linked_folders_once_and_keeps_odd_names(spark, tmp_path, tree):
    elsewhere = tmp_path / "elsewhere" / "x"
    elsewhere.mkdir(parents=True)
    photo("chelsea").resize((8, 6)).save(elsewhere / "a b%41#.jpg")
    (tree / "bird").symlink_to(elsewhere.parent)   # a label folder that is a link, as Spark's own listing follows
    (tree / "cat" / "nested" / "up").symlink_to(tree)  # a link back up: walked once, not forever
    listing = list_folder(spark, str(tree))
    paths = {r["path"]: r["label"] for r in listing.rows.select("path", "label").collect()}
    assert paths[f"file:{tree}/bird/x/a b%41#.jpg"] == "bird" and len(paths) == 6 == listing.files
    assert listing.skipped == {"hidden": 1, "not_image_extension": 1}


def test_a_missing_folder_is_one_clear_error(spark, tmp_path):
    with pytest.raises(PipelineError, match="image folder not found"):
        list_folder(spark, str(tmp_path / "nowhere"))


def test_a_glob_lists_the_matching_images_without_labels(spark, tree):
    rows = list_glob(spark, str(tree / "*" / "*.jpg"))
    got = sorted(r["path"].split("photos/", 1)[1] for r in rows.where("label is null").select("path").collect())
    assert got == ["cat/a.jpg", "dog/c.jpg"]  # binaryFile skips empty files; a folder listing adds them back
    assert list_files(spark, str(tree)).count() == 5 and list_files(spark, str(tree / "cat" / "*.jpg")).count() == 1


def test_the_decode_spec_comes_from_ingest_image_or_a_models_input_shape(cfg_factory):
    cfg = cfg_factory("ingest.image.resize_policy=pad", "ingest.image.background=[0, 0, 0]", "ingest.max_pixels=99")
    assert image_spec(cfg).shape == (28, 28, 1)
    spec = image_spec(cfg, (64, 48, 3))
    assert spec.shape == (64, 48, 3) and spec.resize_policy == "pad" and spec.background == (0, 0, 0)
    assert spec.max_pixels == 99


def test_decoding_gives_pixels_and_sums_or_a_quarantine_reason(tmp_path, cfg_factory):
    png = io.BytesIO()
    Image.fromarray(np.full((10, 10, 3), 255, np.uint8)).save(png, "PNG")
    on_disk = tmp_path / "white.png"
    on_disk.write_bytes(png.getvalue())
    batch = pd.DataFrame({"path": [f"file:{on_disk}", "mem.png", "gone.png", "bad.png", "empty.png"],
                          "label": ["a", "a", "b", "b", "b"], "source_split": None,
                          "content": [None, png.getvalue(), None, b"not an image", b""],
                          "raw_height": None, "raw_width": None})
    spec = image_spec(cfg_factory(), (4, 4, 1))
    (out,) = list(decode_batches(iter([batch]), spec))
    assert list(out["reason"]) == [None, None, MISSING_FILE, NOT_AN_IMAGE, EMPTY_FILE]
    assert out["image"][0] == bytes([255] * 16) == out["image"][1]  # read by the worker, or carried in the row
    assert out["pixel_sum"][0] == [16.0] and out["pixel_sumsq"][0] == [16.0]
    assert out["content_hash"][0] == out["content_hash"][1] and out["content_hash"][2] is None


def test_candidates_decode_on_the_executors(spark, tree, cfg_factory):
    rows = list_folder(spark, str(tree)).rows
    decoded = decode_candidates(rows, image_spec(cfg_factory(), (16, 16, 3)))
    reasons = {r["reason"]: r["n"] for r in decoded.groupBy("reason").count().withColumnRenamed("count", "n").collect()}
    assert reasons == {None: 4, EMPTY_FILE: 1}
    assert decoded.where("reason is null").selectExpr("min(length(image))", "max(length(image))").first() == (768, 768)


def test_decode_tasks_fill_every_slot_and_hold_about_five_thousand_files_each():
    assert decode_tasks(10_000, 2) == 2 and decode_tasks(10_001, 2) == 4      # one per slot, then another round
    assert decode_tasks(160_000, 2) == 32 and decode_tasks(10_000_000, 16) == 2_000
    assert decode_tasks(300, 2) == 2 == decode_tasks(0, 2)
    assert decode_tasks(None, 3) == 12                                         # a table of paths: count unknown
    assert all(decode_tasks(n, 3) % 3 == 0 for n in (0, 700, 5_000, 90_000))
    assert all(n / decode_tasks(n, 3) <= 5_000 for n in (700, 15_001, 90_000, 1_234_567))


def test_a_folder_of_unequal_files_is_decoded_in_tasks_of_equal_file_counts(spark, tmp_path, monkeypatch):
    """Spark packs files into scan tasks by bytes, largest first, and a listing built on the driver comes in one slice
    per slot: here either way the tasks would not be the six of about 200 files asked for."""
    import pipelines.raw_files as raw_files

    monkeypatch.setattr(raw_files, "FILES_PER_TASK", 200)
    root = tmp_path / "sizes"
    for i in range(1200):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 3}" / f"{i}.jpg").write_bytes(b"x" * (200_000 if i < 100 else 100))
    rows = list_folder(spark, str(root)).rows
    counts = [r["count"] for r in rows.groupBy(F.spark_partition_id()).count().collect()]
    assert len(counts) == decode_tasks(1200, spark.sparkContext.defaultParallelism) == 6
    assert min(counts) > 0.7 * 200 and max(counts) < 1.3 * 200
