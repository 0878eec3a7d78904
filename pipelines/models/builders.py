"""Keras (tf-keras, Keras 2) image classifiers: the classic MNIST CNN, LeNet-5, a small VGG and a small ResNet
(and, from backbones.py, pretrained-style backbones for photos).

Each model's input is the dataset's canonical uint8 H x W x C pixels; the first layers scale them to [0, 1]
and standardize with the dataset's per-channel mean and std (from the manifest), or only scale, or leave them
0-255 (`train.normalization`, the FAQ's "why normalize"), so the saved model needs no outside preprocessing. The output is class probabilities in float32 (also under mixed precision).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tf_keras as keras
from tf_keras import layers

from pipelines.models.backbones import BACKBONES, backbone_model


@dataclass(frozen=True)
class ModelOptions:
    activation: str = "relu"
    dropout: float = 0.25
    l2: float = 0.0
    width: float = 1.0
    conv_blocks: int = 2
    dense_layers: int = 1
    normalization: str = "standardize"
    pretrained_weights: str | None = None  # backbones only: a local .h5 file of the backbone's weights


def _act(name: str) -> layers.Layer:
    return layers.LeakyReLU(0.1) if name == "leaky_relu" else layers.Activation(name)


def _init(activation: str) -> str:
    """He init for the ReLU family, LeCun for SELU (self-normalizing), Glorot for the saturating ones."""
    return {"selu": "lecun_normal", "tanh": "glorot_uniform", "sigmoid": "glorot_uniform"}.get(activation, "he_normal")


def _reg(opts: ModelOptions):
    return keras.regularizers.l2(opts.l2) if opts.l2 > 0 else None


def _conv(x, filters: int, kernel: int, opts: ModelOptions, **kw):
    x = layers.Conv2D(filters, kernel, kernel_initializer=_init(opts.activation), kernel_regularizer=_reg(opts), **kw)(x)
    return x


def _dense(x, units: int, opts: ModelOptions):
    return layers.Dense(units, kernel_initializer=_init(opts.activation), kernel_regularizer=_reg(opts))(x)


def _w(n: int, opts: ModelOptions) -> int:
    return max(1, int(round(n * opts.width)))


def mnist_cnn(x, opts: ModelOptions):
    """The classic Keras MNIST CNN: Conv32-Conv64-MaxPool-Dropout-Dense128-Dropout."""
    x = _act(opts.activation)(_conv(x, _w(32, opts), 3, opts))
    x = _act(opts.activation)(_conv(x, _w(64, opts), 3, opts))
    x = layers.MaxPooling2D(2)(x)
    x = layers.Dropout(opts.dropout)(x)
    x = layers.Flatten()(x)
    x = _act(opts.activation)(_dense(x, _w(128, opts), opts))
    return layers.Dropout(min(2 * opts.dropout, 0.9))(x)


def lenet5(x, opts: ModelOptions):
    """LeNet-5 (LeCun 1998) with max pooling: Conv6-Pool-Conv16-Pool-Dense120-Dense84."""
    x = _act(opts.activation)(_conv(x, _w(6, opts), 5, opts, padding="same"))
    x = layers.MaxPooling2D(2)(x)
    x = _act(opts.activation)(_conv(x, _w(16, opts), 5, opts))
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = _act(opts.activation)(_dense(x, _w(120, opts), opts))
    x = layers.Dropout(opts.dropout)(x)
    return _act(opts.activation)(_dense(x, _w(84, opts), opts))


def vgg_small(x, opts: ModelOptions):
    """Two VGG blocks with batch norm (Conv32x2-Pool, Conv64x2-Pool) and Dense256: the usual strong baseline
    for 28x28 images, about 1.6x the compute of mnist_cnn."""
    for filters in (32, 64):
        for _ in range(2):
            x = _conv(x, _w(filters, opts), 3, opts, padding="same", use_bias=False)
            x = _act(opts.activation)(layers.BatchNormalization()(x))
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(opts.dropout)(x)
    x = layers.Flatten()(x)
    x = _dense(x, _w(256, opts), opts)
    x = _act(opts.activation)(layers.BatchNormalization()(x))
    return layers.Dropout(min(2 * opts.dropout, 0.9))(x)


def plain_cnn(x, opts: ModelOptions):
    """The FAQ's "how many layers" model: `conv_blocks` blocks of Conv-Conv-MaxPool (32, 64, 128, ... filters),
    then `dense_layers` hidden Dense128 layers."""
    for block in range(opts.conv_blocks):
        for _ in range(2):
            x = _act(opts.activation)(_conv(x, _w(32 * 2 ** block, opts), 3, opts, padding="same"))
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(opts.dropout)(x)
    x = layers.Flatten()(x)
    for _ in range(opts.dense_layers):
        x = layers.Dropout(opts.dropout)(_act(opts.activation)(_dense(x, _w(128, opts), opts)))
    return x


def _residual(x, filters: int, stride: int, opts: ModelOptions):
    shortcut = x
    y = _conv(x, filters, 3, opts, strides=stride, padding="same", use_bias=False)
    y = _act(opts.activation)(layers.BatchNormalization()(y))
    y = _conv(y, filters, 3, opts, padding="same", use_bias=False)
    y = layers.BatchNormalization()(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.BatchNormalization()(_conv(x, filters, 1, opts, strides=stride, use_bias=False))
    return _act(opts.activation)(layers.Add()([y, shortcut]))


def small_resnet(x, opts: ModelOptions):
    """A small ResNet: stem, three stages of two residual blocks (32, 64, 128 filters), global pooling."""
    x = _conv(x, _w(32, opts), 3, opts, padding="same", use_bias=False)
    x = _act(opts.activation)(layers.BatchNormalization()(x))
    for i, filters in enumerate((32, 64, 128)):
        x = _residual(x, _w(filters, opts), 1 if i == 0 else 2, opts)
        x = _residual(x, _w(filters, opts), 1, opts)
    x = layers.GlobalAveragePooling2D()(x)
    return layers.Dropout(opts.dropout)(x)


MODELS: dict[str, Callable] = {"mnist_cnn": mnist_cnn, "lenet5": lenet5, "vgg_small": vgg_small,
                                "small_resnet": small_resnet, "plain_cnn": plain_cnn}


def build_model(name: str, shape: tuple[int, int, int], num_classes: int, mean: list[float], std: list[float],
                opts: ModelOptions = ModelOptions()) -> keras.Model:
    """A model from the registry or a transfer-learning backbone: uint8 pixels in, float32 class probabilities out.
    Backbones bring their own input preprocessing instead of `opts.normalization`."""
    if name in BACKBONES:
        return backbone_model(name, shape, num_classes, opts.dropout, opts.pretrained_weights)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join([*MODELS, *BACKBONES])})")
    inputs = keras.Input(shape=shape, dtype="uint8", name="image")
    # Rescaling casts uint8 to the compute dtype; `raw` keeps the 0-255 range
    x = layers.Rescaling(1.0 if opts.normalization == "raw" else 1.0 / 255.0, name="scale")(inputs)
    if opts.normalization == "standardize":
        x = layers.Normalization(mean=mean, variance=[max(s, 1e-3) ** 2 for s in std], name="standardize")(x)
    features = MODELS[name](x, opts)
    logits = layers.Dense(num_classes, name="logits")(features)
    probs = layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, probs, name=name)
