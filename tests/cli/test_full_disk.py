"""A full disk is the user's to fix, never "a bug": one `Error:` line naming the path and its free
space, the last complete checkpoint left whole, and `train --resume` going on once there is
space. Disks are filled by patched writers, and by a small tmpfs where root may mount one."""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import SafetensorError

import zforcing_cli.checkpoint as checkpoint_module
import zforcing_cli.data.prepared as prepared_module
import zforcing_cli.runfolder as runfolder_module
from zforcing_cli.checkpoint import read_training_checkpoint
from zforcing_cli.errors import file_system_error, wrapped_os_error

from conftest import assert_clean_error, invoke, plain, write_reviews_jsonl

train_module = importlib.import_module("zforcing_cli.train")  # the package's `train` is its function

TRAIN = ("train", "--batch-size", 4, "--checkpoint-every", 2, "--device", "cpu")
FULL = "I/O error: No space left on device (os error 28)"  # how safetensors says it


def checkpoints(run: Path) -> list[str]:
    return sorted(path.name for path in (run / "checkpoints").iterdir())


def assert_no_space_error(result, path: Path) -> None:
    line = assert_clean_error(result, 1, f"{path}: no space left on the device (", " free there).")
    assert "bug" not in plain(result.output) and "Unexpected" not in line
    assert "--out elsewhere" in plain(result.stderr)


def assert_resumes_to(run: Path, steps: int) -> None:
    result = invoke("train", "--out", run, "--resume", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert f"step-{steps:08d}" in checkpoints(run)


def test_a_wrapped_os_error_is_mapped_and_the_free_space_named(tmp_path):
    error = wrapped_os_error(SafetensorError(f"Error while serializing: {FULL}"), tmp_path / "model.safetensors")
    assert (error.errno, error.filename) == (errno.ENOSPC, str(tmp_path / "model.safetensors"))
    assert wrapped_os_error(SafetensorError("Error while serializing: Os { code: 122, kind: QuotaExceeded }")).errno == errno.EDQUOT
    assert wrapped_os_error(ValueError("header too large")) is None
    described = file_system_error(error)
    free = shutil.disk_usage(tmp_path).free
    assert described.message.startswith(f"{tmp_path / 'model.safetensors'}: no space left on the device (")
    assert ("bytes" if free < 1024 else "iB") + " free there)." in described.message
    assert "another disk" in described.hint


def test_a_full_disk_while_writing_a_checkpoint(cwd, tiny_data, monkeypatch):
    """The second checkpoint cannot be written: the first stays whole, nothing of the second is
    left, and the run resumes from the first once there is space."""
    save_file = checkpoint_module.save_file

    def fill_up(tensors, path):
        if "step-00000004" in str(path):
            Path(path).write_bytes(b"\0" * 100)  # what a writer leaves when the disk fills up
            raise SafetensorError(f"Error while serializing: {FULL}")
        save_file(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", fill_up)
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 4)
    assert_no_space_error(result, Path("run") / "checkpoints" / "step-00000004")
    assert checkpoints(cwd / "run") == ["step-00000002"]  # no temporary folder left
    assert read_training_checkpoint(cwd / "run" / "checkpoints" / "step-00000002")["state"]["step"] == 2
    monkeypatch.setattr(checkpoint_module, "save_file", save_file)  # space freed
    assert_resumes_to(cwd / "run", 4)


class FillingFile:
    """A metrics file on a disk that fills up halfway through the next record."""

    def __init__(self, path, mode, buffering):
        self.file = open(path, mode, buffering=buffering)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()

    def seek(self, *args):
        return self.file.seek(*args)

    def truncate(self, size):
        return self.file.truncate(size)

    def write(self, data):
        self.file.write(bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_metrics(cwd, tiny_data, monkeypatch):
    """A record cut short is taken back, the error names metrics.jsonl, the checkpoints stay
    whole, and the run resumes (and validates, as it had not)."""
    log = runfolder_module.RunFolder.log

    def log_until_validation(folder, record):
        if record["type"] == "valid":  # at step 4, after the update's record
            monkeypatch.setattr(runfolder_module, "open", FillingFile, raising=False)
        try:
            log(folder, record)
        finally:
            monkeypatch.delattr(runfolder_module, "open", raising=False)

    monkeypatch.setattr(runfolder_module.RunFolder, "log", log_until_validation)
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 4)
    assert_no_space_error(result, Path("run") / "metrics.jsonl")
    text = (cwd / "run" / "metrics.jsonl").read_text()
    assert text.count("\n") == 1 and '"type": "train", "step": 4' in text and "valid" not in text  # no half record
    assert checkpoints(cwd / "run") == ["step-00000002", "step-00000004"]  # taken before the validation, which stays due
    monkeypatch.setattr(runfolder_module.RunFolder, "log", log)
    assert_resumes_to(cwd / "run", 4)


def test_a_disk_that_cannot_take_one_checkpoint_is_refused_before_training(cwd, tiny_data, monkeypatch):
    monkeypatch.setattr(train_module, "free_bytes", lambda path: 1000)
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 2)
    line = assert_clean_error(result, 1, "run has 1,000 bytes free; one training checkpoint of this model takes about ")
    assert "iB" in line and not (cwd / "run").exists()


