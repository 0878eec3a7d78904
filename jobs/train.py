"""spark-submit entry point: `spark-submit jobs/train.py --conf conf/local.yaml [--set k=v ...]`."""
import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
