"""The one SparkSession builder: executors get the environment TensorFlow and Horovod need."""
import os


def test_executors_get_legacy_keras_and_arrow(spark):
    def env(_):
        import os as o

        return [(o.environ.get("TF_USE_LEGACY_KERAS"), o.environ.get("SPARKVISION_TF_THREADS"))]

    seen = set(spark.sparkContext.parallelize(range(4), 2).mapPartitions(env).collect())
    assert seen == {("1", str(max(1, (os.cpu_count() or 1) // 2)))}
    assert spark.conf.get("spark.sql.execution.arrow.pyspark.enabled") == "true"
    assert spark.conf.get("petastorm.spark.converter.parentCacheDirUrl").startswith("file://")
    assert os.environ["TF_USE_LEGACY_KERAS"] == "1"


def test_a_session_started_from_python_prints_nothing(tmp_path):
    """Quiet by default: starting the JVM from Python (the CLI's case) writes nothing to stderr."""
    import subprocess
    import sys

    code = ("from pipelines.config import load_config; from pipelines.spark import get_spark; "
            f"s = get_spark(load_config([], ['spark.master=local[1]', 'paths.datasets_root={tmp_path}/d'])); "
            "print(s.range(5).count()); s.stop()")
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_GATEWAY_PORT", "SPARKVISION_VERBOSE")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "5"
    assert res.stderr.strip() == "", res.stderr[-2000:]
