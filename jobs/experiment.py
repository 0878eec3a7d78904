"""spark-submit entry point: `spark-submit jobs/experiment.py NAME --conf conf/local.yaml [--set k=v ...]`."""
import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
