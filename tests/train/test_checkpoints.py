"""A run's checkpoint directory: epoch checkpoints and their state, best weights, the driver's lock, the resume
recipe check."""
import dataclasses
import subprocess
import sys

import pytest

from pipelines.config import ConfigError, TrainConfig, recipe_keys
from pipelines.errors import PipelineError
from pipelines.train import checkpoints as ck


def test_each_epoch_gets_its_own_prefix_named_by_the_state_and_older_ones_go(tmp_path):
    import tensorflow as tf

    var = tf.Variable(1.0)
    ckpt = tf.train.Checkpoint(v=var)
    for epoch in (1, 2):
        var.assign(float(epoch * 10))
        ck.save_checkpoint(ckpt, tmp_path, ck.ResumeState(epoch, None, [{"epoch": epoch - 1}], "float32"))
    state = ck.read_state(tmp_path)
    assert state == ck.ResumeState(2, "ckpt-0002", [{"epoch": 1}], "float32")
    assert {p.name.split(".")[0] for p in tmp_path.glob("ckpt*")} == {"ckpt-0002"}
    var.assign(0.0)
    tf.train.Checkpoint(v=var).read(str(tmp_path / state.checkpoint)).expect_partial()
    assert float(var.numpy()) == 20.0
    assert not (tmp_path / "state.json.tmp").exists()


def test_no_state_before_the_first_completed_epoch(tmp_path):
    assert ck.read_state(tmp_path) is None


def test_only_the_best_epochs_weights_are_kept(tmp_path):
    for epoch in range(3):
        ck.best_weights_file(tmp_path, epoch).write_bytes(b"w")
    ck.keep_best_weights_of(tmp_path, 1)
    assert [p.name for p in tmp_path.glob("best_weights*")] == ["best_weights_epoch0002.h5"]
    ck.keep_best_weights_of(tmp_path, None)
    assert not list(tmp_path.glob("best_weights*"))


def test_a_second_driver_is_refused_while_the_first_holds_the_lock_and_not_after_it_died(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pipelines.train.checkpoints import "
         "driver_lock\nwith driver_lock(Path(sys.argv[1]), 'r1'):\n    print('held', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineError, match=rf"run r1 is being trained now by pid {holder.pid} on "):
            with ck.driver_lock(tmp_path, "r1"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with ck.driver_lock(tmp_path, "r1"):  # the OS dropped the dead driver's lock
        assert "pid" in (tmp_path / "driver.lock").read_text()


def test_the_recipe_is_every_training_key_not_marked_resumable():
    keys = recipe_keys()
    assert {"train.model", "train.optimizer", "train.learning_rate", "train.batch_size", "train.seed",
            "train.mixed_precision", "train.augment", "train.class_weights"} <= set(keys)
    assert not {"train.epochs", "train.num_proc", "train.cache_mb", "train.timeout_s", "train.dataset"} & set(keys)
    assert {"train.augmentation.translate", "train.augmentation.flip"} <= set(keys)  # nested: as MLflow names them
    resumable = {f"train.{f.name}" for f in dataclasses.fields(TrainConfig) if f.metadata}
    top_level = {k if not k.startswith("train.augmentation.") else "train.augmentation" for k in keys}
    assert top_level | resumable == {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}


def test_a_resume_may_change_how_long_and_where_but_not_what_it_trains():
    now = {"train.epochs": "9", "train.num_proc": "1", "train.optimizer": "sgd", "train.augment": "True",
           "dataset": "fm/v0002"}
    changed = ck.changed_settings({"train.epochs": "4", "train.num_proc": "2", "train.optimizer": "sgd",
                                   "train.augment": "True", "dataset": "fm/v0002"}, now)
    assert changed == [("train.epochs", "4", "9"), ("train.num_proc", "2", "1")]
    ck.check_same_recipe("r1", changed)  # allowed
    recipe = ck.changed_settings({"train.optimizer": "adam", "train.augment": "False", "dataset": "fm/v0001"}, now)
    with pytest.raises(ConfigError) as refused:
        ck.check_same_recipe("r1", recipe)
    assert ("--set train.dataset=fm/v0001 --set train.augment=false --set train.optimizer=adam"
            in str(refused.value))


def test_an_executor_that_cannot_see_a_folder_names_it_and_its_host(tmp_path):
    import socket

    ck.check_visible([("the dataset", tmp_path)])
    with pytest.raises(RuntimeError, match=rf"executor host {socket.gethostname()} cannot see the run's "
                                           rf"checkpoint directory {tmp_path}/gone: "):
        ck.check_visible([("the dataset", tmp_path), ("the run's checkpoint directory", tmp_path / "gone")])
