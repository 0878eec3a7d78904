"""The class-stratified training subset trials train on."""
import pyarrow.parquet as pq

from pipelines.dataset.contract import resolve_dataset
from pipelines.train.spec import training_data
from pipelines.tune.subset import class_quotas, stratified_subset
from tests.conftest import make_config


def test_quotas_keep_the_class_proportions():
    assert class_quotas({"a": 600, "b": 300, "c": 100, "d": 0}, 100) == {"a": 60, "b": 30, "c": 10, "d": 0}
    assert class_quotas({"a": 1000, "b": 1}, 10)["b"] == 1  # a present class is never dropped


def test_a_subset_keeps_each_class_share_and_is_reused(spark, slice_data, tmp_path):
    root, overrides = slice_data
    cfg = make_config(root, *overrides)
    ds = resolve_dataset(cfg.paths.datasets_root, "fashion_mnist")
    manifest = ds.manifest()
    data = training_data(ds, manifest, False)
    sub = stratified_subset(spark, ds, data, 1000, 7, tmp_path / "sub", 300)
    table = pq.read_table(tmp_path / "sub", columns=["label_name", "id"])
    assert sub.train_rows == table.num_rows and 990 <= table.num_rows <= 1000
    assert sub.validation_url == data.validation_url and sub.validation_rows == data.validation_rows
    counts = table.column("label_name").value_counts().to_pylist()
    full = manifest.data["counts"]["per_class"]["train"]
    for c in counts:
        assert abs(c["counts"] / table.num_rows - full[c["values"]] / data.train_rows) < 0.01
    ids = set(table.column("id").to_pylist())
    assert len(ids) == table.num_rows  # no row twice
    written = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "sub").iterdir()}
    again = stratified_subset(spark, ds, data, 1000, 7, tmp_path / "sub", 300)
    assert again == sub
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "sub").iterdir()} == written  # reused, not rewritten
    assert stratified_subset(spark, ds, data, 0, 7, tmp_path / "none", 300) == data  # 0: the whole split
