"""Distributed prediction: `predict(df, model_uri) -> DataFrame`, for jobs and for users' own Spark code.

The model is loaded once per executor Python worker and applied to Arrow batches (mapInArrow);
pixels stay on the executors.
"""
from __future__ import annotations

import os

import numpy as np
from pyspark.sql import Column, DataFrame
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

_MODELS: dict[object, object] = {}  # by (tracking store, URI), two stores can both hold NAME/1; or by shipped path


_SHIPPED: dict[tuple[str, str, str], str] = {}  # (Spark application, tracking store, URI) -> the shipped copy's name


def _limit_threads() -> None:
    """Several Python workers share the machine: one core's worth each (SPARKVISION_TF_THREADS), before TensorFlow
    first runs."""
    import tensorflow as tf

    threads = int(os.environ.get("SPARKVISION_TF_THREADS", "0"))
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            pass  # TensorFlow already initialized in this process


def load_keras_model(uri: str, tracking_uri: str | None = None):
    """The model behind an MLflow URI, loaded once per Python process and tracking store."""
    import mlflow

    key = (tracking_uri or mlflow.get_tracking_uri(), uri)
    if key not in _MODELS:
        _limit_threads()
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        _MODELS[key] = mlflow.tensorflow.load_model(uri)
    return _MODELS[key]


def ship_model(sc, load_uri: str, tracking_uri: str, registry_uri: str | None = None) -> str:
    """Download the model once on the driver and hand its Keras file to every executor (SparkContext.addFile): the
    executors' Python workers then load it directly, without importing MLflow or opening the tracking store, which
    cost each worker seconds. `registry_uri`: where models:/ URIs are looked up (default: the tracking store, as
    load_keras_model does). Returns the file name the executors find the copy by (SparkFiles), or "" when the model
    has no plain Keras file (the executors then load it through MLflow)."""
    registry_uri = registry_uri or tracking_uri
    key = (sc.applicationId, f"{tracking_uri}|{registry_uri}", load_uri)
    if key not in _SHIPPED:
        import atexit
        import hashlib
        import shutil
        import tempfile

        import mlflow

        parent = tempfile.mkdtemp(prefix="sparkvision-models-")
        atexit.register(shutil.rmtree, parent, True)
        previous = mlflow.get_registry_uri()
        mlflow.set_registry_uri(registry_uri)  # models:/ URIs resolve against the registry, not tracking_uri
        try:
            local = mlflow.artifacts.download_artifacts(load_uri, dst_path=os.path.join(parent, "model"),
                                                        tracking_uri=tracking_uri)
        finally:
            mlflow.set_registry_uri(previous)
        keras_file = os.path.join(local, "data", "model.keras")
        name = ""
        if os.path.isfile(keras_file):
            # one file, not the folder: a cluster master refuses to add a local directory; the name is unique per
            # store and URI because the executors' SparkFiles folder is shared by every model of the application
            name = "sparkvision-model-" + hashlib.sha1("|".join(key[1:]).encode()).hexdigest()[:16] + ".keras"
            shutil.copyfile(keras_file, os.path.join(parent, name))
            sc.addFile(os.path.join(parent, name))
        _SHIPPED[key] = name
    return _SHIPPED[key]


def load_shipped_model(name: str, load_uri: str, tracking_uri: str):
    """On an executor: the Keras file ship_model handed out, loaded once per Python worker with tf-keras; MLflow's
    loader when nothing was shipped or the file is not one tf-keras loads as it is."""
    from pyspark import SparkFiles

    path = SparkFiles.get(name) if name else ""
    if path not in _MODELS:
        if not os.path.isfile(path):
            return load_keras_model(load_uri, tracking_uri)
        _limit_threads()
        import tf_keras

        try:
            _MODELS[path] = tf_keras.models.load_model(path, compile=False)
        except Exception:  # custom objects, another format: as MLflow loads it
            return load_keras_model(load_uri, tracking_uri)
    return _MODELS[path]


_CALLS: dict[int, object] = {}


