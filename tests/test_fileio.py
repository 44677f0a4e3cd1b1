"""Atomic writes: a folder or file appears complete or not at all."""

from __future__ import annotations

import errno
import json
import os

import pytest

from zforcing_cli.fileio import OutputExistsError, atomic_directory, atomic_file, make_folder_once, write_bytes, write_json


def entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_directory_appears_complete(tmp_path):
    target = tmp_path / "deep" / "out"
    with atomic_directory(target) as staging:
        assert staging.parent == target.parent and staging != target
        (staging / "a.txt").write_text("a")
        assert not target.exists()  # nothing visible until the block ends
    assert entries(target) == ["a.txt"]
    assert entries(target.parent) == ["out"]


def test_atomic_directory_has_mkdir_permissions(tmp_path):
    with atomic_directory(tmp_path / "out"):
        pass
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_atomic_directory_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("boom")
    assert entries(tmp_path) == []


def test_atomic_directory_refuses_existing_target_without_force(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_directory(target):
            pytest.fail("the body must not run")
    assert entries(tmp_path) == ["out"] and (target / "keep").read_text() == "old"


def test_atomic_directory_force_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("old")
    ours = lambda folder: (folder / "keep").exists() or (folder / "new").exists()  # noqa: E731
    with pytest.raises(RuntimeError):
        with atomic_directory(target, force=True, is_ours=ours) as staging:
            (staging / "new").write_text("new")
            raise RuntimeError("boom")
    assert entries(target) == ["keep"]
    with atomic_directory(target, force=True, is_ours=ours) as staging:
        (staging / "new").write_text("new")
    assert entries(target) == ["new"]
    assert entries(tmp_path) == ["out"]


def test_write_bytes_and_json_leave_no_temporary_file(tmp_path):
    write_bytes(tmp_path / "a.bin", b"123")
    write_json(tmp_path / "b.json", {"x": [1, 2]})
    write_json(tmp_path / "b.json", {"x": 3})
    assert (tmp_path / "a.bin").read_bytes() == b"123"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 3}
    assert entries(tmp_path) == ["a.bin", "b.json"]


def test_write_bytes_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def fail(*args):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert entries(tmp_path) == ["a.bin"]


def test_write_bytes_names_the_file_asked_for_when_the_disk_refuses(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    def read_only(self, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(OSError) as caught:
        write_bytes(tmp_path / "samples.wav", b"RIFF")
    assert caught.value.filename == str(tmp_path / "samples.wav") and caught.value.errno == errno.EROFS
    assert entries(tmp_path) == []


def test_write_bytes_on_a_read_only_file_system_names_the_file_asked_for(tmp_path, monkeypatch):
    """There even removing the temporary file that was never made fails (EROFS, not ENOENT)."""
    import errno
    from pathlib import Path

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError) as caught:
        write_bytes(tmp_path / "kl.png", b"\x89PNG")
    assert caught.value.filename == str(tmp_path / "kl.png") and caught.value.errno == errno.EROFS


def test_atomic_file_streamed_then_interrupted_leaves_nothing(tmp_path):
    """An output written piece by piece appears whole or not at all, even on Ctrl-C."""
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "lines.txt") as tmp:
            with open(tmp, "w") as handle:
                handle.write("first line\n")
                raise KeyboardInterrupt
    assert entries(tmp_path) == []
    with atomic_file(tmp_path / "lines.txt") as tmp:
        tmp.write_text("whole\n")
    assert entries(tmp_path) == ["lines.txt"] and (tmp_path / "lines.txt").read_text() == "whole\n"


def test_atomic_file_leaves_errors_of_its_block_alone(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        with atomic_file(tmp_path / "out.wav"):
            open(tmp_path / "prompt.wav")
    assert caught.value.filename == str(tmp_path / "prompt.wav")


def test_make_folder_once_appears_whole_and_returns_what_it_made(tmp_path):
    target = tmp_path / "sweeps" / "aux"
    made = make_folder_once(target, lambda folder: (folder / "sweep.json").write_text("{}"))
    assert made == [tmp_path / "sweeps", target]
    assert [path.name for path in target.iterdir()] == ["sweep.json"]
    assert [path.name for path in (tmp_path / "sweeps").iterdir()] == ["aux"]  # no staging folder left


def test_make_folder_once_leaves_a_folder_made_first_by_another_process_untouched(tmp_path):
    target = tmp_path / "aux"

    def another_process_wins(folder):  # while this one fills its staging folder, another renames its own
        (folder / "sweep.json").write_text("mine")
        target.mkdir()
        (target / "sweep.json").write_text("theirs")

    assert make_folder_once(target, another_process_wins) is None
    assert (target / "sweep.json").read_text() == "theirs"
    assert [path.name for path in tmp_path.iterdir()] == ["aux"]


def test_make_folder_once_takes_everything_back_when_filling_fails(tmp_path):
    def full_disk(folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "sweep.json"))

    with pytest.raises(OSError) as raised:
        make_folder_once(tmp_path / "sweeps" / "aux", full_disk)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "sweeps" / "aux")
    assert not list(tmp_path.iterdir())
