"""`sparkvision ingest`: raw images -> validated, normalized, versioned Parquet dataset."""
from __future__ import annotations

import functools
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.config import Config, ConfigError, IngestConfig
from pipelines.console import say, step
from pipelines.dataset.encoding import ENCODED_SIZE_FRACTION, encoded_column
from pipelines.dataset.contract import SPLIT_COLUMNS, SPLITS, dataset_root, file_inventory
from pipelines.errors import PipelineError, root_cause
from pipelines.images import ImageSpec
from pipelines.ingest import prepare, sources
from pipelines.ingest.publish import Staging, parquet_row_groups, parquet_rows
from pipelines.progress import spark_task_progress
from pipelines.raw_files import decode_candidates, file_read_settings, image_spec
from pipelines.secrets import redacted_dict
from pipelines.spark import run_concurrently, scoped_conf
from pipelines.storage import check_writable

ROW_OVERHEAD_BYTES = 120  # id, label, paths and hash next to the pixels, for sizing row groups
SCRATCH = "_decoded"  # inside the staging folder: every candidate decoded once, removed before publishing
QUARANTINE_COLUMNS = ("path", "label", "reason", "detail", "content_hash")


def read_source(spark: SparkSession, cfg: Config) -> sources.Candidates:
    src = cfg.ingest.source
    if src.type == "idx":
        return sources.idx_source(spark, src.path, src.idx_label_names, max(2, cfg.spark.shuffle_partitions))
    if src.type == "folder":
        return sources.folder_source(spark, src.path)
    return sources.table_source(spark, src.path, src.path_column, src.label_column)


DIGEST_PARTS = 4  # the row hash's first 48 hex digits, as four sums of 12 digits each


@dataclass(frozen=True)
class SplitSummary:
    """One written split, read back: its rows, those that are not oversampled copies, and its digest sums."""
    rows: int
    originals: int
    sums: tuple[int, ...]


def split_summaries(union: DataFrame) -> dict[str, SplitSummary]:
    """split -> its rows, originals and the order-independent sums of a hash of (id, content, label, split) over its
    rows, in one aggregate over the written splits (a `split` column beside SPLIT_COLUMNS)."""
    h = F.sha2(F.concat_ws("|", "id", "content_hash", "label_name", "split"), 256)
    sums = [F.sum(F.conv(F.substring(h, 1 + 12 * i, 12), 16, 10).cast("decimal(38,0)")).alias(f"p{i}")
            for i in range(DIGEST_PARTS)]
    copies = F.col("id").contains("~")  # oversampled copies of a training row
    rows = union.groupBy("split").agg(F.count(F.lit(1)).alias("n"), F.count(F.when(~copies, 1)).alias("originals"),
                                      *sums).collect()
    return {r["split"]: SplitSummary(int(r["n"]), int(r["originals"]), tuple(int(r[f"p{i}"]) for i in range(DIGEST_PARTS)))
            for r in rows}


def content_digest(summaries: list[SplitSummary], spec: ImageSpec, label_names: list[str],
                   storage: str = "pixels") -> str:
    """Order-independent digest of (id, content, label, split) for every row of the splits summarized, plus shape,
    labels and how the images are stored."""
    n = sum(s.rows for s in summaries)
    sums = [sum(s.sums[i] for s in summaries) for i in range(DIGEST_PARTS)]
    text = f"{n}|{'|'.join(str(x) for x in sums)}|{spec.shape}|{','.join(label_names)}" + (f"|{storage}" if storage != "pixels" else "")
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass
class JobClock:
    """When the job started, and the seconds of each of its steps that has ended (the result's `step_seconds`: where
    a job's time goes, its fixed part included)."""
    started: float = field(default_factory=time.perf_counter)
    steps: dict[str, float] = field(default_factory=dict)

    def ended(self, name: str, info: dict[str, Any]) -> None:
        """Record a step that `console.step` timed (`info`: the dict it yielded)."""
        self.steps[name] = round(info["seconds"], 2)


