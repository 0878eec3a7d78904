"""Dataset layout: <datasets_root>/<name>/<version>/{train,validation,test,quarantine,duplicates}/ + manifest.json.

`<name>/LATEST` names the newest published version. Stages meet only here: ingest writes this layout,
training, evaluation and inference read it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError

SPLITS = ("train", "validation", "test")
LATEST = "LATEST"
MANIFEST = "manifest.json"
VERSION_RE = re.compile(r"^v(\d{4,})$")
FOOTER_BYTES = 65536  # how much of each Parquet file's end (its footer: schema, row groups, statistics) is hashed

# Columns of every split's Parquet files.
SPLIT_COLUMNS = ("id", "image", "label", "label_name", "source_path", "content_hash")


@dataclass(frozen=True)
class Manifest:
    """What every later stage needs to know about a dataset version (manifest.json, as parsed)."""

    data: dict[str, Any]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data["image"]["shape"])  # type: ignore[return-value]

    @property
    def encoded(self) -> bool:
        """Whether the image column holds encoded images (JPEG/PNG) rather than raw pixels."""
        return self.data["image"].get("storage", "pixels") == "encoded"

    @property
    def label_names(self) -> list[str]:
        return list(self.data["labels"]["names"])

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def count(self, split: str) -> int:
        return int(self.data["counts"]["splits"][split])

    @property
    def mean(self) -> list[float]:
        return list(self.data["stats"]["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.data["stats"]["std"])

    @property
    def class_weights(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in self.data["class_weights"].items()}

    @property
    def digest(self) -> str:
        return str(self.data["content_digest"])


@dataclass(frozen=True)
class DatasetVersion:
    name: str
    version: str
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def split_path(self, split: str) -> Path:
        return self.path / split

    def manifest(self) -> Manifest:
        return read_manifest(self.path)

    def check_files(self, splits: tuple[str, ...]) -> None:
        """Refuse a version whose Parquet files under `splits` no longer match its manifest (one removed, added,
        or changed in size or footer), naming the file. Versions published before the manifest listed its files
        are not checked."""
        recorded = self.manifest().data.get("files")
        if recorded is None:
            return
        now = file_inventory(self.path, splits)
        wanted = {k: v for k, v in recorded.items() if k.split("/", 1)[0] in splits}
        for name in sorted(set(wanted) | set(now)):
            was, got = wanted.get(name), now.get(name)
            if was == got:
                continue
            what = ("is missing" if got is None else "is not in the manifest" if was is None else
                    f"has changed ({was['bytes']} bytes when published, {got['bytes']} now)"
                    if was["bytes"] != got["bytes"] else "has changed (same size, different footer)")
            raise PipelineError(f"dataset {self.ref} does not match its manifest: {name} {what} under {self.path}; "
                                "re-ingest to publish a new version")


def file_inventory(version_dir: Path, parts: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Every Parquet file under `parts` of a version: its size and a digest of its footer, by relative path."""
    import hashlib

    out = {}
    for part in parts:
        for f in sorted((Path(version_dir) / part).glob("*.parquet")):
            size = f.stat().st_size
            with open(f, "rb") as fh:
                fh.seek(max(0, size - FOOTER_BYTES))
                tail = hashlib.sha256(fh.read()).hexdigest()
            out[f"{part}/{f.name}"] = {"bytes": size, "footer_sha256": tail}
    return out


def dataset_root(datasets_root: str | Path, name: str) -> Path:
    return Path(datasets_root).expanduser().resolve() / name


def read_manifest(version_dir: Path) -> Manifest:
    path = Path(version_dir) / MANIFEST
    if not path.is_file():
        raise PipelineError(f"no manifest at {path}: not a published dataset version")
    return Manifest(json.loads(path.read_text()))


def latest_version(datasets_root: str | Path, name: str) -> str | None:
    pointer = dataset_root(datasets_root, name) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def next_version(datasets_root: str | Path, name: str) -> str:
    """v0001, v0002, ...: one more than the highest published version."""
    root = dataset_root(datasets_root, name)
    numbers = [int(m.group(1)) for p in (root.iterdir() if root.is_dir() else []) if (m := VERSION_RE.match(p.name))]
    return f"v{max(numbers, default=0) + 1:04d}"


def resolve_dataset(datasets_root: str | Path, ref: str) -> DatasetVersion:
    """`NAME` (its LATEST version) or `NAME/VERSION` -> a published version, or a clear error."""
    name, _, version = ref.partition("/")
    root = dataset_root(datasets_root, name)
    if not version:
        version = latest_version(datasets_root, name) or ""
        if not version:
            raise PipelineError(f"dataset '{name}' has no published version under {root.parent} "
                                f"(run `sparkvision ingest` first)")
    path = root / version
    if not (path / MANIFEST).is_file():
        raise PipelineError(f"dataset version '{name}/{version}' not found under {root.parent}")
    return DatasetVersion(name, version, path)


def set_latest(datasets_root: str | Path, name: str, version: str) -> None:
    """Point LATEST at `version` atomically (write a temp file, then rename over the old pointer)."""
    root = dataset_root(datasets_root, name)
    tmp = root / f".{LATEST}.{os.getpid()}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, root / LATEST)

