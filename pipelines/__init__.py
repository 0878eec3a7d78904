"""sparkvision: image classifiers trained and served on Spark."""
from pipelines import environment as _environment

_environment.set_required()  # before anything in the package imports TensorFlow
