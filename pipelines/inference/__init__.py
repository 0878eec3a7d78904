"""Evaluation, the promotion gate, and distributed batch inference over DataFrames."""
from pipelines.inference.predict import predict  # noqa: F401