def test_a_disk_that_cannot_take_every_kept_checkpoint_is_warned_of(cwd, tiny_data, monkeypatch):
    monkeypatch.setattr(runfolder_module.RunFolder, "checkpoint_space", lambda folder, weight_bytes, keep: (3000, 11_000))
    monkeypatch.setattr(train_module, "free_bytes", lambda path: 5000)
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 1)
    assert result.exit_code == 0, plain(result.output)
    warnings = [line for line in plain(result.stderr).splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1, plain(result.stderr)
    assert "run has 4.9 KiB free; the run's checkpoints may need about 10.7 KiB (3 training checkpoints of 2.9 KiB" in warnings[0]


def test_the_space_checkpoints_take_at_their_peak(tmp_path):
    """keep + 1 training checkpoints (weights and two moments each) and two best ones, less
    what the run's checkpoints already take."""
    folder = runfolder_module.RunFolder(tmp_path / "run")
    assert folder.checkpoint_space(1000, 2) == (3000, 3 * 3000 + 2 * 1000)
    (tmp_path / "run" / "checkpoints" / "step-00000001").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-00000001" / "model.safetensors").write_bytes(b"\0" * 2500)
    assert folder.checkpoint_space(1000, 2) == (3000, 11_000 - 2500)


def can_mount_tmpfs() -> str | None:
    """Why a tmpfs cannot be mounted here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount command"
    return None


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs at tmp_path/disk (a mounted file system that fills up for real)."""
    reason = can_mount_tmpfs()
    if reason:
        pytest.skip(reason)
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_real_full_disk_during_training_then_resume(cwd, tiny_data, small_disk):
    """Checkpoints of about 1 MiB on a 3 MiB disk: the run warns at its start, ends at the first
    checkpoint that does not fit with the one before whole, and resumes once the disk grows."""
    run = small_disk / "run"
    result = invoke(*TRAIN, "--data", tiny_data, "--out", run, "--max-steps", 12, "--preset", "small")
    assert "Warning:" in plain(result.stderr) and "may need about" in plain(result.stderr)
    line = assert_clean_error(result, 1, "no space left on the device (", " free there).")
    assert str(run) in line and "bug" not in plain(result.output)
    kept = [name for name in checkpoints(run) if name.startswith("step-")]
    assert kept and not any(name.startswith(".") for name in checkpoints(run))
    assert read_training_checkpoint(run / "checkpoints" / kept[-1])["state"]["step"] == int(kept[-1][5:])
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert_resumes_to(run, 12)


def test_numpy_short_write_is_a_full_disk(tmp_path):
    error = wrapped_os_error(OSError("4900000 requested and 1048448 written"), tmp_path / "x.npy")
    assert (error.errno, error.filename) == (errno.ENOSPC, str(tmp_path / "x.npy"))
    assert wrapped_os_error(OSError("4900000 requested")).errno is None  # any other OSError: as it is


def test_prepare_on_a_full_disk_names_the_output_and_leaves_nothing(cwd, monkeypatch):
    """np.save's short write (mnist), and the token file's reservation (text), on a full disk."""
    def short_write(file, array):
        raise OSError(f"{array.nbytes} requested and 10 written")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepared_module.np, "save", short_write)
        assert_no_space_error(invoke("prepare", "mnist", "embedded", "--out", "mnist"), Path("mnist"))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    write_reviews_jsonl(cwd / "reviews.jsonl", count=60)
    assert_no_space_error(invoke("prepare", "imdb", "reviews.jsonl", "--out", "text"), Path("text"))
    assert sorted(path.name for path in cwd.iterdir()) == ["reviews.jsonl"]
