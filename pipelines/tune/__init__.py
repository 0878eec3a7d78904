"""Hyper-parameter search and the training FAQ's experiments (`sparkvision tune`, `sparkvision experiment`).

space.py (tune.space -> Optuna distributions), subset.py (a class-stratified training subset), trial.py (one
training as a one-worker Horovod world in a child process, on an executor), trial_process.py (that child),
study.py (the tune job: an MLflow-backed Optuna study whose trials run as Spark tasks), experiment.py (a grid of
variants x seeds at one budget), report.py (plots, tables, best.yaml)."""
