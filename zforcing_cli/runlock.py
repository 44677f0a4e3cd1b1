"""One training per run folder: `train.lock`, held with flock and naming its holder.

The kernel drops an flock when its holder dies, however it dies, so a lock file left behind by
a killed training is simply locked again (and reported as stale); no pid probing is needed.
The file's content is only for people: {"pid", "host", "started", "command"}.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ZForcingError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

LOCK_NAME = "train.lock"
COMMAND_CHARS = 300  # enough to recognise the command; the file is read by people
READ_LIMIT = 64 * 1024  # far above any record we write; a larger file is not ours anyway


class RunLockedError(ZForcingError):
    """Another live process holds the run folder's lock."""

    def __init__(self, run_dir: Path, owner: dict | None):
        super().__init__(
            f"{run_dir} is being trained by {describe_owner(owner)}{_since(owner)}.",
            "Wait for it to finish, or stop it first; two trainings cannot share a run folder.",
        )
        self.owner = owner


class RunLock:
    """Exclusive right to write run_dir, for as long as it is held (a context manager).

    After acquire(), stale_owner is the record left by a holder that died without releasing
    (so the caller can say whose lock it took over), or None.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.stale_owner: dict | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockedError; OSError (e.g. a read-only folder) propagates."""
        fd = None
        while fd is None:
            fd = self._lock_current_file()
        self.stale_owner = _read_owner(fd)
        _write_own_record(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock; does nothing if not held."""
        if self._fd is None:
            return
        # Unlink before close: a waiter that opened the old file and locks it after our close
        # then sees that the path no longer names it, and starts over.
        try:
            if _names_same_file(self._fd, self.path):  # never remove a newer training's lock file
                self.path.unlink()
        finally:
            os.close(self._fd)
            self._fd = None

    def _lock_current_file(self) -> int | None:
        """A descriptor holding the lock on the file the path names now, or None to try again."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # os.open applies the umask
        try:
            if not _try_flock(fd, fcntl.LOCK_EX):
                raise RunLockedError(self.run_dir, _read_owner(fd))
            if _names_same_file(fd, self.path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # we locked a file its holder had just unlinked on release
        return None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def holder(run_dir: Path) -> dict | None:
    """The record of the live process training run_dir, or None if none is.

    An empty dict means a live holder whose record cannot be read. Use it before deleting a
    run folder (e.g. for --force); a lock file left by a dead process counts as free.
    """
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        # Shared, so that two processes asking at once do not see each other as the holder.
        if _try_flock(fd, fcntl.LOCK_SH):
            return None
        return _read_owner(fd) or {}
    finally:
        os.close(fd)


def describe_owner(owner: dict | None) -> str:
    """'process 1234 on host abc', or 'another process' when the record says nothing usable."""
    if not owner or "pid" not in owner:
        return "another process"
    host = f" on host {owner['host']}" if owner.get("host") else ""
    return f"process {owner['pid']}{host}"


def _since(owner: dict | None) -> str:
    try:
        started = datetime.fromisoformat(str((owner or {})["started"]))
    except (KeyError, ValueError):
        return ""
    return f" (since {started.astimezone().strftime('%Y-%m-%d %H:%M:%S')})"  # the reader's clock


def _try_flock(fd: int, mode: int) -> bool:
    """Lock without waiting; False if another open file holds a conflicting lock."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _names_same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


def _read_owner(fd: int) -> dict | None:
    """The JSON record in the lock file, or None if it is empty or not ours."""
    try:
        record = json.loads(os.pread(fd, READ_LIMIT, 0))
    except ValueError:  # empty, truncated or not UTF-8
        return None
    return record if isinstance(record, dict) else None


def _write_own_record(fd: int) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:COMMAND_CHARS],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
