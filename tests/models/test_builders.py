"""Model builders: every model and activation the config allows is real."""
import typing

import numpy as np
import pytest

from pipelines.config import TrainConfig
from pipelines.models import MODELS, ModelOptions, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_take_uint8_and_output_probabilities(name):
    model = build_model(name, (28, 28, 1), 10, [0.3], [0.35], ModelOptions(width=0.5))
    out = model(np.full((2, 28, 28, 1), 200, np.uint8)).numpy()
    assert out.shape == (2, 10) and np.allclose(out.sum(1), 1, atol=1e-5)


def test_standardization_lives_inside_the_model():
    model = build_model("lenet5", (28, 28, 1), 10, [0.5], [0.25])
    layer = model.get_layer("standardize")
    assert np.allclose(layer.mean.numpy().ravel(), [0.5]) and np.allclose(layer.variance.numpy().ravel(), [0.0625])


def test_every_configured_activation_builds():
    for act in typing.get_args(typing.get_type_hints(TrainConfig)["activation"]):
        build_model("mnist_cnn", (28, 28, 1), 3, [0.3], [0.3], ModelOptions(activation=act, l2=1e-4))


@pytest.mark.parametrize("normalization, layers", [("standardize", {"scale", "standardize"}), ("scale", {"scale"}),
                                                   ("raw", {"scale"})])
def test_normalization_options_change_only_the_input_layers(normalization, layers):
    model = build_model("mnist_cnn", (28, 28, 1), 10, [0.5], [0.25], ModelOptions(normalization=normalization))
    names = {layer.name for layer in model.layers}
    assert {"scale", "standardize"} & names == layers
    assert model.get_layer("scale").scale == (1.0 if normalization == "raw" else 1 / 255)


@pytest.mark.parametrize("blocks, dense", [(1, 0), (2, 1), (3, 2)])
def test_plain_cnn_has_the_blocks_and_dense_layers_asked_for(blocks, dense):
    model = build_model("plain_cnn", (28, 28, 1), 10, [0.3], [0.3], ModelOptions(conv_blocks=blocks, dense_layers=dense))
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 2 * blocks and kinds.count("MaxPooling2D") == blocks
    assert kinds.count("Dense") == dense + 1  # the hidden layers and the classifier
