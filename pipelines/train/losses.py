"""The training loss (the FAQ's "which loss"): per example, on integer labels and softmax probabilities."""
from __future__ import annotations

from typing import Callable

from pipelines.config import TrainConfig


def per_example_loss(t: TrainConfig, num_classes: int) -> Callable:
    """`train.loss` as a function (labels [batch] int, probabilities [batch, classes]) -> losses [batch]."""
    import tensorflow as tf
    import tf_keras as keras

    if t.loss == "cross_entropy":
        return keras.losses.SparseCategoricalCrossentropy(reduction="none")
    if t.loss == "label_smoothing":
        smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=t.label_smoothing, reduction="none")
        return lambda y, probs: smoothed(tf.one_hot(y, num_classes), probs)
    if t.loss == "focal":
        focal = keras.losses.CategoricalFocalCrossentropy(gamma=t.focal_gamma, alpha=1.0, reduction="none")
        return lambda y, probs: focal(tf.one_hot(y, num_classes), probs)
    if t.loss == "mse":  # squared error on one-hot targets, summed over classes
        return lambda y, probs: tf.reduce_sum(tf.square(tf.one_hot(y, num_classes) - tf.cast(probs, tf.float32)), -1)
    raise ValueError(f"unknown loss {t.loss!r}")
