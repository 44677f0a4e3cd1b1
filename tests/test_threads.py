"""The thread policy: fair shares among live zforcing processes, fixed counts, and no crash ever."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from zforcing_cli.errors import ZForcingError
from zforcing_cli.cores import capped_threads
from zforcing_cli.threads import ThreadPolicy, auto_threads

from conftest import invoke, plain

# Another process that registers the way zforcing does, then waits to be killed.
HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(os.path.join(sys.argv[1], "other.lock"), os.O_WRONLY | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(60)
    """
)


@pytest.fixture(autouse=True)
def _one_thread_afterwards():
    yield
    torch.set_num_threads(1)  # the suite runs on one thread (conftest.py)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    folder = tmp_path / "active"
    monkeypatch.setenv("ZFORCING_ACTIVE_DIR", str(folder))
    return folder


@pytest.fixture
def other_process(registry):
    """A live process holding a lock in the registry."""
    registry.mkdir()
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(registry)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "locked\n"
    yield process
    process.kill()
    process.wait()


def lock_files(folder):
    return sorted(path.name for path in folder.glob("*.lock"))


@pytest.mark.parametrize(("active", "cores", "threads"), [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 16, 8), (3, 16, 5), (0, 4, 4)])
def test_auto_threads_shares_the_cores_with_at_least_one_each(active, cores, threads):
    assert auto_threads(active, cores) == threads


def test_a_lone_automatic_process_uses_every_core(registry):
    with ThreadPolicy(None) as policy:
        assert policy.active == 1
        assert policy.threads == torch.get_num_threads() == auto_threads(1, policy.cores)
        assert len(lock_files(registry)) == 1


def test_a_process_counts_those_running_at_its_start_and_keeps_its_count(registry, monkeypatch):
    monkeypatch.setattr("zforcing_cli.threads.available_cores", lambda: 4)
    with ThreadPolicy(None) as policy:
        assert (policy.active, policy.threads) == (1, 4)
        with ThreadPolicy(None) as second:  # a second registration: a new open file, so a lock of its own
            assert (second.active, second.threads, torch.get_num_threads()) == (2, 2, 2)
            assert (policy.active, policy.threads) == (1, 4)  # the first one's share is not recounted
        assert torch.get_num_threads() == 4


def test_a_process_started_before_is_counted_on_entry(other_process, registry, monkeypatch):
    monkeypatch.setattr("zforcing_cli.threads.available_cores", lambda: 2)
    with ThreadPolicy(None) as policy:
        assert (policy.active, policy.threads) == (2, 1)
    assert lock_files(registry) == ["other.lock"]  # someone else's live lock stays


def test_a_stale_lock_file_is_not_counted_and_is_removed(registry):
    registry.mkdir()
    (registry / "12345-dead.lock").write_text("")  # its owner died: nobody holds it
    with ThreadPolicy(None) as policy:
        assert policy.active == 1
        assert "12345-dead.lock" not in lock_files(registry)


def test_a_killed_process_is_not_counted_by_those_starting_after_it(other_process, registry, monkeypatch):
    monkeypatch.setattr("zforcing_cli.threads.available_cores", lambda: 2)
    with ThreadPolicy(None) as policy:
        assert policy.threads == 1
        other_process.kill()  # SIGKILL: no cleanup, the kernel drops the lock
        other_process.wait()
        with ThreadPolicy(None) as later:
            assert (later.active, later.threads) == (2, 1)  # the first policy and itself
        assert "other.lock" not in lock_files(registry)
        assert policy.threads == 1  # kept for the whole work


def test_a_requested_count_is_fixed_but_still_registered(other_process, registry):
    with ThreadPolicy(3) as policy:
        assert len(lock_files(registry)) == 2  # automatic runs beside it count it
        assert (policy.threads, torch.get_num_threads()) == (3, 3)


def test_a_requested_count_below_one_is_refused():
    with pytest.raises(ZForcingError):
        ThreadPolicy(0)


def test_exit_removes_the_lock_file_and_restores_the_thread_count(registry):
    torch.set_num_threads(1)
    with ThreadPolicy(2):
        assert len(lock_files(registry)) == 1
    assert lock_files(registry) == [] and list(registry.iterdir()) == []
    assert torch.get_num_threads() == 1


def test_an_unusable_registry_falls_back_to_counting_itself_alone(tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root ignores permissions: a folder "inside" a file fails for everyone
        (tmp_path / "a-file").write_text("")
        unusable = tmp_path / "a-file" / "active"
    else:
        unusable = tmp_path / "read-only"
        unusable.mkdir(mode=0o500)
    monkeypatch.setenv("ZFORCING_ACTIVE_DIR", str(unusable))
    monkeypatch.setattr("zforcing_cli.threads.available_cores", lambda: 2)
    with ThreadPolicy(None) as policy:
        assert (policy.active, policy.threads) == (1, 2)


def test_threads_beyond_the_cores_are_capped_with_a_warning(monkeypatch):
    monkeypatch.setattr("zforcing_cli.cores.machine_cores", lambda: 2)
    assert capped_threads(2) == (2, None)
    threads, warning = capped_threads(1000)
    assert threads == 2 and warning == "--threads 1,000 is more than the 2 cores this process may run on: using 2."


def test_train_caps_threads_beyond_the_cores_in_one_warning(cwd, tiny_data, monkeypatch):
    monkeypatch.setattr("zforcing_cli.cores.machine_cores", lambda: 1)
    result = invoke("train", "--data", tiny_data, "--max-steps", 1, "--batch-size", 4, "--device", "cpu", "--threads", 1000)
    output = plain(result.output)
    assert result.exit_code == 0, output
    warnings = [line for line in output.splitlines() if line.startswith("Warning:")]
    assert warnings == ["Warning: --threads 1,000 is more than the 1 core this process may run on: using 1."]
    assert "torch on 1 thread" in output and "1,000 threads" not in output


def test_a_training_waits_for_others_starting_with_it_before_taking_every_core(registry, monkeypatch):
    """Two trainings started together: the first to count would find itself alone and keep both
    cores for its whole run. With a settling wait it counts again, sees the second, and takes one."""
    monkeypatch.setattr("zforcing_cli.threads.available_cores", lambda: 2)
    registry.mkdir()
    started = []
    sleep = time.sleep

    def another_starts_meanwhile(seconds):  # the wait, during which a second process registers
        started.append(subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(registry)], stdout=subprocess.PIPE, text=True))
        assert started[0].stdout.readline() == "locked\n"
        sleep(0)

    monkeypatch.setattr("zforcing_cli.threads.time.sleep", another_starts_meanwhile)
    try:
        with ThreadPolicy(None, settle_seconds=2.0) as policy:
            assert (policy.active, policy.threads) == (2, 1)
    finally:
        for process in started:
            process.kill()
            process.wait()
    assert len(started) == 1


def test_no_settling_wait_when_one_thread_is_all_there_is_to_take(other_process, registry, monkeypatch):
    monkeypatch.setattr("zforcing_cli.threads.available_cores", lambda: 2)
    monkeypatch.setattr("zforcing_cli.threads.time.sleep", lambda seconds: pytest.fail("waited with nothing to lose"))
    with ThreadPolicy(None, settle_seconds=10.0) as policy:
        assert (policy.active, policy.threads) == (2, 1)
