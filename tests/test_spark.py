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
