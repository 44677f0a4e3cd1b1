"""The run folder as training writes it (runfolder.py): restoring the newest training
checkpoint with the metrics it has not seen dropped, the `latest` link, the lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zforcing_cli.runfolder import RunFolder

from conftest import tiny_run_config


def training_checkpoint(folder: RunFolder, config, step: int, **state) -> Path:
    saved = {"model": {"weight": torch.arange(3.0)}, "optimizer": ({"0.exp_avg": torch.ones(3)}, [{"lr": 0.5}]),
             "state": {"step": step, **state}}
    return folder.save_training_checkpoint(step, config, saved, keep=2)


def write_metrics(folder: RunFolder, records: list[dict], cut_short: str = "") -> None:
    folder.metrics_file.write_text("".join(json.dumps(record) + "\n" for record in records) + cut_short)


def logged(folder: RunFolder) -> list[tuple[str, int]]:
    return [(record["type"], record["step"]) for record in map(json.loads, folder.metrics_file.read_text().splitlines())]


@pytest.fixture
def folder(tmp_path) -> RunFolder:
    folder = RunFolder(tmp_path / "run")
    folder.create()
    return folder


def test_restore_reads_the_newest_checkpoint_and_drops_the_metrics_after_it(folder, tiny_dataset):
    config = tiny_run_config(tiny_dataset)
    training_checkpoint(folder, config, 2, validated_step=2)
    newest = training_checkpoint(folder, config, 4, validated_step=2)  # taken on the clock, its validation still due
    updates = [{"type": "train", "step": step} for step in range(1, 7)]
    write_metrics(folder, [*updates[:2], {"type": "valid", "step": 2}, *updates[2:4], {"type": "valid", "step": 4}, *updates[4:]],
                  cut_short='{"type": "train", "st')
    checkpoint, saved = folder.restore()
    assert checkpoint == newest
    assert saved["state"] == {"step": 4, "validated_step": 2}  # the optimizer's groups are its own, not the state's
    assert torch.equal(saved["model"]["weight"], torch.arange(3.0))
    assert saved["optimizer"][1] == [{"lr": 0.5}] and torch.equal(saved["optimizer"][0]["0.exp_avg"], torch.ones(3))
    assert logged(folder) == [("train", 1), ("train", 2), ("valid", 2), ("train", 3), ("train", 4)]


def test_a_checkpoint_of_0_1_0_counts_as_validated_at_its_step(folder, tiny_dataset):
    """0.1.0 saved after validating and wrote no validated_step: a validation at the checkpoint's
    step stays in the metrics."""
    training_checkpoint(folder, tiny_run_config(tiny_dataset), 2)
    write_metrics(folder, [{"type": "train", "step": 2}, {"type": "valid", "step": 2}, {"type": "train", "step": 3}])
    folder.restore()
    assert logged(folder) == [("train", 2), ("valid", 2)]


def test_restore_without_a_checkpoint_drops_the_metrics(folder):
    write_metrics(folder, [{"type": "train", "step": 1}])
    assert folder.restore() is None
    assert not folder.metrics_file.exists()


def test_a_latest_link_that_cannot_be_made_is_a_warning(folder, tmp_path):
    (tmp_path / "runs").write_text("")  # a file where the runs folder should be
    warning = folder.link_latest(tmp_path / "runs")
    assert warning is not None and "latest was not updated" in warning
    assert folder.link_latest(tmp_path / "elsewhere") is None
    assert (tmp_path / "elsewhere" / "latest").resolve() == folder.path.resolve()


def test_open_takes_the_lock_and_close_gives_it_back(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.open(resume=False) is None  # no stale lock taken over
    assert (folder.path / "train.lock").exists()
    folder.close()
    assert not (folder.path / "train.lock").exists()
    folder.close()  # closing again does nothing


def test_open_takes_over_the_lock_of_a_dead_holder(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.create()
    (folder.path / "train.lock").write_text(json.dumps({"pid": 4321, "host": "gone"}))  # nobody holds its flock
    told = folder.open(resume=True)
    folder.close()
    assert told == "Took over the run's lock from process 4321 on gone, which is no longer running."
