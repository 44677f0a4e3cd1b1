"""Binarized MNIST: Larochelle's `.amat` files, and the copy embedded in the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import DataError
from .location import EMBEDDED
from .prepared import SPLITS, DatasetMeta, PreparedDataset, PreparedSplit, arrays_fingerprint

PIXELS = 784
IMAGE_SHAPE = [28, 28]
AMAT_NAMES = {split: f"binarized_mnist_{split}.amat" for split in SPLITS}
ATTRIBUTION = "MNIST: LeCun, Cortes, Burges (CC BY-SA 3.0); binarized by zforcing, see NOTICE.md"
AMAT_HINT = (
    "SOURCE must be a folder with binarized_mnist_train.amat, binarized_mnist_valid.amat and "
    "binarized_mnist_test.amat (784 space-separated 0/1 values per line), or `embedded`."
)


def mnist_meta(counts: dict[str, int], source: str, protocol: str) -> DatasetMeta:
    return DatasetMeta(
        kind="mnist",
        protocol=protocol,
        modality="binary",
        sequence_length=PIXELS,
        counts=counts,
        image_shape=IMAGE_SHAPE,
        source=source,
        attribution=ATTRIBUTION,
    )


def embedded_arrays() -> dict[str, np.ndarray]:
    """The bit-packed embedded splits, (N, 98) uint8 each, read into memory (about 7 MB)."""
    package_file = resources.files("zforcing_cli.data").joinpath("embedded/binarized_mnist.npz")
    with resources.as_file(package_file) as path, np.load(path) as archive:
        return {split: archive[split] for split in SPLITS}


def open_embedded() -> PreparedDataset:
    packed = embedded_arrays()
    meta = mnist_meta({split: len(rows) for split, rows in packed.items()}, EMBEDDED, "binarized-mnist-embedded")
    arrays = {split: {"pixels": rows} for split, rows in packed.items()}
    meta.fingerprint = arrays_fingerprint(arrays)
    splits = {split: PreparedSplit(meta, fields) for split, fields in arrays.items()}
    return PreparedDataset(meta, splits, EMBEDDED)


def read_amat_folder(folder: Path) -> dict[str, np.ndarray]:
    """Read the three `.amat` files into bit-packed arrays, checking every line."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder} does not exist.", AMAT_HINT)
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder of .amat files.", AMAT_HINT)
    missing = [name for name in AMAT_NAMES.values() if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}.", AMAT_HINT)
    return {split: read_amat(folder / name) for split, name in AMAT_NAMES.items()}


def read_amat(path: Path) -> np.ndarray:
    """One `.amat` file -> (N, 98) bit-packed rows."""
    rows = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                rows.append(parse_amat_line(line, path, number))
    if not rows:
        raise DataError(f"{path} is empty.", AMAT_HINT)
    return np.packbits(np.stack(rows), axis=1)


def parse_amat_line(line: bytes, path: Path, number: int) -> np.ndarray:
    values = line.split()
    if len(values) != PIXELS:
        raise DataError(
            f"{path}, line {number}: {len(values)} values instead of {PIXELS}.",
            "Every line must hold one 28x28 image: 784 space-separated 0/1 values.",
        )
    joined = b"".join(values)
    if len(joined) != PIXELS or joined.strip(b"01"):
        bad = next(value for value in values if value not in (b"0", b"1"))
        raise DataError(
            f"{path}, line {number}: value {bad.decode(errors='replace')!r} is not 0 or 1.",
            "This reader takes binarized MNIST (Larochelle & Murray); grey-level files must be binarized first.",
        )
    return np.frombuffer(joined, dtype=np.uint8) - ord("0")
