"""How many CPU threads torch may use, so that zforcing behaves on a shared machine.

Why a policy of our own: torch's OpenMP runtime (GNU libgomp) keeps its worker threads
spin-waiting between parallel regions. One training with as many threads as cores is the
fastest there is, but two such trainings on the same cores steal each other's time slices
while spinning: measured on 2 cores, each update became 14-17 s instead of about 1 s.
With one thread each, the same two trainings ran at about 70% of their solo speed.
(OMP_WAIT_POLICY=PASSIVE would also avoid it, but costs a lone training 40%.)

So each zforcing process registers itself in a per-machine folder and, unless told a
fixed count, uses `cores // active processes` threads, counted once as it starts.

Reproducibility: a different thread count may sum floating-point numbers in a different order,
and so change the last bits of a result. The count is therefore decided once and never changes
while the process runs: a training keeps the share it found at its start even when others end,
records it in its config.json (RunConfig.threads), and a resumed or replayed run takes the
recorded count back (cli/train.py), whatever else runs then. `--threads N` (or
ZFORCING_THREADS=N) fixes the count instead of the share.

Registry: `<temp dir>/zforcing-active/` (ZFORCING_ACTIVE_DIR overrides it), one
`<pid>-<random>.lock` file per process, held with an exclusive flock for the process's
lifetime. The kernel drops the lock when a process dies, however it dies, so a file
nobody holds is stale: it is not counted and whoever finds it removes it.
Only zforcing processes are counted; other programs on the machine are not seen.
"""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .cores import machine_cores
from .errors import ZForcingError

try:
    import fcntl
except ImportError:  # Windows: no flock, so no registry; the count stays fixed
    fcntl = None

ACTIVE_DIR_ENV = "ZFORCING_ACTIVE_DIR"
# How long an automatic training waits, before it takes more than one thread, for others starting
# with it (docs/performance.md, "Sharing the machine"): started by one script or two terminals,
# trainings reach their count within a second or two of each other.
TRAINING_SETTLE_SECONDS = 2.0
LOCK_SUFFIX = ".lock"


# torch's own choice at start-up (physical cores, or OMP_NUM_THREADS when set): a ceiling, so
# that a lone training runs exactly as it would without the policy.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def available_cores() -> int:
    """machine_cores(), at most torch's default thread count."""
    return min(machine_cores(), TORCH_DEFAULT_THREADS)


def auto_threads(active: int, cores: int) -> int:
    """Share the cores evenly among the active zforcing processes, at least one thread each."""
    return max(1, cores // max(1, active))


def registry_dir() -> Path:
    return Path(os.environ.get(ACTIVE_DIR_ENV) or Path(tempfile.gettempdir()) / "zforcing-active")


def make_registry_dir(folder: Path) -> None:
    """Create the folder shared by every user: world-writable with the sticky bit, like /tmp."""
    if folder.is_dir():
        return  # never loosen the permissions of a folder someone else made (or chose)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(folder, 0o1777)
    except OSError:
        pass  # made concurrently by another user, who owns it and set its mode


def register(folder: Path) -> tuple[int, Path]:
    """Create and lock this process's lock file; returns (fd holding the lock, path).

    The file is locked under a temporary name and only then renamed to *.lock, so a counter
    never mistakes a file that is about to be locked for the stale file of a dead process.
    """
    make_registry_dir(folder)
    name = f"{os.getpid()}-{secrets.token_hex(4)}"
    partial = folder / f"{name}.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.fchmod(fd, 0o644)  # whatever the umask: other users must open it to test the lock
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = folder / f"{name}{LOCK_SUFFIX}"
        os.rename(partial, path)
    except OSError:
        os.close(fd)
        remove_quietly(partial)
        raise
    return fd, path


def remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # already gone, or another user's file in a sticky folder


def is_held(path: Path) -> bool:
    """Whether a live process holds this lock file; removes the file when its owner is dead.

    Files that cannot be opened or locked (another user's odd permissions, a symlink) are
    treated as not held: a stale one would otherwise halve everyone's threads for good.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        return error.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)  # also drops the shared lock, if we got it
    remove_quietly(path)
    return False


def count_held_locks(folder: Path) -> int:
    try:
        paths = list(folder.glob(f"*{LOCK_SUFFIX}"))
    except OSError:
        return 0
    return sum(is_held(path) for path in paths)


@contextmanager
def fixed_threads(threads: int):
    """torch on `threads` threads for the work inside, and on its former count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ThreadPolicy:
    """Sets torch's thread count for the work it surrounds: `requested` when given, else a fair
    share among the zforcing processes running as it starts. The count is decided once, in
    __enter__, and kept to the end, so that the work's sums do not follow the machine's load:

        with ThreadPolicy(threads) as policy:
            ...  # torch on policy.threads threads

    Either way the process registers, so that automatic processes starting beside it leave it
    room. Any failure of the registry (read-only temp dir, no flock on its filesystem) degrades
    to counting this process alone; it never stops the work.

    Attributes: `threads` (the count in use), `automatic`, and `active` (processes counted at
    the start, this one included).

    settle_seconds: a training keeps its count for hours, so when its share would be more than
    one thread it waits this long and counts again before deciding: of trainings started at the
    same moment, none then counts itself alone (and keeps every core while the others take a
    share of the rest, which oversubscribes the cores).
    """

    def __init__(self, requested: int | None, settle_seconds: float = 0.0):
        if requested is not None and requested < 1:
            raise ZForcingError(f"--threads {requested}: at least one thread is needed.", "Use --threads 1 or more.")
        self.requested = requested
        self.settle_seconds = settle_seconds
        self.automatic = requested is None and fcntl is not None
        self.cores = available_cores()
        self.active = 1
        self.threads = requested or torch.get_num_threads()
        self._folder = registry_dir()
        self._lock: tuple[int, Path] | None = None
        self._threads_before = torch.get_num_threads()

    def __enter__(self):
        if fcntl is not None:
            self._register()
        if self.automatic:
            self.active = self._count_active()
            if self.settle_seconds > 0 and auto_threads(self.active, self.cores) > 1:
                time.sleep(self.settle_seconds)  # others starting now register meanwhile
                self.active = self._count_active()
            self.threads = auto_threads(self.active, self.cores)
        torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._lock is not None:
            fd, path = self._lock
            remove_quietly(path)  # unlink before closing: nobody sees an unheld file of ours
            os.close(fd)
            self._lock = None
        torch.set_num_threads(self._threads_before)

    def _register(self) -> None:
        try:
            self._lock = register(self._folder)
        except OSError:
            self._lock = None  # others will not see us; we still count them

    def _count_active(self) -> int:
        unseen_self = 1 if self._lock is None else 0  # registration failed: count ourselves anyway
        return max(1, count_held_locks(self._folder) + unseen_self)
