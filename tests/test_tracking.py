"""MLflow helpers: the run ends FINISHED or FAILED with the error, and relative SQLite paths become absolute."""
import mlflow
import pytest

from pipelines import tracking


def test_failed_block_marks_the_run_failed_with_the_error(cfg_factory):
    cfg = cfg_factory()
    with pytest.raises(ValueError):
        with tracking.run(cfg, "unit") as active:
            run_id = active.info.run_id
            raise ValueError("boom")
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED" and "boom" in run.data.tags["error"]


def test_config_is_logged_as_params_and_yaml(cfg_factory):
    cfg = cfg_factory("train.epochs=7")
    with tracking.run(cfg, "unit") as active:
        tracking.log_config(cfg, ("train",))
    run = mlflow.MlflowClient().get_run(active.info.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "7"
    assert "config.yaml" in {a.path for a in mlflow.MlflowClient().list_artifacts(active.info.run_id)}


def test_relative_sqlite_uri_is_made_absolute(cfg_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = cfg_factory("mlflow.tracking_uri=sqlite:///rel/mlflow.db")
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path}/rel/mlflow.db"


def test_ui_command_repeats_every_conf_file_the_job_was_given(tmp_path, monkeypatch):
    from pipelines.config import CONF_DIR, load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config([CONF_DIR / "local.yaml", CONF_DIR / "profiles/accurate.yaml"])
    # Shipped overlays by their short names (an installed wheel's would otherwise be site-packages paths).
    assert tracking.ui_command(cfg) == "sparkvision ui --conf conf/local.yaml --conf conf/profiles/accurate.yaml"
    # Unless conf/local.yaml here is another file: then the path that was used.
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/local.yaml").write_text("train:\n  epochs: 5\n")
    assert tracking.ui_command(cfg) == (f"sparkvision ui --conf {CONF_DIR / 'local.yaml'} "
                                        "--conf conf/profiles/accurate.yaml")
    assert tracking.ui_command(load_config([])) == "sparkvision ui"


def test_the_experiment_says_it_holds_model_training_runs_so_the_ui_opens_on_them(cfg_factory):
    cfg = cfg_factory("mlflow.experiment=kinds")
    exp_id = tracking.configure(cfg)
    client = mlflow.MlflowClient()
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "genai_development")  # as an older release left it
    assert tracking.configure(cfg) == exp_id
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_run_is_named_for_what_ran_and_tagged_with_its_stage(cfg_factory):
    with tracking.run(cfg_factory(), "train", run_name="train vgg_small fashion_mnist/v0001") as active:
        pass
    run = mlflow.MlflowClient().get_run(active.info.run_id)
    assert run.info.run_name == "train vgg_small fashion_mnist/v0001"
    assert run.data.tags["sparkvision.stage"] == "train"
