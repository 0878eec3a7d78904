"""Transfer learning: a `tf_keras.applications` backbone (MobileNetV2, EfficientNetB0, ResNet50) under a new
classification head, with the backbone's own input preprocessing inside the model (uint8 pixels in, as every
model here), optionally started from a local weights file, and frozen for the first epochs of fine-tuning.

Nothing is downloaded: `weights=None` always, and pretrained weights come from a file the user copies in (for
example Keras' ImageNet `..._notop.h5`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tf_keras as keras
from tf_keras import layers

from pipelines.config import TRANSFER_MODELS as BACKBONES  # noqa: F401 (the backbones, re-exported)
from pipelines.errors import PipelineError

BACKBONE_NAME = "backbone"  # the nested model's name in every transfer-learning model
MIN_SIDE = 32  # the smallest input the three applications accept

# The applications' BatchNorm momentum (0.99, MobileNetV2 0.999) suits ImageNet's millions of steps; trained from
# scratch on a folder of photos, the moving statistics would still be near their initial values when evaluated
SCRATCH_BATCHNORM_MOMENTUM = 0.9

# Caffe-style (ResNet50): RGB -> BGR, then subtract ImageNet's per-channel mean; as a fixed 1x1 convolution, so the
# saved model holds only standard layers
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def _application(name: str):
    apps = keras.applications
    return {"mobilenet_v2": apps.MobileNetV2, "efficientnet_b0": apps.EfficientNetB0,
            "resnet50": apps.ResNet50}[name]


def new_backbone(name: str, height: int, width: int) -> keras.Model:
    """The application without its top, globally average-pooled, randomly initialized, for RGB `height x width`."""
    if min(height, width) < MIN_SIDE:
        raise PipelineError(f"train.model={name} needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels; the "
                            f"dataset's are {height}x{width} (ingest.image.height / width)")
    base = _application(name)(include_top=False, weights=None, input_shape=(height, width, 3), pooling="avg")
    return keras.Model(base.inputs, base.outputs, name=BACKBONE_NAME)


def _preprocess(name: str, x):
    """float 0-255 RGB -> what the backbone was trained on."""
    if name == "mobilenet_v2":  # [-1, 1]
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, dtype="float32", name="preprocess")(x)
    if name == "resnet50":
        to_bgr = layers.Conv2D(3, 1, trainable=False, dtype="float32", name="preprocess")  # float32: exact means
        y = to_bgr(x)
        to_bgr.set_weights([np.eye(3, dtype="float32")[::-1].reshape(1, 1, 3, 3),
                            -np.asarray(_CAFFE_MEAN_BGR, "float32")])
        return y
    return x  # EfficientNet rescales and normalizes inside the application


def load_pretrained(backbone: keras.Model, path: str, name: str) -> None:
    """The backbone's weights from a local .h5 file; a missing or mismatched file is one clear error."""
    if not Path(path).is_file():
        raise PipelineError(f"train.pretrained_weights: no such file {path} (nothing is downloaded: copy the "
                            "weights file in, for example Keras' ImageNet *_notop.h5 for this backbone)")
    try:
        backbone.load_weights(path)
    except (ValueError, OSError, KeyError) as exc:
        raise PipelineError(f"train.pretrained_weights: {path} does not fit train.model={name} without its top "
                            f"({str(exc).splitlines()[0][:300]})") from None


def check_backbone(name: str, shape: tuple[int, int, int], pretrained_weights: str | None) -> None:
    """On the driver, before any worker starts: the images are big enough, the weights file loads."""
    backbone = new_backbone(name, shape[0], shape[1])
    if pretrained_weights:
        load_pretrained(backbone, pretrained_weights, name)


def backbone_model(name: str, shape: tuple[int, int, int], num_classes: int, dropout: float,
                   pretrained_weights: str | None) -> keras.Model:
    """uint8 H x W x C in (grayscale repeated to RGB), the backbone, dropout, a new softmax head out."""
    height, width, channels = shape
    inputs = keras.Input(shape=shape, dtype="uint8", name="image")
    x = layers.Rescaling(1.0, name="to_float")(inputs)  # casts to the compute dtype, keeps 0-255
    if channels == 1:
        x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
    x = _preprocess(name, x)
    backbone = new_backbone(name, height, width)
    if pretrained_weights:
        load_pretrained(backbone, pretrained_weights, name)
    else:  # from scratch: BatchNorm statistics that follow the training in tens of steps, not thousands
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = min(layer.momentum, SCRATCH_BATCHNORM_MOMENTUM)
    # Keras' transfer-learning guide: a pretrained backbone's BatchNorm stays in inference mode, also once unfrozen,
    # so fine-tuning does not wreck the statistics it learned; trained from scratch, it learns its own
    features = backbone(x, training=False) if pretrained_weights else backbone(x)
    features = layers.Dropout(dropout)(features)
    logits = layers.Dense(num_classes, name="logits")(features)
    probs = layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, probs, name=name)


class BackbonePhases:
    """What trains in each epoch: only the new head for the first `freeze_epochs`, then the backbone too (all of it,
    or its top `unfreeze_layers` layers). Frozen means left out of the optimizer's updates; no layer's `trainable`
    flag changes, so every weights list (checkpoints, best-weights files, the saved model) keeps one order."""

    def __init__(self, freeze_epochs: int, unfreeze_layers: int):
        self.freeze_epochs, self.unfreeze_layers = freeze_epochs, unfreeze_layers
        self.frozen: bool | None = None

    def enter(self, epoch: int) -> bool:
        """Move to `epoch`'s phase; True when what trains changed (the training step must be traced again)."""
        frozen = epoch < self.freeze_epochs
        changed = frozen != self.frozen
        self.frozen = frozen
        return changed

    def variables(self, model: keras.Model) -> list:
        """The variables the optimizer updates in the current phase."""
        backbone = model.get_layer(BACKBONE_NAME)
        in_backbone = {v.ref() for v in backbone.trainable_variables}
        head = [v for v in model.trainable_variables if v.ref() not in in_backbone]
        if self.frozen:
            return head
        top = backbone.layers[-self.unfreeze_layers:] if self.unfreeze_layers else backbone.layers
        return head + [v for layer in top for v in layer.trainable_variables]
