"""RunLock: one training per run folder, across processes, with stale locks taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import zforcing_cli
from zforcing_cli.runlock import LOCK_NAME, RunLock, RunLockedError, holder

# The holder imports zforcing_cli.runlock under a bare package: the real package __init__ imports
# torch, which alone would take seconds.
HOLDER_SCRIPT = """
import sys, time, types
package = types.ModuleType("zforcing_cli")
package.__path__ = [sys.argv[1]]
sys.modules["zforcing_cli"] = package
from pathlib import Path
from zforcing_cli.runlock import RunLock
RunLock(Path(sys.argv[2])).acquire()
time.sleep(60)
"""


@pytest.fixture
def other_process_lock(tmp_path):
    """A live subprocess holding tmp_path's lock; yields the subprocess once its record is written."""
    package_dir = str(Path(zforcing_cli.__file__).parent)
    process = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, package_dir, str(tmp_path)])
    deadline = time.monotonic() + 10
    while not _has_record(tmp_path / LOCK_NAME):
        assert process.poll() is None, "the lock-holding subprocess exited"
        assert time.monotonic() < deadline, "the subprocess never wrote its lock record"
        time.sleep(0.01)
    yield process
    process.kill()
    process.wait()


def _has_record(path: Path) -> bool:
    try:
        return bool(path.read_text())
    except FileNotFoundError:
        return False


def test_acquire_writes_own_record_and_release_removes_the_file(tmp_path):
    with RunLock(tmp_path) as lock:
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert lock.stale_owner is None
    assert not (tmp_path / LOCK_NAME).exists()
    lock.release()  # idempotent


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    with RunLock(tmp_path), pytest.raises(RunLockedError, match=f"process {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # the refused attempt left nothing behind


def test_lock_held_by_another_process_names_it(tmp_path, other_process_lock):
    with pytest.raises(RunLockedError) as caught:
        RunLock(tmp_path).acquire()
    message = caught.value.message
    assert f"process {other_process_lock.pid} on host {socket.gethostname()} (since " in message
    assert str(tmp_path) in message and "two trainings cannot share" in caught.value.hint


def test_unreadable_record_still_refuses_as_another_process(tmp_path):
    with RunLock(tmp_path):
        (tmp_path / LOCK_NAME).write_text("{not json")  # same inode: the lock stays held
        with pytest.raises(RunLockedError, match="being trained by another process"):
            RunLock(tmp_path).acquire()


def test_lock_of_a_killed_process_is_taken_over_as_stale(tmp_path, other_process_lock):
    other_process_lock.send_signal(signal.SIGKILL)
    other_process_lock.wait()
    assert (tmp_path / LOCK_NAME).exists()  # a killed holder cannot clean up
    with RunLock(tmp_path) as lock:
        assert lock.stale_owner["pid"] == other_process_lock.pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_holder_reports_a_live_holder_only(tmp_path, other_process_lock):
    assert holder(tmp_path)["pid"] == other_process_lock.pid
    other_process_lock.kill()
    other_process_lock.wait()
    assert holder(tmp_path) is None  # the file is still there, but nobody holds it


def test_holder_of_a_folder_without_lock_is_none(tmp_path):
    assert holder(tmp_path) is None
    assert holder(tmp_path / "missing") is None


def test_os_errors_propagate(tmp_path):
    with pytest.raises(FileNotFoundError):
        RunLock(tmp_path / "missing").acquire()