def predict_pixels(model, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities for uint8 pixels (n, H, W, C), in batches of `batch_size` (one compiled graph)."""
    import tensorflow as tf

    call = _CALLS.get(id(model))
    if call is None:
        # autograph=False: Keras' call has no tensor-dependent Python control flow, and converting it costs seconds
        call = _CALLS[id(model)] = tf.function(lambda x: model(x, training=False), reduce_retracing=True,
                                               autograph=False)
    out = []
    for i in range(0, len(pixels), batch_size):
        chunk = pixels[i:i + batch_size]
        n = len(chunk)
        if n < batch_size:  # pad the ragged last batch: one graph shape, no retracing per partition
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(call(tf.constant(chunk)).numpy()[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def pixels_from_arrow(images, shape: tuple[int, ...]) -> np.ndarray:
    """An Arrow binary column of raw pixel bytes -> (n, *shape) uint8, viewing Arrow's buffer without a copy."""
    import pyarrow as pa

    expected = int(np.prod(shape))
    if images.null_count:
        raise ValueError("input has rows without image bytes (null)")
    wide = pa.types.is_large_binary(images.type)
    offsets = np.frombuffer(images.buffers()[1], dtype=np.int64 if wide else np.int32,
                            count=len(images) + 1, offset=images.offset * (8 if wide else 4))
    lengths = np.diff(offsets)
    if len(lengths) and (lengths != expected).any():
        bad = int(lengths[lengths != expected][0])
        raise ValueError(f"image bytes of length {bad} do not match the model input {shape}")
    data = np.frombuffer(images.buffers()[2], dtype=np.uint8) if len(images) else np.zeros(0, np.uint8)
    return data[offsets[0]:offsets[-1]].reshape(len(images), *shape)


def prediction_columns(probs: np.ndarray, names: list[str], k: int) -> list:
    """Class probabilities -> Arrow arrays for pred_label, pred_name, probability and top_k (vectorized)."""
    import pyarrow as pa

    n = len(probs)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k].astype(np.int32)
    top_p = np.take_along_axis(probs, order, axis=1).astype(np.float32)
    name_of = pa.array(names, pa.string())
    labels = pa.array(order.ravel())
    top = pa.StructArray.from_arrays([labels, name_of.take(labels), pa.array(top_p.ravel())],
                                     names=["label", "name", "probability"])
    top_k = pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), top)
    best = pa.array(order[:, 0]) if n else pa.array([], pa.int32())
    return [best, name_of.take(best), pa.array(top_p[:, 0] if n else np.zeros(0, np.float32)), top_k]


def predict(df: DataFrame, model_uri: str, image_column: str = "image", top_k: int = 3, batch_size: int = 512,
            keep_image: bool = False) -> DataFrame:
    """Add pred_label, pred_name, probability, top_k, model_uri and model_version columns to `df`.

    `df[image_column]` holds raw uint8 pixel bytes in the model's input shape (the dataset format). Scoring
    runs on Arrow batches on the executors (mapInArrow): pixels are read in place from Arrow's buffers and the
    prediction columns are built as Arrow arrays, with no per-row Python objects.
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
    out_names = keep + [f.name for f in PREDICTION_FIELDS]
    shipped = ship_model(df.sparkSession.sparkContext, load_uri, tracking_uri, mlflow.get_registry_uri())

    def score(batches):
        import pyarrow as pa

        net = load_shipped_model(shipped, load_uri, tracking_uri)
        for batch in batches:
            probs = predict_pixels(net, pixels_from_arrow(batch.column(image_column), shape), batch_size)
            n = batch.num_rows
            yield pa.RecordBatch.from_arrays(
                [batch.column(c) for c in keep] + prediction_columns(probs.reshape(n, len(names)), names, k)
                + [pa.array([model_uri] * n, pa.string()), pa.array([version] * n, pa.string())],
                names=out_names)

    return df.mapInArrow(score, schema)


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


def pixel_array(image_column: str = "image") -> Column:
    """The image's pixel bytes as an array<int> column, the input `mlflow.pyfunc.spark_udf` takes for a model with
    a tensor signature (it reshapes flat arrays to the signature's shape). Built by Spark SQL on the executors."""
    c = F.col(image_column)
    byte_at = lambda i: F.conv(F.hex(c.substr(i, F.lit(1))), 16, 10).cast("int")  # noqa: E731
    # sequence(1, 0) counts down, so empty bytes get an empty array explicitly; null stays null
    return F.when(F.length(c) > 0, F.transform(F.sequence(F.lit(1), F.length(c)), byte_at)).when(
        c.isNotNull(), F.array().cast("array<int>"))
