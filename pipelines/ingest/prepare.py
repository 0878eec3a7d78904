"""DataFrame transforms after decoding: labels, duplicates, splits, class balance and pixel statistics."""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from pipelines.images import LABEL_CONFLICT, UNKNOWN_LABEL


REPEATED_HASHES_TO_DRIVER = 20_000


@dataclass(frozen=True)
class Deduped:
    unique: DataFrame        # valid rows, one per content
    conflicts: DataFrame     # same content under different labels: every copy, reason label_conflict
    duplicates: DataFrame    # extra copies under the same label: path, kept_path, content_hash, label


def mark_unknown_labels(decoded: DataFrame, allowed: list[str] | None) -> DataFrame:
    """Valid rows without a label (or outside the allow-list) get reason unknown_label."""
    bad = F.col("label").isNull() | (F.col("label") == "")
    if allowed:
        bad = bad | ~F.col("label").isin(*allowed)
    detail = F.when(F.col("label").isNull(), F.lit("no label folder")).otherwise(
        F.concat(F.lit("label '"), F.col("label"), F.lit("' is not in ingest.source.label_names")))
    is_valid = F.col("reason").isNull()
    return (decoded
            .withColumn("detail", F.when(is_valid & bad, detail).otherwise(F.col("detail")))
            .withColumn("reason", F.when(is_valid & bad, F.lit(UNKNOWN_LABEL)).otherwise(F.col("reason"))))


def dedupe(valid: DataFrame) -> Deduped:
    """Identical content under one label is kept once (a source's own test copy first); under two labels it
    is a label_conflict and every copy is quarantined.

    Only rows whose content hash occurs more than once go through the ranking windows. Finding them shuffles
    hashes, not pixels, and up to REPEATED_HASHES_TO_DRIVER of them (hashes only) come back to the driver, so a
    source with few duplicates never moves its images between executors.
    """
    repeated_hashes = valid.groupBy("content_hash").count().where(F.col("count") > 1).select("content_hash")
    few = [r["content_hash"] for r in repeated_hashes.limit(REPEATED_HASHES_TO_DRIVER + 1).collect()]
    if len(few) <= REPEATED_HASHES_TO_DRIVER:  # the usual case: a handful of hashes, filtered in place
        is_repeated = F.col("content_hash").isin(*few) if few else F.lit(False)
        repeated, once = valid.where(is_repeated), valid.where(~is_repeated)
    else:  # heavily duplicated sources: a semi/anti join instead
        repeated = valid.join(repeated_hashes, "content_hash", "left_semi")
        once = valid.join(repeated_hashes, "content_hash", "left_anti")
    by_hash = Window.partitionBy("content_hash")
    keep_order = by_hash.orderBy(F.when(F.col("source_split") == "test", 0).otherwise(1), "path")
    ranked = (repeated
              .withColumn("_labels", F.size(F.collect_set("label").over(by_hash)))
              .withColumn("_rank", F.row_number().over(keep_order))
              .withColumn("_kept_path", F.first("path").over(keep_order)))
    conflicts = (ranked.where(F.col("_labels") > 1)
                 .withColumn("reason", F.lit(LABEL_CONFLICT))
                 .withColumn("detail", F.lit("the same content appears under different labels")))
    clean = ranked.where(F.col("_labels") == 1)
    kept = clean.where(F.col("_rank") == 1).drop("_labels", "_rank", "_kept_path")
    duplicates = (clean.where(F.col("_rank") > 1)
                  .select("path", F.col("_kept_path").alias("kept_path"), "content_hash", "label"))
    return Deduped(once.unionByName(kept.select(*once.columns)), conflicts.drop("_labels", "_rank", "_kept_path"),
                   duplicates)


NO_CUT = "~"  # sorts after every hex digest: "no row of this class starts the next split"


@dataclass(frozen=True)
class ClassTotals:
    n: int               # rows
    sums: list[float]    # per channel: sum of pixel values scaled to [0, 1]
    sumsqs: list[float]  # per channel: sum of their squares


