"""A small Fashion-MNIST slice ingested once for the tune and experiment tests."""
import pytest


@pytest.fixture(scope="package")
def slice_data(tmp_path_factory, spark):
    """(root, overrides) of a 3,000-image slice whose config keeps every output under root."""
    from pipelines.ingest.job import run_ingest
    from tests.conftest import make_config
    from tests.fixtures import write_idx_slice

    root = tmp_path_factory.mktemp("tune")
    src = write_idx_slice(root / "idx", train=3000, test=500)
    overrides = [f"ingest.source.path={src}", "ingest.row_group_rows=300", "ingest.files_per_split=1",
                 "train.batch_size=64", "train.width=0.5", "train.warmup_epochs=0", "tune.epochs=1",
                 "tune.max_train_rows=1500", "mlflow.system_metrics_seconds=0"]
    run_ingest(spark, make_config(root, *overrides))
    return root, overrides
