"""Distributed prediction: `predict(df, model_uri) -> DataFrame`, for jobs and for users' own Spark code.

The model is loaded once per executor Python worker and applied to Arrow batches (mapInPandas);
pixels stay on the executors.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.errors import PipelineError

PREDICTION_FIELDS = [
    T.StructField("pred_label", T.IntegerType()),
    T.StructField("pred_name", T.StringType()),
    T.StructField("probability", T.FloatType()),
    T.StructField("top_k", T.ArrayType(T.StructType([
        T.StructField("label", T.IntegerType()), T.StructField("name", T.StringType()),
        T.StructField("probability", T.FloatType())]))),
    T.StructField("model_uri", T.StringType()),
    T.StructField("model_version", T.StringType()),
]

_MODELS: dict[str, object] = {}


def load_keras_model(uri: str, tracking_uri: str | None = None):
    """The model behind an MLflow URI, loaded once per Python process."""
    if uri not in _MODELS:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        import mlflow
        import tensorflow as tf

        threads = int(os.environ.get("SPARKVISION_TF_THREADS", "0"))
        if threads:  # several Python workers share the machine: one core's worth each
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
            except RuntimeError:
                pass  # TensorFlow already initialized in this process
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        _MODELS[uri] = mlflow.tensorflow.load_model(uri)
    return _MODELS[uri]


_CALLS: dict[int, object] = {}


def predict_pixels(model, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities for uint8 pixels (n, H, W, C), in batches of `batch_size` (one compiled graph)."""
    import tensorflow as tf

    call = _CALLS.get(id(model))
    if call is None:
        call = _CALLS[id(model)] = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    out = []
    for i in range(0, len(pixels), batch_size):
        chunk = pixels[i:i + batch_size]
        n = len(chunk)
        if n < batch_size:  # pad the ragged last batch: one graph shape, no retracing per partition
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(call(tf.constant(chunk)).numpy()[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def predict(df: DataFrame, model_uri: str, image_column: str = "image", top_k: int = 3, batch_size: int = 512,
            keep_image: bool = False) -> DataFrame:
    """Add pred_label, pred_name, probability, top_k, model_uri and model_version columns to `df`.

    `df[image_column]` holds raw uint8 pixel bytes in the model's input shape (the dataset format).
    """
    import mlflow

    from pipelines.inference.models import resolve_model

    model = resolve_model(model_uri)
    if image_column not in df.columns:
        raise PipelineError(f"input has no column {image_column!r} (columns: {', '.join(df.columns)})")
    if dict(df.dtypes)[image_column] != "binary":
        raise PipelineError(f"column {image_column!r} must be binary pixel bytes, found {dict(df.dtypes)[image_column]}")
    shape, names = model.shape, model.label_names
    k = min(top_k, len(names))
    tracking_uri = mlflow.get_tracking_uri()
    load_uri, version = model.load_uri, model.version or ""
    keep = [c for c in df.columns if keep_image or c != image_column]
    schema = T.StructType([f for f in df.schema.fields if f.name in keep] + PREDICTION_FIELDS)
    expected = int(np.prod(shape))

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        net = load_keras_model(load_uri, tracking_uri)
        for batch in batches:
            raw = batch[image_column]
            bad = [len(b) for b in raw if b is None or len(b) != expected]
            if bad:
                raise ValueError(f"image bytes of length {bad[0]} do not match the model input {shape}")
            pixels = np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(len(batch), *shape)
            probs = predict_pixels(net, pixels, batch_size)
            order = np.argsort(-probs, axis=1)[:, :k]
            out = batch[keep].copy()
            out["pred_label"] = order[:, 0].astype(np.int32)
            out["pred_name"] = [names[i] for i in order[:, 0]]
            out["probability"] = probs[np.arange(len(batch)), order[:, 0]].astype(np.float32)
            out["top_k"] = [[{"label": int(j), "name": names[j], "probability": float(p[j])} for j in row]
                            for row, p in zip(order, probs)]
            out["model_uri"] = model_uri
            out["model_version"] = version
            yield out

    return df.mapInPandas(score, schema)


def check_image_lengths(df: DataFrame, image_column: str, shape: tuple[int, ...]) -> int:
    """Count rows and check every image has the model's byte length (aggregated on the executors)."""
    expected = int(np.prod(shape))
    row = df.agg(F.count(F.lit(1)).alias("n"), F.min(F.length(image_column)).alias("lo"),
                 F.max(F.length(image_column)).alias("hi")).first()
    if row["n"] == 0:
        raise PipelineError("the input is empty: nothing to score")
    if row["lo"] != expected or row["hi"] != expected:
        raise PipelineError(f"image bytes of length {row['lo']}..{row['hi']} do not match the model input "
                            f"{'x'.join(map(str, shape))} ({expected} bytes)")
    return int(row["n"])
