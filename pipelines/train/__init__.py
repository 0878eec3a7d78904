"""Distributed training: the driver side (job.py) launches Horovod workers (worker.py) on Spark executors."""
