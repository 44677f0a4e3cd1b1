"""Data kinds: reading raw corpora once into prepared datasets, and opening those."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError, UsageError
from .mnist import EMBEDDED, mnist_meta, open_embedded, read_amat_folder, embedded_arrays
from .prepared import DatasetMeta, PreparedDataset, PreparedSplit, open_prepared, write_prepared

AVAILABLE_KINDS = ("mnist",)
PLANNED_KINDS = ("timit", "blizzard", "imdb", "wav", "text")


def prepare(kind: str, source: str, out: Path, force: bool = False) -> PreparedDataset:
    """Read raw data of the given kind from source and write a prepared dataset folder at out."""
    if kind in PLANNED_KINDS:
        raise DataError(
            f"Preparing {kind!r} data is not available in this version of zforcing yet.",
            f"Available now: {', '.join(AVAILABLE_KINDS)}. Speech and text support are on the roadmap.",
        )
    if kind != "mnist":
        raise UsageError(
            f"Unknown data kind {kind!r}.",
            f"Choose one of: {', '.join(AVAILABLE_KINDS + PLANNED_KINDS)}.",
        )
    if source == EMBEDDED:
        packed, protocol = embedded_arrays(), "binarized-mnist-embedded"
    else:
        packed, protocol = read_amat_folder(Path(source)), "binarized-mnist-larochelle"
        source = str(Path(source).resolve())
    meta = mnist_meta({split: len(rows) for split, rows in packed.items()}, source, protocol)
    write_prepared(out, meta, {split: {"pixels": rows} for split, rows in packed.items()}, force=force)
    return open_prepared(out)


def open_dataset(location: str | Path) -> PreparedDataset:
    """A prepared dataset folder, or `embedded` for the binarized MNIST inside the package."""
    if str(location) == EMBEDDED:
        return open_embedded()
    return open_prepared(Path(location))


__all__ = [
    "AVAILABLE_KINDS", "PLANNED_KINDS", "EMBEDDED", "DatasetMeta", "PreparedDataset", "PreparedSplit",
    "open_dataset", "prepare",
]
