"""Atomic writes: a folder or file appears complete or not at all, never half-written.

Also the rules for replacing outputs: without --force nothing existing is replaced; with it,
only what zforcing itself wrote (the caller says how to recognise that), and never a folder that
holds the current working folder.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator

from .errors import FileSystemError, ZForcingError, wrapped_os_error
from .humanize import byte_size


class OutputExistsError(ZForcingError):
    pass


Recogniser = Callable[[Path], bool]
LISTED_ENTRIES = 5


def check_can_write(target: Path, force: bool, what: str = "file", is_ours: Recogniser | None = None) -> None:
    """Refuse an output location that cannot or must not be written.

    `what` names the output ("file", "run folder", "prepared dataset"); a folder output may
    replace an existing folder only with force, only when `is_ours` recognises it as zforcing's,
    and never when it holds the current folder. An empty folder is used as it is.
    """
    target = Path(target)
    wants_folder = what != "file"
    if target.is_dir() and not wants_folder:
        raise OutputExistsError(f"{target} is a folder; a {what} name is needed here.", "Give a file name inside it, e.g. --out samples.png.")
    if target.exists() and not target.is_dir() and wants_folder:
        raise OutputExistsError(f"{target} is a file, not a folder; the {what} must be a folder.", "Choose another --out.")
    if wants_folder and target.is_dir() and not any(target.iterdir()):
        return
    if not target.exists() and not target.is_symlink():
        check_parent(target, wants_folder)
        return
    if not force:
        raise OutputExistsError(f"{target} already exists.", "Choose another --out, or pass --force to replace it.")
    if wants_folder:
        check_replaceable_folder(target, what, is_ours)


def check_room(folder: Path, needed: int, what: str, hint: str) -> None:
    """Refuse, before any work is spent, to write `what` (about `needed` bytes, estimated
    generously) into a folder that cannot be written or lacks the room: the path and its free
    space are named, with hint (how to ask for less)."""
    folder = Path(folder).absolute()
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FileSystemError(f"The folder {folder} cannot be written (no permission).", "Choose another --out, or fix the folder's permissions.")
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise FileSystemError(f"{what} would take about {byte_size(needed)}; {folder} has {byte_size(free)} free.", hint)


def check_parent(target: Path, creates_parents: bool) -> None:
    """A file output needs its folder to exist; a folder output creates missing parents, but a
    file in the way is an error either way."""
    for parent in target.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputExistsError(f"{parent} is a file, not a folder, so {target} cannot be written.", "Choose another --out.")
            return
        if not creates_parents:
            raise OutputExistsError(f"The folder {target.parent} does not exist.", f"Create it first (mkdir -p {target.parent}) or choose another --out.")


def check_replaceable_folder(target: Path, what: str, is_ours: Recogniser | None) -> None:
    resolved = target.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise OutputExistsError(f"{target} holds the current folder; --force will not replace it.", "Choose another --out.")
    if is_ours is None or not is_ours(target):
        raise OutputExistsError(
            f"{target} is not a {what} written by zforcing (it holds {describe_entries(target)}); --force only replaces zforcing's own outputs.",
            "Choose another --out, or remove the folder yourself if you mean to replace it.",
        )


def holds_json_object(path: Path, keys: set[str]) -> bool:
    """Whether path is a JSON object with all of keys: how zforcing recognises its own outputs."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and keys <= value.keys()


def describe_entries(folder: Path) -> str:
    names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())
    shown = ", ".join(names[:LISTED_ENTRIES])
    return shown + (f" and {len(names) - LISTED_ENTRIES} more" if len(names) > LISTED_ENTRIES else "")


