"""File-system trouble is the user's to fix, and said so in one line: permissions, read-only and
full disks, files where folders belong, missing folders, --force over what zforcing did not
write. Nothing is left behind."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest

import zforcing_cli.fileio as fileio_module
from zforcing_cli.errors import file_system_error

from conftest import assert_clean_error, invoke

TINY_TRAIN = ("train", "--batch-size", 4, "--max-steps", 1, "--device", "cpu")


def entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize(
    ("number", "words"),
    [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only"), (errno.ENOSPC, "no space left"),
     (errno.EISDIR, "is a folder"), (errno.ENOTDIR, "is a file where a folder was expected"),
     (errno.ENOENT, "no such file or folder")],
)
def test_os_errors_are_described_with_their_path(number, words):
    error = file_system_error(OSError(number, os.strerror(number), "/some/where"))
    assert error.message.startswith("/some/where: ") and words in error.message
    assert error.hint and error.exit_code == 1


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", [("prepare", "mnist", "embedded", "--out", "/proc/x"), (*TINY_TRAIN, "--out", "/proc/x")])
def test_a_folder_that_takes_no_new_files_is_named_as_such(cwd, tiny_data, command):
    """/proc exists but refuses new entries with ENOENT: "no such file or folder" would be false."""
    arguments = (*command, "--data", tiny_data) if command[0] == "train" else command
    line = assert_clean_error(invoke(*arguments), 1, "/proc: cannot write there")
    assert "no such" not in line


def test_a_file_written_where_new_files_are_refused_names_the_folder(tmp_path, monkeypatch):
    def refuse(self, data):
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(OSError) as caught:
        fileio_module.write_bytes(tmp_path / "x.png", b"x")
    assert file_system_error(caught.value).message == f"{tmp_path}: cannot write there; it takes no new files or folders."


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_out_of_range_seed_is_a_usage_error_that_writes_nothing(cwd, tiny_data, seed):
    result = invoke("train", "--data", tiny_data, "--seed", seed)
    line = assert_clean_error(result, 2, "--seed")
    assert "╭" not in result.output and "Invalid value" in line  # one line, not typer's boxed panel
    assert entries(cwd) == []


@pytest.mark.parametrize("option", [("--batch-size", "0"), ("--lr", "inf"), ("--lr", "nan"), ("--aux-weight", "-1")])
def test_bad_numbers_are_one_error_line_with_exit_2(cwd, tiny_data, option):
    assert_clean_error(invoke("train", "--data", tiny_data, *option), 2, option[0])
    assert entries(cwd) == []


def test_sample_into_a_missing_folder(in_trained, tmp_path):
    assert_clean_error(invoke("sample", "--out", tmp_path / "nodir" / "sub" / "d.png", "--device", "cpu"), 1, "does not exist")
    assert not (tmp_path / "nodir").exists()


def test_sample_onto_a_folder(in_trained, tmp_path):
    (tmp_path / "pictures.png").mkdir()
    assert_clean_error(invoke("sample", "--out", tmp_path / "pictures.png", "--force", "--device", "cpu"), 1, "is a folder")


def test_sample_below_a_file(in_trained, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_clean_error(invoke("sample", "--out", tmp_path / "afile" / "d.png", "--device", "cpu"), 1, "is a file, not a folder")


@pytest.mark.parametrize("command", [TINY_TRAIN, ("prepare", "mnist", "embedded")])
def test_out_naming_a_file_where_a_folder_belongs(cwd, tiny_data, command):
    (cwd / "taken").write_text("mine")
    extra = ("--data", tiny_data) if command[0] == "train" else ()
    assert_clean_error(invoke(*command, *extra, "--out", "taken"), 1, "is a file, not a folder")
    assert (cwd / "taken").read_text() == "mine"


def test_prepare_force_never_replaces_the_folder_above(cwd):
    work = cwd / "work"
    work.mkdir()
    os.chdir(work)
    line = assert_clean_error(invoke("prepare", "mnist", "embedded", "--out", "..", "--force"), 1)
    assert "holds the current folder" in line
    assert entries(cwd) == ["work"]


@pytest.mark.parametrize("command", [TINY_TRAIN, ("prepare", "mnist", "embedded")])
def test_force_replaces_only_zforcing_outputs(cwd, tiny_data, command):
    (cwd / "mine").mkdir()
    (cwd / "mine" / "thesis.tex").write_text("years of work")
    extra = ("--data", tiny_data) if command[0] == "train" else ()
    line = assert_clean_error(invoke(*command, *extra, "--out", "mine", "--force"), 1, "written by zforcing")
    assert "thesis.tex" in line
    assert entries(cwd / "mine") == ["thesis.tex"]


def test_train_force_replaces_a_finished_run(cwd, tiny_data):
    assert invoke(*TINY_TRAIN, "--data", tiny_data, "--out", "run").exit_code == 0
    (cwd / "run" / "left-by-the-old-run.txt").write_text("old")
    result = invoke(*TINY_TRAIN, "--data", tiny_data, "--out", "run", "--force")
    assert result.exit_code == 0, result.output
    assert not (cwd / "run" / "left-by-the-old-run.txt").exists()
    assert sorted(entries(cwd / "run" / "checkpoints")) == ["best-00000001", "step-00000001"]


def refuse(number: int, where):
    def fail(*args, **kwargs):
        raise OSError(number, os.strerror(number), str(where))

    return fail


@pytest.mark.parametrize("number", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_prepare_on_a_refusing_disk_leaves_nothing(cwd, monkeypatch, number):
    monkeypatch.setattr(fileio_module.tempfile, "mkdtemp", refuse(number, cwd / "out" / ".x"))
    assert_clean_error(invoke("prepare", "mnist", "embedded", "--out", "out/mnist"), 1, str(Path("out")))
    assert entries(cwd) == []  # not even the parent folder it made


def test_train_on_a_read_only_disk_leaves_nothing(cwd, tiny_data, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only_runs(self, *args, **kwargs):
        if self.name == "run":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_runs)
    assert_clean_error(invoke(*TINY_TRAIN, "--data", tiny_data, "--out", "runs/run"), 1, "read-only")
    assert not (cwd / "runs" / "run").exists() and not (cwd / "runs" / "latest").exists()


def test_a_full_disk_during_a_checkpoint_is_a_clear_error(cwd, tiny_data, monkeypatch):
    monkeypatch.setattr("zforcing_cli.checkpoint.save_file", refuse(errno.ENOSPC, cwd / "run" / "checkpoints"))
    line = assert_clean_error(invoke(*TINY_TRAIN, "--data", tiny_data, "--out", "run"), 1, "no space left")
    assert "Unexpected" not in line
    assert not [path for path in (cwd / "run").rglob("*") if path.name.startswith(".")]  # no half-written folder


def test_sample_to_a_read_only_folder(in_trained, tmp_path, monkeypatch):
    monkeypatch.setattr(fileio_module.os, "replace", refuse(errno.EROFS, tmp_path / "d.png"))
    assert_clean_error(invoke("sample", "--out", tmp_path / "d.png", "--num", 1, "--device", "cpu"), 1, "read-only")
    assert entries(tmp_path) == []


def test_resume_into_a_read_only_run_is_a_clear_error(cwd, tiny_data, monkeypatch):
    assert invoke(*TINY_TRAIN, "--data", tiny_data, "--out", "run").exit_code == 0
    monkeypatch.setattr("zforcing_cli.runlock.os.open", refuse(errno.EROFS, cwd / "run" / "train.lock"))
    assert_clean_error(invoke("train", "--out", "run", "--resume", "--max-steps", 2, "--device", "cpu"), 1, "read-only")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_real_read_only_folder(cwd, tiny_data):
    locked = cwd / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert_clean_error(invoke(*TINY_TRAIN, "--data", tiny_data, "--out", locked / "run"), 1, "permission denied")
        assert_clean_error(invoke("prepare", "mnist", "embedded", "--out", locked / "data"), 1, "permission denied")
    finally:
        locked.chmod(0o755)
    assert entries(locked) == []


def test_temporary_names_do_not_leak_into_messages(cwd, monkeypatch):
    """The staging folder's random name would confuse: the message names the folder asked for."""
    monkeypatch.setattr(fileio_module.tempfile, "mkdtemp", refuse(errno.EACCES, Path(tempfile.gettempdir()) / ".mnist.tmp-x"))
    line = assert_clean_error(invoke("prepare", "mnist", "embedded", "--out", "data/mnist"), 1)
    assert ".tmp-" not in line and "data" in line
