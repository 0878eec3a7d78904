"""Keras model builders. Every model takes raw uint8 pixels: scaling and standardization are layers inside it."""
from pipelines.models.builders import MODELS, ModelOptions, build_model  # noqa: F401
from pipelines.models.backbones import BACKBONES, BackbonePhases  # noqa: F401
