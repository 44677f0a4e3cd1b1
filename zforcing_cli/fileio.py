"""Atomic writes: a folder or file appears complete or not at all, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ZForcingError


class OutputExistsError(ZForcingError):
    pass


def check_can_write(target: Path, force: bool) -> None:
    """Refuse to replace an existing folder or file unless force is set."""
    if target.exists() and not force:
        raise OutputExistsError(
            f"{target} already exists.", "Choose another --out, or pass --force to replace it."
        )


@contextmanager
def atomic_directory(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside target; on success it is renamed to target.

    On any exception the temporary folder is removed and target is left as it was. With
    force, an existing target is replaced only once the new folder is complete.
    """
    target = Path(target)
    check_can_write(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like mkdir's
    try:
        yield staging
        _sync_tree(staging)
        if target.exists():
            check_can_write(target, force)
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, trash / target.name)
            os.rename(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, value: object) -> None:
    write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
