"""Dedupe and split transforms on small hand-built DataFrames (hashes and labels, no pixels needed)."""
from __future__ import annotations

import hashlib
import random

from pyspark.sql import Window
from pyspark.sql import functions as F

from pipelines.ingest import prepare


def rows_frame(spark, rows):
    return spark.createDataFrame(rows, "path string, label string, source_split string, content_hash string")


def digest(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_both_dedupe_paths_agree(spark, monkeypatch):
    rng = random.Random(3)
    rows = [(f"/d/{i}.png", f"c{i % 3}", "test" if i % 7 == 0 else None, digest(i)) for i in range(60)]
    rows += [(f"/d/copy{i}.png", f"c{i % 3}", None, digest(i)) for i in range(0, 20, 2)]   # same label: duplicates
    rows += [(f"/d/clash{i}.png", "c9", None, digest(i)) for i in range(1, 12, 5)]          # other label: conflicts
    rng.shuffle(rows)
    df = rows_frame(spark, rows)

    def outcome():
        d = prepare.dedupe(df)
        return (sorted(r["path"] for r in d.unique.collect()), sorted(r["path"] for r in d.conflicts.collect()),
                sorted((r["path"], r["kept_path"]) for r in d.duplicates.collect()))

    in_place = outcome()
    monkeypatch.setattr(prepare, "REPEATED_HASHES_TO_DRIVER", 2)  # force the join path
    assert outcome() == in_place
    unique, conflicts, duplicates = in_place
    assert len(unique) + len(conflicts) + len(duplicates) == len(rows)
    assert len(conflicts) == 7 and len(duplicates) == 9  # content 6 has a same-label copy and a clash: 3 quarantined
    assert ("/d/copy0.png", "/d/0.png") in duplicates  # the source's own test copy is the one kept


def test_the_plan_from_dedupes_input_is_the_plan_from_its_output(spark):
    """unique_per_hash lets the plan run beside dedupe: it must see exactly the rows, labels, own-test marks and
    per-image sums that dedupe keeps."""
    rng = random.Random(4)
    rows = [(f"/d/{i}.png", f"c{i % 3}", "test" if i % 7 == 0 else None, digest(i)) for i in range(90)]
    rows += [(f"/d/copy{i}.png", f"c{i % 3}", None, digest(i)) for i in range(0, 30, 2)]   # duplicates, some of test rows
    rows += [(f"/d/clash{i}.png", "c9", None, digest(i)) for i in range(1, 20, 5)]          # conflicts
    rng.shuffle(rows)
    sums = F.array(F.conv(F.substring("content_hash", 1, 4), 16, 10).cast("double"))  # the same for every copy
    df = rows_frame(spark, rows).withColumn("pixel_sum", sums).withColumn("pixel_sumsq", sums)
    dedupe_kept = prepare.dedupe(df).unique.withColumn("id", prepare.row_id())
    skew = prepare.skew_kept(["c1"], 0.5)
    for own_test, kept in ((True, None), (False, skew)):
        before = prepare.plan_splits(prepare.unique_per_hash(df), 0.2, 0.1, own_test, 1, kept)
        after = prepare.plan_splits(dedupe_kept, 0.2, 0.1, own_test, 1, kept)
        assert before == after
    counted = {r["label"]: r["count"] for r in dedupe_kept.groupBy("label").count().collect()}
    assert before.per_label == counted and sum(counted.values()) == 90 - 4  # four contents clash
    assert sum(t.n for t in before.totals.values()) < sum(counted.values())  # the skew condition left some out


def test_split_cuts_match_a_percent_rank_over_every_row(spark):
    rows = [(f"/d/{i}.png", f"c{i % 4}", None, digest(i)) for i in range(403)]
    df = rows_frame(spark, rows)
    plan = prepare.plan_splits(df, 0.15, 0.2, has_own_test=False, channels=0)
    got = {r["path"]: r["split"] for r in prepare.assign_splits(df, plan.cuts).collect()}
    q = F.percent_rank().over(Window.partitionBy("label").orderBy("content_hash"))
    ref = df.withColumn("_q", q).withColumn(
        "split", F.when(F.col("_q") < 0.2, "test").when(F.col("_q") < 0.35, "validation").otherwise("train"))
    assert got == {r["path"]: r["split"] for r in ref.collect()}
    counts = {}
    for path, split in got.items():
        label = f"c{int(path.split('/')[-1].split('.')[0]) % 4}"
        counts[(split, label)] = counts.get((split, label), 0) + 1
    assert {k: t.n for k, t in plan.totals.items()} == counts  # the plan's totals are what the cuts assign
    for label in ("c0", "c1", "c2", "c3"):  # stratified: every class split about 20/15/65
        total = sum(v for (_, lab), v in counts.items() if lab == label)
        assert abs(counts[("test", label)] - 0.2 * total) <= 1.5
        assert abs(counts[("validation", label)] - 0.15 * total) <= 1.5
    assert len(got) == 403


def test_a_source_with_its_own_test_set_keeps_it(spark):
    rows = [(f"/d/{i}.png", f"c{i % 2}", "test" if i < 10 else None, digest(i)) for i in range(50)]
    df = rows_frame(spark, rows)
    plan = prepare.plan_splits(df, 0.1, 0.3, has_own_test=True, channels=0)
    assert plan.per_label == {"c0": 25, "c1": 25}
    got = {r["path"]: r["split"] for r in prepare.assign_splits(df, plan.cuts).collect()}
    assert {p for p, s in got.items() if s == "test"} == {f"/d/{i}.png" for i in range(10)}
    assert sum(s == "validation" for s in got.values()) in (4, 5, 6)
    assert sum(t.n for (s, _), t in plan.totals.items() if s == "test") == 10


def test_the_plan_counts_every_class_and_gives_the_training_split_statistics(spark):
    import numpy as np

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(40, 6, 3)).astype(np.float64) / 255  # 40 images of 6 pixels, 3 channels
    rows = [(f"/d/{i}.png", f"c{i % 3}", "test" if i % 4 == 0 else None, digest(i), images[i].sum(0).tolist(),
             (images[i] ** 2).sum(0).tolist()) for i in range(40)]
    df = spark.createDataFrame(rows, "path string, label string, source_split string, content_hash string, "
                                     "pixel_sum array<double>, pixel_sumsq array<double>")
    totals = prepare.plan_splits(df, 0.0, 0.5, has_own_test=True, channels=3).totals  # own test set: the rest trains
    split = ["test" if i % 4 == 0 else "train" for i in range(40)]
    assert {k: t.n for k, t in totals.items()} == {
        (s, f"c{c}"): sum(1 for i in range(40) if split[i] == s and i % 3 == c) for s in ("train", "test") for c in range(3)}
    mean, std = prepare.channel_stats([t for (s, _), t in totals.items() if s == "train"], 6, 3)
    train = images[[i for i in range(40) if split[i] == "train"]].reshape(-1, 3)
    assert np.allclose(mean, train.mean(0)) and np.allclose(std, train.std(0))
    assert prepare.channel_stats([], 6, 3) == ([0.0] * 3, [1.0] * 3)


def test_a_skew_condition_leaves_the_cuts_and_counts_only_the_rows_it_keeps(spark):
    rows = [(f"/d/{i}.png", f"c{i % 2}", None, digest(i)) for i in range(400)]
    df = rows_frame(spark, rows).withColumn("id", F.substring("content_hash", 1, 32))
    plain = prepare.plan_splits(df, 0.1, 0.1, False, 0)
    skewed = prepare.plan_splits(df, 0.1, 0.1, False, 0, prepare.skew_kept(["c1"], 0.25))
    assert skewed.cuts == plain.cuts
    n = lambda plan, key: plan.totals[key].n  # noqa: E731
    assert n(skewed, ("train", "c0")) == n(plain, ("train", "c0")) and n(skewed, ("test", "c1")) == n(plain, ("test", "c1"))
    kept = prepare.assign_splits(df, plain.cuts).where(prepare.skew_kept(["c1"], 0.25))
    assert n(skewed, ("train", "c1")) == kept.where("split = 'train' and label = 'c1'").count() < 0.4 * n(plain, ("train", "c1"))
