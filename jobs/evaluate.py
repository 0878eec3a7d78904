"""spark-submit entry point: `spark-submit jobs/evaluate.py --conf conf/local.yaml [--set k=v ...]`."""
import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