def run_ingest(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    """Read the configured source, validate and normalize on the executors, publish a new dataset version."""
    files = cfg.ingest.source.type != "idx"
    settings = file_read_settings(cfg, spark.sparkContext.defaultParallelism) if files else {}
    with scoped_conf(spark, settings):
        return _ingest(spark, cfg)


def _ingest(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    clock = JobClock()
    spec = image_spec(cfg)
    ic = cfg.ingest
    check_writable(dataset_root(cfg.paths.datasets_root, ic.name), "paths.datasets_root")
    with step("ingest", f"listing {ic.source.type} source {ic.source.path}") as s:
        cand = read_source(spark, cfg)
        s["note"] = f"skipped {sum(cand.skipped.values())} non-image files" if cand.skipped else ""
    clock.ended("listing", s)

    allowed = ic.source.label_names if ic.source.type != "idx" else None
    staging = Staging(cfg.paths.datasets_root, ic.name)
    if staging.removed_stale:
        say("ingest", f"removed {staging.removed_stale} staging folder(s) left by a killed ingest of {ic.name}")
    try:
        return _decode_and_publish(spark, cfg, cand, spec, allowed, staging, clock)
    except BaseException:
        staging.discard()
        raise


def decode_to_scratch(spark: SparkSession, cand: sources.Candidates, spec: ImageSpec, allowed: list[str] | None,
                      staging: Staging) -> DataFrame:
    """Decode every candidate once on the executors into a scratch Parquet copy inside the staging folder, and read
    it back. Later passes (dedupe, splits, statistics, counts) read only the columns they need from it, so their
    cost does not grow with the pixels, as it would re-reading a cache spilled to disk; the final write reads the
    pixels once more."""
    decoded = prepare.mark_unknown_labels(decode_candidates(cand.rows, spec), allowed)
    (decoded.write.mode("error").option("compression", "none")
     .option("parquet.enable.dictionary#image", "false").parquet(staging.url(SCRATCH)))
    return spark.read.schema(decoded.schema).parquet(staging.url(SCRATCH))  # no job to read a footer for it


@dataclass
class Splits:
    """What the splitting step decided and measured, for writing and for the manifest."""
    assigned: DataFrame             # unique rows with split, label id and name
    rows: DataFrame                 # what to write: assigned, its training split oversampled when ingest.balance asks
    label_names: list[str]
    per_class: dict[tuple[str, str], int]
    train_counts: dict[str, int]
    left_out: int                   # training rows dropped by ingest.skew_classes
    weights: dict[int, float]
    mean: list[float]
    std: list[float]


def _decode_and_publish(spark: SparkSession, cfg: Config, cand: sources.Candidates, spec: ImageSpec,
                        allowed: list[str] | None, staging: Staging, clock: JobClock) -> dict[str, Any]:
    ic = cfg.ingest
    with step("ingest", "decoding and validating on the executors") as s, \
            spark_task_progress(spark, "ingest", "decoding"):
        decoded = decode_to_scratch(spark, cand, spec, allowed, staging)
        valid = decoded.where(F.col("reason").isNull())
        kept = prepare.skew_kept(ic.skew_classes, ic.skew_fraction) if ic.skew_classes else None
        # independent: submitted together (see run_concurrently); the plan reads what dedupe keeps from its input.
        # Decoding keeps a row per candidate, so a source that knows its count needs no job for it (verification
        # then checks that every one of them was written somewhere)
        seen, dd, plan = run_concurrently([
            (lambda: cand.count) if cand.count is not None else decoded.count, lambda: prepare.dedupe(valid),
            lambda: prepare.plan_splits(prepare.unique_per_hash(valid), ic.split.validation, ic.split.test,
                                        cand.own_test, spec.channels, kept)])
        if seen == 0:
            raise PipelineError(f"no image files found in {ic.source.path}")
        n_unique = sum(plan.per_label.values())
        if n_unique == 0:
            reasons = {r["reason"]: r["count"] for r in decoded.groupBy("reason").count().collect()}
            raise PipelineError(f"no valid image among the {seen} files in {ic.source.path} (quarantine reasons: {reasons})")
        s["note"] = f"{seen} images seen, {n_unique} unique and valid"
    clock.ended("decoding", s)
    with step("ingest", "splitting, balancing and computing statistics") as s:
        sp = split_and_measure(dd.unique.withColumn("id", prepare.row_id()), plan, kept, ic, spec, allowed)
        say("ingest", labels_found(sp.per_class, sp.label_names))
        s["note"] = "mean " + ", ".join(f"{m:.4f}" for m in sp.mean) + " std " + ", ".join(f"{v:.4f}" for v in sp.std)
    clock.ended("splitting", s)
    with step("ingest", f"writing Parquet to {staging.path.parent}") as s:
        quarantine = decoded.where(F.col("reason").isNotNull()).select(*QUARANTINE_COLUMNS).unionByName(
            dd.conflicts.select(*QUARANTINE_COLUMNS))
        write_version(staging, sp, quarantine, dd.duplicates, ic, spec, kept_all=seen == n_unique)
    clock.ended("writing", s)
    with step("ingest", "verifying the staged version") as s:
        manifest = verify_and_describe(spark, cfg, staging, spec, seen, cand, sp)
        s["note"] = (f"{manifest['counts']['rows']} rows + {manifest['counts']['quarantined']} quarantined + "
                     f"{manifest['counts']['duplicates_dropped']} duplicates = {seen} seen")
    clock.ended("verifying", s)
    version, unchanged = staging.publish_unless_same(manifest)

    path = dataset_root(cfg.paths.datasets_root, ic.name) / version
    took = time.perf_counter() - clock.started
    counts = manifest["counts"]
    say("ingest", f"{'unchanged, still' if unchanged else 'published'} {ic.name}/{version} at {path} "
                  f"(train {counts['splits']['train']}, validation {counts['splits']['validation']}, "
                  f"test {counts['splits']['test']}, quarantined {counts['quarantined']}) in {took:.1f}s")
    return {"stage": "ingest", "dataset": f"{ic.name}/{version}", "name": ic.name, "version": version,
            "path": str(path), "unchanged": unchanged, "content_digest": manifest["content_digest"],
            "counts": counts, "seconds": round(took, 1), "step_seconds": clock.steps}


def split_and_measure(unique: DataFrame, plan: prepare.SplitPlan, kept: F.Column | None, ic: IngestConfig,
                      spec: ImageSpec, allowed: list[str] | None) -> Splits:
    """Label ids, the planned class-stratified splits applied to the unique rows (`kept`: the skew condition the plan
    counted by), per-class counts, class weights and the training split's pixel statistics (no pixels move)."""
    present = sorted(plan.per_label)
    named = ic.source.idx_label_names if ic.source.type == "idx" else allowed
    label_names = [n for n in (named or present) if n in present] + sorted(set(present) - set(named or present))
    label_ids = {name: i for i, name in enumerate(label_names)}
    check_skew_classes(ic, label_names)
    assigned = labelled_splits(unique, label_names, plan.cuts, kept)
    per_class = {key: t.n for key, t in plan.totals.items()}
    train_counts = {name: per_class.get(("train", name), 0) for name in label_names}
    if sum(train_counts.values()) == 0:
        raise PipelineError("the training split is empty: lower ingest.split.validation / ingest.split.test")
    mean, std = prepare.channel_stats([t for (split, _), t in plan.totals.items() if split == "train"],
                                      spec.height * spec.width, spec.channels)
    rows = assigned
    if ic.balance == "oversample":
        train = prepare.oversample(assigned.where(F.col("split") == "train"), {k: v for k, v in train_counts.items() if v})
        rows = assigned.where(F.col("split") != "train").unionByName(train)
    return Splits(assigned, rows, label_names, per_class, train_counts,
                  sum(plan.per_label.values()) - sum(per_class.values()),
                  prepare.class_weights(train_counts, label_ids), mean, std)


def write_version(staging: Staging, sp: Splits, quarantine: DataFrame, duplicates: DataFrame, ic: IngestConfig,
                  spec: ImageSpec, kept_all: bool) -> None:
    """Write the splits (one job: the scratch copy's pixels are read once), quarantine and duplicates into the
    staging folder together, then drop the scratch copy. `kept_all`: every file seen became a row, so quarantine and
    duplicates are empty and are written from their schemas, without a job that scans the scratch copy for them."""
    row_group_bytes = ic.row_group_rows * (stored_bytes(ic, spec) + ROW_OVERHEAD_BYTES)
    splits = stored(sp.rows, ic, spec).select(*SPLIT_COLUMNS, "split")
    writes = [lambda: staging.write_parts(splits, "split", SPLITS, ic.files_per_split, row_group_bytes, sort_by="id")]
    if kept_all:
        staging.write_empty("quarantine", quarantine.schema)
        staging.write_empty("duplicates", duplicates.schema)
    else:
        writes += [lambda: staging.write(quarantine, "quarantine", 1), lambda: staging.write(duplicates, "duplicates", 1)]
    try:
        run_concurrently(writes)
    except Exception as exc:  # a full disk, a folder gone: the cause, not Spark's job-aborted wrapper
        raise PipelineError(f"writing the new version of {ic.name} under {staging.root} failed "
                            f"({root_cause(exc)}); nothing was published") from exc
    shutil.rmtree(staging.path / SCRATCH)  # not part of the version; nothing reads it after the writes


def storage_label(ic: IngestConfig) -> str:
    """'pixels', 'jpeg q90' or 'png': how the images are stored, for the digest and the manifest."""
    if ic.storage == "pixels":
        return "pixels"
    return f"jpeg q{ic.encoding.quality}" if ic.encoding.format == "jpeg" else "png"


def image_column_description(ic: IngestConfig, spec: ImageSpec) -> str:
    shape = f"{spec.height}x{spec.width}x{spec.channels}"
    if ic.storage == "pixels":
        return f"binary: uint8 pixels, row-major {shape}"
    return f"binary: one {ic.encoding.format.upper()} file per image, {shape} when decoded"


def stored_bytes(ic: IngestConfig, spec: ImageSpec) -> int:
    """About how many bytes one image takes in the Parquet files, for sizing row groups."""
    return spec.nbytes if ic.storage == "pixels" else int(spec.nbytes * ENCODED_SIZE_FRACTION[ic.encoding.format])


def stored(split: DataFrame, ic: IngestConfig, spec: ImageSpec) -> DataFrame:
    """Rows with the image column as ingest.storage keeps it (encoded on the executors)."""
    if ic.storage == "pixels":
        return split
    return split.withColumn("image", encoded_column("image", spec.shape, ic.encoding.format, ic.encoding.quality))


def labels_found(per_class: dict[tuple[str, str], int], label_names: list[str], shown: int = 20) -> str:
    """'3 labels: cat 120, coffee 98, space 41': images per label over all splits, the first `shown` labels."""
    totals = {name: sum(n for (_, label), n in per_class.items() if label == name) for name in label_names}
    listed = ", ".join(f"{name} {totals[name]}" for name in label_names[:shown])
    more = f", and {len(label_names) - shown} more" if len(label_names) > shown else ""
    return f"{len(label_names)} label{'s' if len(label_names) != 1 else ''}: {listed}{more}"


def check_skew_classes(ic: IngestConfig, label_names: list[str]) -> None:
    """ingest.skew_classes must name labels that were found."""
    unknown = sorted(set(ic.skew_classes or []) - set(label_names))
    if unknown:
        raise ConfigError(f"ingest.skew_classes: {', '.join(unknown)} not among the labels found "
                          f"({', '.join(label_names)})")


def labelled_splits(unique: DataFrame, label_names: list[str], cuts: dict[str, tuple[str, str]],
                    kept: F.Column | None) -> DataFrame:
    """Unique rows with their split, label id and name; only the rows `kept` keeps (ingest.skew_classes), when set."""
    id_map = F.create_map(*[x for i, name in enumerate(label_names) for x in (F.lit(name), F.lit(i))])
    split = prepare.assign_splits(unique, cuts)
    return ((split if kept is None else split.where(kept))
            .withColumn("label_name", F.col("label"))
            .withColumn("label", id_map.getItem(F.col("label_name")).cast("int"))
            .withColumnRenamed("path", "source_path"))


def verify_and_describe(spark: SparkSession, cfg: Config, staging: Staging, spec: ImageSpec, seen: int,
                        cand: sources.Candidates, sp: Splits) -> dict[str, Any]:
    """Read the staged output back, check `rows + quarantined + duplicates + left_out == seen` (left out: training
    rows that ingest.skew_classes dropped), build the manifest."""
    union = functools.reduce(DataFrame.unionByName, [staging.read(spark, split).withColumn("split", F.lit(split))
                                                     for split in SPLITS])
    # row counts from the written files' footers; reasons need a job only when something was quarantined
    quarantined, duplicates = parquet_rows(staging.path / "quarantine"), parquet_rows(staging.path / "duplicates")
    reasons_read = lambda: staging.read(spark, "quarantine").groupBy("reason").count().collect()  # noqa: E731
    summaries, reason_rows = run_concurrently([lambda: split_summaries(union),
                                               reasons_read if quarantined else lambda: []])
    split_counts = {split: summaries[split].rows if split in summaries else 0 for split in SPLITS}
    rows = sum(s.originals for s in summaries.values())
    digest = content_digest(list(summaries.values()), spec, sp.label_names, storage_label(cfg.ingest))
    reasons = {r["reason"]: int(r["count"]) for r in reason_rows}
    if rows + quarantined + duplicates + sp.left_out != seen:
        raise PipelineError(f"count invariant broken: {rows} rows + {quarantined} quarantined + {duplicates} "
                            f"duplicates + {sp.left_out} left out by ingest.skew_classes != {seen} image files seen; "
                            "nothing was published")
    row_groups = {split: parquet_row_groups(staging.path / split) for split in SPLITS}
    return {
        "files": file_inventory(staging.path, SPLITS),
        "name": cfg.ingest.name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "schema": {"id": "string", "image": image_column_description(cfg.ingest, spec),
                   "label": "int32", "label_name": "string", "source_path": "string", "content_hash": "string (sha256 of the source bytes)"},
        "image": {"shape": list(spec.shape), "height": spec.height, "width": spec.width, "channels": spec.channels,
                  "storage": cfg.ingest.storage, "encoding": storage_label(cfg.ingest),
                  "dtype": "uint8", "resize_policy": spec.resize_policy, "background": list(spec.background)},
        "labels": {"names": sp.label_names, "ids": {n: i for i, n in enumerate(sp.label_names)}},
        "counts": {
            "seen": seen, "rows": rows, "quarantined": quarantined, "duplicates_dropped": duplicates,
            "left_out_by_skew": sp.left_out,
            "skipped": cand.skipped, "quarantine_reasons": reasons,
            "splits": split_counts,
            "train_before_balance": sum(sp.train_counts.values()),
            "per_class": {split: {n: sp.per_class.get((split, n), 0) for n in sp.label_names} for split in SPLITS},
        },
        "stats": {"mean": sp.mean, "std": sp.std, "computed_on": "train split before balancing, pixels scaled to [0,1]"},
        "class_weights": {str(k): v for k, v in sp.weights.items()},
        "balance": cfg.ingest.balance,
        "skew": {"classes": cfg.ingest.skew_classes, "fraction": cfg.ingest.skew_fraction} if cfg.ingest.skew_classes
        else None,
        "source": cand.description,
        "config": redacted_dict(cfg.to_dict())["ingest"],
        "content_digest": digest,
        "parquet": {"row_group_rows_target": cfg.ingest.row_group_rows,
                    "row_groups": {s: len(g) for s, g in row_groups.items()},
                    "max_row_group_rows": {s: max(g, default=0) for s, g in row_groups.items()}},
    }
