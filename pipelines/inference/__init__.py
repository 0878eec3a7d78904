"""Evaluation, the promotion gate, and distributed batch inference over DataFrames."""
from pipelines.inference.predict import pixel_array, predict  # noqa: F401