@dataclass(frozen=True)
class SplitPlan:
    cuts: dict[str, tuple[str, str]]             # label -> (first content hash of validation, of train)
    totals: dict[tuple[str, str], ClassTotals]  # (split, label) -> its rows and per-channel pixel sums
    per_label: dict[str, int]                    # label -> unique rows, those `kept` leaves out included


def plan_splits(unique: DataFrame, validation: float, test: float, has_own_test: bool, channels: int,
                kept: F.Column | None = None) -> SplitPlan:
    """Class-stratified splits from the content hash and what each (split, class) will hold, in one window and
    aggregate over hashes, labels and per-image sums (no pixels move).

    Within each class rows are ordered by content hash and ranked (percent_rank); the first `test` fraction is
    test, the next `validation` fraction validation, the rest train. Rows a source marked as its own test set
    stay test, ranked apart, and when the source lists one (`has_own_test`) `test` is not taken from the rest. Two
    cut hashes per class come back to the driver, for assign_splits to label rows in place. The totals count the
    rows `kept` keeps (a condition on `split`, `id` and `label`: ingest.skew_classes), the cuts and per_label all.
    `unique` is dedupe's output, or unique_per_hash of its input (the same plan, sooner)."""
    own, q = F.col("_own"), F.col("_q")
    test = 0.0 if has_own_test else test
    ranked = (unique.withColumn("_own", F.coalesce(F.col("source_split") == "test", F.lit(False)))
              .withColumn("_q", F.percent_rank().over(Window.partitionBy("label", "_own").orderBy("content_hash")))
              .withColumn("split", F.when(own | (q < test), "test").when(q < test + validation, "validation")
                          .otherwise("train")))
    keep = F.lit(True) if kept is None else kept
    aggs = [F.min(F.when(~own, F.col("content_hash"))).alias("first"), F.count(F.when(keep, 1)).alias("n"),
            F.count(F.lit(1)).alias("rows")]
    for c in range(channels):
        aggs += [F.sum(F.when(keep, F.col("pixel_sum").getItem(c))).alias(f"s{c}"),
                 F.sum(F.when(keep, F.col("pixel_sumsq").getItem(c))).alias(f"q{c}")]
    # grouped by the window's own keys too, so the window's partitions serve the aggregate (no second shuffle); a
    # class's own-test and ranked rows are added up here
    rows = merged_by_split_and_label(ranked.groupBy("label", "_own", "split").agg(*aggs).collect(), channels)
    first = {(r["split"], r["label"]): r["first"] for r in rows}
    def cut(label: str, *splits: str) -> str:  # the first hash of any of `splits` in this class
        return min((first[s, label] for s in splits if first.get((s, label))), default=NO_CUT)
    cuts = {label: (cut(label, "validation", "train"), cut(label, "train")) for label in {r["label"] for r in rows}}
    totals = {(r["split"], r["label"]): ClassTotals(int(r["n"]), [r[f"s{c}"] or 0.0 for c in range(channels)],
                                                    [r[f"q{c}"] or 0.0 for c in range(channels)])
              for r in rows if r["n"]}
    per_label: dict[str, int] = {}
    for r in rows:
        per_label[r["label"]] = per_label.get(r["label"], 0) + int(r["rows"])
    return SplitPlan(cuts, totals, per_label)


def merged_by_split_and_label(rows: list, channels: int) -> list[dict]:
    """plan_splits' aggregate rows, one per (label, own test or not, split), added up per (split, label): the first
    hash is the smaller, counts and sums add (Spark's sum over no rows is None, counted as 0)."""
    sums = [f"{k}{c}" for c in range(channels) for k in "sq"]
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        m = out.setdefault((r["split"], r["label"]), {"split": r["split"], "label": r["label"], "first": None,
                                                      **{key: 0 for key in ("n", "rows", *sums)}})
        m["first"] = min((h for h in (m["first"], r["first"]) if h is not None), default=None)
        for key in ("n", "rows", *sums):
            m[key] += r[key] or 0
    return list(out.values())


def row_id() -> F.Column:
    """A row's id: the first 32 hex digits of its content hash (so a rerun gives every image the same id)."""
    return F.substring("content_hash", 1, 32)


