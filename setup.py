"""sparkvision: Spark ingest -> petastorm -> Horovod/Keras training -> MLflow -> batch inference."""
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildWithConf(build_py):
    """Ship conf/ (base, overlays, profiles) inside the wheel as pipelines/conf/, so an installed package finds its
    defaults and `--conf conf/local.yaml` works without a checkout (pipelines.config.overlay_file)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "pipelines" / "conf"
        for f in (HERE / "conf").rglob("*.yaml"):
            out = target / f.relative_to(HERE / "conf")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(f.read_text())
        log4j = HERE / "pipelines" / "log4j2.properties"
        (Path(self.build_lib) / "pipelines" / log4j.name).write_text(log4j.read_text())

HERE = Path(__file__).parent


def pinned(*names: str) -> list[str]:
    """The `name==version` lines of constraints.txt (the one place versions are pinned) for `names`."""
    pins = {}
    for line in (HERE / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pins[line.split("==")[0].lower()] = line
    return [pins[n] for n in names]


setup(
    name="sparkvision",
    version="0.1.0",
    description="Train and serve image classifiers on Spark: ingest to Parquet, Horovod training, MLflow, batch inference",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["pipelines", "pipelines.*"]),
    package_data={"pipelines": ["log4j2.properties"]},
    cmdclass={"build_py": BuildWithConf},
    install_requires=pinned(
        "pyspark", "pyarrow", "numpy", "pandas", "tensorflow", "tf-keras", "horovod",
        "petastorm", "mlflow", "databricks-bundles", "pillow", "pyyaml", "croniter", "matplotlib", "uvicorn",
        "psutil", "nvidia-ml-py", "optuna",
        "flask-wtf",  # mlflow[auth]: the tracking server's basic-auth app (cluster.mlflow_auth)
    ),
    extras_require={"dev": pinned("pytest", "pytest-timeout", "scikit-image", "scikit-learn")},
    entry_points={"console_scripts": ["sparkvision=pipelines.cli:main"]},
)
