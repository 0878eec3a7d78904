"""Each train.loss on integer labels and probabilities: right shape, right minimum, the textbook value."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from pipelines.config import load_config
from pipelines.train.losses import per_example_loss


@pytest.mark.parametrize("loss", ["cross_entropy", "label_smoothing", "focal", "mse"])
def test_every_loss_is_per_example_and_lower_for_the_right_answer(loss):
    t = dataclasses.replace(load_config().train, loss=loss)
    fn = per_example_loss(t, 3)
    y = tf.constant([0, 2])
    right = tf.constant([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]])
    wrong = tf.constant([[0.05, 0.9, 0.05], [0.9, 0.05, 0.05]])
    r, w = fn(y, right).numpy(), fn(y, wrong).numpy()
    assert r.shape == (2,) and np.all(r < w)


def test_the_values_are_the_textbook_ones():
    t = load_config().train
    y, p = tf.constant([0]), tf.constant([[0.8, 0.1, 0.1]])
    assert per_example_loss(t, 3)(y, p).numpy()[0] == pytest.approx(-np.log(0.8), rel=1e-5)
    mse = per_example_loss(dataclasses.replace(t, loss="mse"), 3)(y, p).numpy()[0]
    assert mse == pytest.approx(0.04 + 0.01 + 0.01, rel=1e-5)
    focal = per_example_loss(dataclasses.replace(t, loss="focal", focal_gamma=2.0), 3)(y, p).numpy()[0]
    assert focal == pytest.approx(-(0.2 ** 2) * np.log(0.8), rel=1e-4)