@contextmanager
def atomic_directory(target: Path, force: bool = False, what: str = "folder", is_ours: Recogniser | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside target; on success it is renamed to target.

    On any exception the temporary folder (and any parent folder made for it) is removed and
    target is left as it was. With force, an existing target that `is_ours` recognises is
    replaced only once the new folder is complete. An OS error writing inside the temporary
    folder (a full disk, say, however the writer wraps it) is raised as an OSError naming target.
    """
    target = Path(target)
    check_can_write(target, force, what, is_ours)
    made = make_parents(target.parent)
    staging = make_staging(target, made)
    try:
        yield staging
        _sync_tree(staging)
        replace_folder(staging, target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        remove_made(made)
        raise_about_target(error, staging, target)
        raise


def make_staging(target: Path, made: list[Path]) -> Path:
    """A new temporary folder beside target, looking as mkdir makes folders; when it cannot be
    made, the parent folders made for it are taken back and the error names target's folder."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as error:
        remove_made(made)
        raise OSError(error.errno, error.strerror, str(target.parent)) from None
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like mkdir's
    return staging


def raise_about_target(error: BaseException, staging: Path, target: Path) -> None:
    """An OS error writing inside a staging folder (a full disk, say, however the writer wraps
    it: numpy's short write included), raised as an OSError naming the folder it stands for."""
    os_error = wrapped_os_error(error) if isinstance(error, Exception) else None
    if os_error is not None and os_error.errno is not None and (
            os_error.filename is None or str(os_error.filename).startswith(str(staging))):
        raise OSError(os_error.errno, os_error.strerror, str(target)) from None


def make_folder_once(target: Path, fill: Callable[[Path], None]) -> list[Path] | None:
    """Make target with what fill(folder) writes in it, appearing whole or not at all: among
    processes making it at the same moment, the first rename wins and the others get None (target
    is then the winner's, untouched). Returns the folders made (target's missing parents, and
    target unless it was there empty), for remove_made() to take back."""
    target = Path(target)
    made = make_parents(target.parent)
    made_target = [] if target.exists() else [target]
    staging = make_staging(target, made)
    try:
        fill(staging)
        try:
            os.rename(staging, target)  # replaces an empty folder, never one with files in it
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return None
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        remove_made(made)
        raise_about_target(error, staging, target)
        raise
    return made + made_target


def replace_folder(staging: Path, target: Path) -> None:
    """Move staging to target; an existing target goes aside first and is removed after."""
    if target.is_dir() and any(target.iterdir()):
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, trash / target.name)
        os.rename(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, target)  # an empty folder is replaced by the rename itself


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p that returns the folders it made, outermost first."""
    missing = [parent for parent in [folder, *folder.parents] if not parent.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileNotFoundError as error:  # a folder on the way exists but takes no new entries (/proc)
        refusing = next(parent for parent in folder.parents if parent.is_dir())
        raise OSError(error.errno, error.strerror, str(refusing)) from None
    return missing


def remove_made(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def files_under(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Every file under folder (recursively) whose suffix, in any case, is one of suffixes, hidden
    files and folders left out, sorted by relative path: the same order on every machine."""
    found = [
        path for path in Path(folder).rglob("*")
        if path.suffix.lower() in suffixes and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside path to write; it becomes path when the block ends without
    an error, and is removed otherwise (an interrupt included): path is never half-written, so
    an output can be streamed to disk as it is made."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        if error.filename not in (str(tmp), tmp):
            raise
        raise about_output(error, path) from None
    finally:
        # On a read-only file system even removing a file that is not there fails (EROFS),
        # which would replace the error above with one about the temporary file.
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def about_output(error: OSError, path: Path) -> OSError:
    """An error writing the temporary file, told about the file asked for; or about its folder
    when the folder exists but refuses new files (/proc), where "no such file" would be false."""
    refused_folder = error.errno == errno.ENOENT and path.parent.is_dir()
    return OSError(error.errno, error.strerror, str(path.parent if refused_folder else path))


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError in the block that names no file (a write() on a full disk) is raised naming path."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from None


def reserve(path: Path) -> None:
    """Allocate the blocks of a file made sparse (a memory-mapped output) now: a full disk is
    then an OSError here, not a SIGBUS that kills the process when the map is written."""
    if not hasattr(os, "posix_fallocate"):  # macOS
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot: as before
                raise OSError(error.errno, error.strerror, str(path)) from None


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def json_record(record: dict) -> dict:
    """A record (metrics, a --json report) that is valid JSON: non-finite numbers become null,
    and `status` says whether any were."""
    clean = {key: finite_or_none(value) for key, value in record.items()}
    bad = sorted(key for key, value in record.items() if isinstance(value, float) and not math.isfinite(value))
    return {**clean, "status": "non-finite: " + ", ".join(bad) if bad else "ok"}


def finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(path: Path, value: object) -> None:
    write_bytes(path, (json.dumps(value, indent=2, allow_nan=False) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_tree(folder: Path) -> None:
    """Flush every file to disk, with the permissions a plain open() gives (some writers, such
    as safetensors, make their files private)."""
    mode = 0o666 & ~_umask()
    for file in folder.rglob("*"):
        if file.is_file():
            os.chmod(file, mode)
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
