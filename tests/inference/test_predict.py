"""Loading the model behind a URI once per process: per tracking store, since two stores can both hold NAME/1."""
import mlflow
import numpy as np

from pipelines.inference.predict import load_keras_model
from pipelines.models import build_model


def register(store: str, artifacts, seed: int) -> None:
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    model = build_model("lenet5", (28, 28, 1), 10, [0.3], [0.3])
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    exp = mlflow.MlflowClient().create_experiment("load", artifact_location=artifacts.as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.tensorflow.log_model(model, name="model")
    mlflow.register_model(info.model_uri, "same_name")


def test_the_same_uri_in_two_stores_loads_two_models(tmp_path):
    stores = [f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"]
    for seed, store in enumerate(stores):
        register(store, tmp_path / f"artifacts{seed}", seed)
    x = np.full((1, 28, 28, 1), 128, np.uint8)
    a, b = (load_keras_model("models:/same_name/1", store) for store in stores)
    assert a is not b and not np.allclose(a.predict(x, verbose=0), b.predict(x, verbose=0))
    assert load_keras_model("models:/same_name/1", stores[0]) is a  # still loaded once per store


def test_the_model_is_shipped_to_the_executors_once_per_store_and_scores_as_mlflow_loads_it(spark, tmp_path):
    from pipelines.inference.predict import load_shipped_model, ship_model

    stores = [f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"]
    for seed, store in enumerate(stores):
        register(store, tmp_path / f"artifacts{seed}", seed)
    names = [ship_model(spark.sparkContext, "models:/same_name/1", store) for store in stores]
    assert all(n.endswith(".keras") for n in names)  # one file each: a cluster master refuses a local folder
    assert names[0] != names[1] and ship_model(spark.sparkContext, "models:/same_name/1", stores[0]) == names[0]

    def on_an_executor(_):
        import os

        from pyspark import SparkFiles

        x = np.full((1, 28, 28, 1), 128, np.uint8)
        found = [os.path.isfile(SparkFiles.get(n)) for n in names]
        yield found, [load_shipped_model(n, "models:/none/1", "sqlite:///nowhere.db").predict(x, verbose=0).tolist()
                      for n in names]

    found, scored = spark.sparkContext.parallelize([0], 1).mapPartitions(on_an_executor).collect()[0]
    x = np.full((1, 28, 28, 1), 128, np.uint8)
    expected = [load_keras_model("models:/same_name/1", store).predict(x, verbose=0) for store in stores]
    assert found == [True, True]  # the copies, not MLflow's loader (its URI and store here lead nowhere)
    np.testing.assert_allclose(scored[0], expected[0], rtol=1e-5)
    np.testing.assert_allclose(scored[1], expected[1], rtol=1e-5)
    assert not np.allclose(scored[0], scored[1])
