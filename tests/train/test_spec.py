"""What the driver hands the workers: the frozen config plus the dataset, the run and the resume point."""
import cloudpickle

from pipelines.train.checkpoints import ResumeState
from pipelines.train.spec import TrainingData, steps_per_epoch, worker_spec


def data(**kw) -> TrainingData:
    fields = dict(train_url="file:///d/train", validation_url=None, train_rows=1000, validation_rows=0,
                  shape=(28, 28, 1), num_classes=10, mean=[0.3], std=[0.3], class_weights=())
    return TrainingData(**{**fields, **kw})


def test_the_spec_carries_the_config_itself_and_pickles(cfg_factory):
    cfg = cfg_factory("train.optimizer=sgd", "train.epochs=3")
    spec = worker_spec(cfg.train, data(), "run1", "sqlite:///x.db", "/ckpt/run1")
    assert spec.train is cfg.train and spec.resume == ResumeState()
    again = cloudpickle.loads(cloudpickle.dumps(spec))
    assert again == spec and again.train.optimizer == "sgd"


def test_a_resume_trains_in_the_checkpoints_precision_whatever_auto_resolves_to_here(cfg_factory):
    cfg = cfg_factory("train.mixed_precision=auto")
    spec = worker_spec(cfg.train, data(), "run1", "uri", "/ckpt/run1", ResumeState(2, "ckpt-0002", [], "mixed_bfloat16"))
    assert spec.train.mixed_precision == "bfloat16" and spec.resume.epoch == 2
    assert cfg.train.mixed_precision == "auto"  # the config itself is untouched


def test_class_weights_come_from_the_manifest_by_class_id_only_when_asked(tmp_path, spark, cfg_factory):
    from pipelines.dataset.contract import resolve_dataset
    from pipelines.ingest.job import run_ingest
    from pipelines.train.spec import training_data
    from tests.fixtures import write_idx_slice

    src = write_idx_slice(tmp_path / "idx", train=300, test=50)
    cfg = cfg_factory(f"ingest.source.path={src}", "ingest.row_group_rows=50", "ingest.files_per_split=1")
    run_ingest(spark, cfg)
    ds = resolve_dataset(cfg.paths.datasets_root, cfg.ingest.name)
    manifest = ds.manifest()
    weighted = training_data(ds, manifest, class_weights=True)
    assert weighted.class_weights == tuple(manifest.class_weights[i] for i in range(10))
    assert training_data(ds, manifest, class_weights=False).class_weights == ()
    assert weighted.train_rows == manifest.count("train") and weighted.validation_url.endswith("/validation")


def test_every_worker_runs_the_same_steps_per_epoch():
    assert steps_per_epoch(1000, 32, 2) == 15
    assert steps_per_epoch(10, 32, 2) == 1
