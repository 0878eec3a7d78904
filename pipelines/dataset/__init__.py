"""The dataset contract: where versions live, what a manifest holds, how to read a split."""
from pipelines.dataset.contract import (  # noqa: F401
    SPLITS, DatasetVersion, Manifest, read_manifest, resolve_dataset,
)
