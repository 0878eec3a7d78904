"""Evaluation, the promotion gate, distributed batch inference over DataFrames, and REST serving."""
from pipelines.inference.predict import pixel_array, predict  # noqa: F401
