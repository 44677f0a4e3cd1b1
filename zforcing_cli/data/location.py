"""Where prepared data lives: the names a dataset is found by, and the check that a folder
holds one, which needs none of the libraries that read the arrays (the command line makes it
before loading them)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError

EMBEDDED = "embedded"  # the binarized MNIST inside the package
META_FILE = "meta.json"
PREPARE_HINT = "Create one with `zforcing prepare KIND SOURCE --out DIR`, e.g. `zforcing prepare mnist embedded`."


def check_prepared_folder(folder: str | Path) -> Path:
    """folder, when it is a prepared dataset's (it holds meta.json); else a DataError saying so."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"No prepared dataset at {folder}.", PREPARE_HINT)
    if not (folder / META_FILE).is_file():
        raise DataError(f"{folder} is not a prepared dataset (no {META_FILE}).", PREPARE_HINT)
    return folder
