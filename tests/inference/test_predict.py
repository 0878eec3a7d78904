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
