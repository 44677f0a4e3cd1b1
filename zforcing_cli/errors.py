"""Errors a user can cause. The CLI prints them as one `Error:` line plus a hint and exits
with the error's code: 2 for a wrong command line, 1 for everything else."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path


from .humanize import byte_size


class ZForcingError(Exception):
    """An expected failure with a message for the user and a hint on what to do instead."""

    exit_code = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(ZForcingError):
    """Options that cannot work together or a value out of range: the command line is wrong."""

    exit_code = 2


class DataError(ZForcingError):
    """Raw or prepared data that cannot be read."""


class CheckpointError(ZForcingError):
    """A checkpoint folder that is missing, incomplete, corrupted or of the wrong kind."""


class TrainingError(ZForcingError):
    """Training that cannot go on (diverged, or asked to do something impossible)."""


class FileSystemError(ZForcingError):
    """The file system refused: permissions, a read-only or full disk, a file where a folder
    belongs. Every OSError reaching the command line is described here, in one place."""


OS_ERROR_ADVICE = {
    errno.EACCES: ("permission denied", "Choose a location you may write to, or change its permissions."),
    errno.EPERM: ("operation not permitted", "Choose a location you may write to, or change its permissions."),
    errno.EROFS: ("the file system is read-only", "Choose a location on a writable file system."),
    errno.ENOSPC: ("no space left on the device", "Free some space on that disk, or write to another disk (--out elsewhere)."),
    errno.EDQUOT: ("the disk quota is exceeded", "Free some space within your quota, or write to another disk (--out elsewhere)."),
    errno.EISDIR: ("it is a folder where a file was expected", "Give a file name, not a folder."),
    errno.ENOTDIR: ("a part of the path is a file where a folder was expected", "Check the path, or choose another one."),
    errno.ENOENT: ("no such file or folder", "Check the path; create the missing folder first."),
    errno.ENOTEMPTY: ("the folder is not empty", "Choose another location, or empty the folder."),
    errno.EEXIST: ("it already exists", "Choose another location."),
    errno.ENAMETOOLONG: ("the name is too long", "Choose a shorter path."),
    errno.EMFILE: ("too many open files", "Raise the open-file limit (ulimit -n) and run again."),
    errno.EIO: ("an input/output error from the device", "Check the disk; run again once it works."),
}


def file_system_error(error: OSError) -> FileSystemError:
    """The one-line description of an OSError, naming its path and what to do."""
    if error.errno == errno.ENOENT and error.filename is not None and os.path.isdir(error.filename):
        # A writer's "no such file" about a folder that exists: the folder takes no new entries
        return FileSystemError(f"{error.filename}: cannot write there; it takes no new files or folders.",
                               "Choose a folder on an ordinary, writable file system.")
    reason, hint = OS_ERROR_ADVICE.get(error.errno, (error.strerror or str(error), "Check the path and run again."))
    path = error.filename2 if error.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST) and error.filename2 else error.filename
    where = f"{path}: " if path is not None else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT) and path is not None:
        free = free_bytes(Path(path))
        reason += "" if free is None else f" ({byte_size(free)} free there)"
    return FileSystemError(f"{where}{reason}.", hint)


def free_bytes(path: Path) -> int | None:
    """The free space of the file system that holds path (or would: its nearest existing
    folder), for this user; None where it cannot be told (a pseudo file system such as /proc
    says it has no size at all)."""
    folder = next((parent for parent in [path, *path.absolute().parents] if parent.is_dir()), None)
    try:
        usage = shutil.disk_usage(folder) if folder is not None else None
    except OSError:
        return None
    return usage.free if usage is not None and usage.total > 0 else None


# How an error that wraps an OS error names it: safetensors' SafetensorError carries Rust's
# io::Error, "I/O error: No space left on device (os error 28)" (or, debug-printed,
# "Os { code: 28, kind: StorageFull, ... }").
WRAPPED_OS_ERROR = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+)")
# numpy's tofile (np.save) says only "4900000 requested and 1048448 written": a short write to
# a file, which is a full disk (or quota).
SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def wrapped_os_error(error: BaseException, path: Path | str | None = None) -> OSError | None:
    """error itself when it is an OSError (numpy's short write as the full disk it is); the OS
    error another error wraps (safetensors'), as an OSError naming path; else None."""
    if isinstance(error, OSError) and not (error.errno is None and SHORT_WRITE.match(str(error))):
        return error
    if isinstance(error, OSError):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))
    found = WRAPPED_OS_ERROR.search(str(error))
    if found is None:
        return None
    number = int(found.group(1) or found.group(2))
    return OSError(number, os.strerror(number), None if path is None else str(path))


# How torch's CPU allocator, CUDA and numpy say that memory ran out (torch's CPU allocator raises
# a plain RuntimeError).
MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")
REQUESTED_BYTES = re.compile(r"allocate (\d+) bytes")


def is_out_of_memory(error: BaseException) -> bool:
    """MemoryError (numpy's too), torch's OutOfMemoryError, or the RuntimeError of torch's CPU allocator."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in MEMORY_MESSAGES)


def out_of_memory_error(error: BaseException, options: str) -> ZForcingError:
    """The one-line description of running out of memory, naming the options that size the work."""
    requested = REQUESTED_BYTES.search(str(error))
    detail = f": it asked for {byte_size(int(requested.group(1)))} at once" if requested else ""
    lower = f"Lower {options}, or" if options else "Use"
    return ZForcingError(f"Out of memory{detail}.", f"{lower} a machine (or device) with more free memory.")
