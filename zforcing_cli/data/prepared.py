"""The prepared-dataset format (DESIGN.md §4): meta.json plus numpy arrays, memory-mapped.

A prepared dataset folder holds

    meta.json                 kind, protocol, modality, splits with counts and array files, ...
    <split>.<field>.npy       arrays; memory-mapped when training, so a batch reads only its rows

Binary images are stored bit-packed (`pixels`, uint8 rows of ceil(784 / 8) bytes). Later data
kinds add their own fields (int16 samples with offsets, token ids with offsets) to the same
layout; `PreparedSplit.batch` is the one place that turns stored rows into model targets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..fileio import atomic_directory, holds_json_object, write_json

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "valid", "test")


@dataclass
class DatasetMeta:
    kind: str  # mnist, timit, imdb, ...
    protocol: str  # a name for the split/preprocessing protocol
    modality: str  # binary | frames | tokens: selects the model's output distribution
    sequence_length: int  # steps per sequence (the maximum, for variable-length data)
    counts: dict[str, int]  # sequences per split
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> field -> file
    image_shape: list[int] | None = None
    source: str = ""
    attribution: str = ""
    fingerprint: str = ""  # sha256 of the arrays: the same data wherever the folder moves
    format_version: int = FORMAT_VERSION

    @property
    def input_size(self) -> int:
        """What the model's `input_size` must be for this data."""
        if self.modality == "binary":
            return 2
        raise DataError(f"Datasets of modality {self.modality!r} are not supported by this version.")

    @classmethod
    def from_dict(cls, values: dict) -> "DatasetMeta":
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in values.items() if key in known})


class PreparedSplit:
    """One split: stored rows and the conversion of a set of rows into a batch of targets."""

    def __init__(self, meta: DatasetMeta, arrays: dict[str, np.ndarray]):
        self.meta = meta
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["pixels"])

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets (B, T) and mask (B, T) for the sequences at indices."""
        rows = np.asarray(self.arrays["pixels"][indices])
        bits = np.unpackbits(rows, axis=1, count=self.meta.sequence_length)
        targets = torch.from_numpy(bits.astype(np.float32))
        return targets, torch.ones_like(targets)


class PreparedDataset:
    def __init__(self, meta: DatasetMeta, splits: dict[str, PreparedSplit], location: str):
        self.meta = meta
        self.splits = splits
        self.location = location  # a folder path, or "embedded"

    def split(self, name: str) -> PreparedSplit:
        if name not in self.splits:
            raise DataError(
                f"The dataset at {self.location} has no {name!r} split.",
                f"Available splits: {', '.join(self.splits)}.",
            )
        return self.splits[name]


def arrays_fingerprint(arrays: dict[str, dict[str, np.ndarray]]) -> str:
    """A digest of every array's name, type, shape and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for split in sorted(arrays):
        for name in sorted(arrays[split]):
            array = np.ascontiguousarray(arrays[split][name])
            digest.update(f"{split}.{name}:{array.dtype.str}:{array.shape}".encode())
            digest.update(memoryview(array).cast("B"))
    return "sha256:" + digest.hexdigest()


def is_prepared_dataset(folder: Path) -> bool:
    """Whether folder is a prepared dataset written by zforcing (for --force)."""
    return holds_json_object(Path(folder) / META_FILE, {"kind", "protocol", "modality"})


def write_prepared(
    out: Path, meta: DatasetMeta, arrays: dict[str, dict[str, np.ndarray]], force: bool = False
) -> Path:
    """Write a prepared dataset atomically. arrays maps split -> field -> array."""
    out = Path(out)
    with atomic_directory(out, force=force, what="prepared dataset", is_ours=is_prepared_dataset) as staging:
        meta.fingerprint = arrays_fingerprint(arrays)
        meta.files = {}
        for split, fields in arrays.items():
            meta.files[split] = {}
            for name, array in fields.items():
                filename = f"{split}.{name}.npy"
                np.save(staging / filename, np.ascontiguousarray(array))
                meta.files[split][name] = filename
        write_json(staging / META_FILE, asdict(meta))
    return out


def open_prepared(folder: Path) -> PreparedDataset:
    """Open a prepared dataset folder with its arrays memory-mapped."""
    folder = Path(folder)
    hint = "Create one with `zforcing prepare KIND SOURCE --out DIR`, e.g. `zforcing prepare mnist embedded`."
    if not folder.is_dir():
        raise DataError(f"No prepared dataset at {folder}.", hint)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{folder} is not a prepared dataset (no {META_FILE}).", hint)
    try:
        values = json.loads(meta_path.read_text())
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        meta = DatasetMeta.from_dict(values)
    except (ValueError, TypeError) as error:
        raise DataError(f"{meta_path} is corrupted ({error}).", "Prepare the dataset again with --force.") from None
    if meta.format_version > FORMAT_VERSION:
        raise DataError(
            f"{folder} was prepared by a newer zforcing (format {meta.format_version}).",
            "Upgrade zforcing, or prepare the dataset again with this version.",
        )
    splits = {}
    for split, fields in meta.files.items():
        try:
            arrays = {name: np.load(folder / file, mmap_mode="r") for name, file in fields.items()}
        except (OSError, ValueError) as error:
            raise DataError(
                f"{folder} is incomplete or corrupted: cannot read {split} arrays ({error}).",
                "Prepare the dataset again with --force.",
            ) from None
        splits[split] = PreparedSplit(meta, arrays)
    return PreparedDataset(meta, splits, str(folder.resolve()))
