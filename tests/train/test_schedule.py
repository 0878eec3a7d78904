"""Optimizers, learning-rate schedules and the early-stopping bookkeeping."""
import typing

import pytest

from pipelines.config import TrainConfig
from pipelines.train.schedule import BestEpoch, LearningRate, make_optimizer


def test_every_configured_optimizer_builds():
    for opt in typing.get_args(typing.get_type_hints(TrainConfig)["optimizer"]):
        assert make_optimizer(opt, 0.01, 0.9) is not None
    assert make_optimizer("nesterov", 0.01, 0.9).nesterov


def test_learning_rate_warmup_then_cosine_and_plateau():
    lr = LearningRate(base=0.001, peak=0.004, kind="cosine", epochs=5, warmup_epochs=1, steps_per_epoch=10)
    assert lr.at(0, 0) == pytest.approx(0.001) and lr.at(1, 0) == pytest.approx(0.004)
    assert lr.at(4, 9) < 0.001
    plateau = LearningRate(0.01, 0.01, "plateau", 10, 0, 10)
    for loss in (1.0, 1.0, 1.0):
        plateau.observe(loss)
    assert plateau.at(5, 0) == pytest.approx(0.005)


def test_best_epoch_counts_epochs_without_a_real_improvement():
    best = BestEpoch()
    assert best.observe(0, 1.0) and best.epoch == 0 and best.stale == 0
    assert not best.observe(1, 0.99995)  # within 1e-4: not an improvement
    assert best.stale == 1 and best.epoch == 0
    assert best.observe(2, 0.5) and (best.epoch, best.stale) == (2, 0)
    assert not best.observe(3, 0.7) and best.stale == 1
