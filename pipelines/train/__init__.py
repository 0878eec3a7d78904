"""Distributed training: the driver (job.py) launches Horovod workers on Spark executors (launch.py), each running
the training loop (worker.py) on its shard of the dataset (data.py)."""