def unique_per_hash(valid: DataFrame) -> DataFrame:
    """What dedupe keeps, as plan_splits reads it, in one aggregate with no ranking window, so the plan need not
    wait for dedupe: a row per content hash found under a single label, with that label, id, source_split 'test' when
    any copy is the source's own test row (dedupe keeps that copy) and the per-image sums (copies share them: the
    same bytes decode to the same pixels)."""
    own_test = F.when(F.col("source_split") == "test", F.lit("test"))
    return (valid.groupBy("content_hash")
            .agg(F.min("label").alias("label"), F.max("label").alias("_last"), F.max(own_test).alias("source_split"),
                 F.first("pixel_sum").alias("pixel_sum"), F.first("pixel_sumsq").alias("pixel_sumsq"))
            .where(F.col("label") == F.col("_last")).drop("_last")
            .withColumn("id", row_id()))


def assign_splits(unique: DataFrame, cuts: dict[str, tuple[str, str]]) -> DataFrame:
    """Each row's split (see plan_splits), by comparing its content hash with its class's cut hashes in place: no
    job, no pixels shuffled."""
    cut_map = lambda i: F.create_map(*[x for label, c in cuts.items() for x in (F.lit(label), F.lit(c[i]))])  # noqa: E731
    h = F.col("content_hash")
    split = (F.when(F.col("source_split") == "test", "test")
             .when(h < cut_map(0).getItem(F.col("label")), "test")
             .when(h < cut_map(1).getItem(F.col("label")), "validation")
             .otherwise("train"))
    return unique.withColumn("split", split)


def class_weights(counts: dict[str, int], label_ids: dict[str, int]) -> dict[int, float]:
    """Balanced weights n / (k * n_c): the usual loss weighting for imbalanced classes."""
    total, k = sum(counts.values()), len(label_ids)
    return {label_ids[name]: (total / (k * counts[name]) if counts.get(name) else 0.0) for name in label_ids}


def skew_kept(classes: list[str], fraction: float) -> F.Column:
    """Whether a row stays when only `fraction` of the training rows of `classes` are kept (a deliberately imbalanced
    split for the FAQ's class imbalance question), chosen by content hash so a rerun keeps the same rows; other
    splits are untouched. Uses the columns split, id and label (its name)."""
    # a hash of its own: the split itself was drawn from the content hash, so its digits are not uniform within a split
    keep = F.pmod(F.xxhash64("id", F.lit("skew")), F.lit(1_000_000)) < fraction * 1_000_000
    cut = (F.col("split") == "train") & F.col("label").isin(classes)
    return ~cut | keep


def oversample(train: DataFrame, counts: dict[str, int]) -> DataFrame:
    """Repeat minority-class rows (keyed by `label_name`) until every class has about as many rows as the largest.

    Copy j of a row gets id '<id>~<j>'; which rows get the one extra copy is decided by content hash,
    so the result is deterministic.
    """
    target = max(counts.values())
    factor = F.create_map(*[x for name, n in counts.items() for x in (F.lit(name), F.lit(target / n))])
    f = factor.getItem(F.col("label_name"))
    frac = F.conv(F.substring("content_hash", 1, 8), 16, 10).cast("double") / F.lit(float(16 ** 8))
    copies = (F.floor(f) + F.when(frac < (f - F.floor(f)), 1).otherwise(0)).cast("int")
    out = train.withColumn("_copy", F.explode(F.sequence(F.lit(0), copies - 1)))
    return (out.withColumn("id", F.when(F.col("_copy") == 0, F.col("id"))
                           .otherwise(F.concat(F.col("id"), F.lit("~"), F.col("_copy").cast("string"))))
            .drop("_copy"))


def channel_stats(totals: list[ClassTotals], pixels_per_image: int, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels scaled to [0, 1] over the rows that `totals` count."""
    n = sum(t.n for t in totals) * pixels_per_image
    if not n:
        return [0.0] * channels, [1.0] * channels
    means = [sum(t.sums[c] for t in totals) / n for c in range(channels)]
    stds = [max(sum(t.sumsqs[c] for t in totals) / n - means[c] ** 2, 0.0) ** 0.5 for c in range(channels)]
    return means, stds
