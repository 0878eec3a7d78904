"""Pieces of the worker's training function that need no Horovod world."""
import numpy as np
import tf_keras as keras

from pipelines.models import build_model
from pipelines.models.backbones import BACKBONE_NAME
from pipelines.train.worker import recalibrate_batchnorm


def test_precise_batchnorm_sets_the_moving_statistics_to_the_average_over_training_batches():
    model = build_model("mobilenet_v2", (32, 32, 3), 3, [0.5] * 3, [0.2] * 3)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8) for _ in range(5)]
    backbone = model.get_layer(BACKBONE_NAME)
    first_bn = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    momentum = first_bn.momentum

    recalibrate_batchnorm(model, iter((x, None, None) for x in batches))

    # the first BatchNorm's input is the first convolution of the preprocessed pixels
    pre = keras.Model(model.input, model.get_layer("preprocess").output)
    conv = backbone.layers[backbone.layers.index(first_bn) - 1]
    means = [conv(pre(x)).numpy().mean(axis=(0, 1, 2)) for x in batches]
    assert np.allclose(first_bn.moving_mean.numpy(), np.mean(means, axis=0), rtol=1e-3, atol=1e-4)
    assert first_bn.momentum == momentum  # put back for training
