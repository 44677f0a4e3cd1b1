"""Checkpoint folders: round trips, finding the right folder, and clear errors for bad ones."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import zforcing_cli.checkpoint as checkpoint_module
from zforcing_cli.checkpoint import (
    flatten_optimizer_state,
    load_model,
    newest_checkpoint,
    point_latest,
    prune_checkpoints,
    read_trainer_state,
    resolve_checkpoint,
    resolve_latest,
    restore_optimizer_state,
    save_checkpoint,
)
from zforcing_cli.errors import CheckpointError
from zforcing_cli.model import ZForcing


def run_config_dict(model_config) -> dict:
    return {
        "model": model_config.to_dict(),
        "train": {},
        "data": {"location": "embedded", "kind": "mnist", "modality": "binary", "sequence_length": 784,
                 "image_shape": [28, 28]},
    }


def take_adam_steps(model, optimizer, steps=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    y = (torch.rand(2, 12, generator=generator) < 0.4).float()
    for _ in range(steps):
        out = model(y, generator=generator)
        loss = (out.nll + out.kl + out.aux + out.bwd).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture
def model(tiny_model_config):
    torch.manual_seed(0)
    return ZForcing(tiny_model_config)


@pytest.fixture
def checkpoint(tmp_path, model, tiny_model_config):
    """A complete training checkpoint folder of a model trained for two Adam steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    take_adam_steps(model, optimizer)
    folder = tmp_path / "run" / "checkpoints" / "step-00000002"
    save_checkpoint(folder, model, run_config_dict(tiny_model_config), {"step": 2}, optimizer)
    return folder


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


# -- round trips -----------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_parameters(checkpoint, model):
    loaded, config = load_model(checkpoint)
    assert_same_parameters(loaded, model)
    assert loaded.config == model.config
    assert config["format_version"] == checkpoint_module.CHECKPOINT_FORMAT
    assert config["zforcing_version"]
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json",
    ]
    # The reloaded model computes exactly what the saved one did.
    y = (torch.rand(2, 10, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    out_a = model(y, generator=torch.Generator().manual_seed(5))
    out_b = loaded(y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out_a.nll, out_b.nll) and torch.equal(out_a.kl, out_b.kl)


def test_no_pickle_anywhere(checkpoint):
    for file in checkpoint.iterdir():
        assert not file.read_bytes().startswith(b"\x80"), file.name  # pickle protocol marker


def test_restored_adam_continues_exactly_like_the_original(tmp_path, tiny_model_config):
    torch.manual_seed(0)
    model_a = ZForcing(tiny_model_config)
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-2, eps=1e-5)
    take_adam_steps(model_a, opt_a, steps=2)
    folder = save_checkpoint(tmp_path / "ck", model_a, run_config_dict(tiny_model_config), {"step": 2}, opt_a)

    model_b, _ = load_model(folder)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=0.5)  # lr and eps must come back from the checkpoint
    restore_optimizer_state(opt_b, load_file(folder / "optimizer.safetensors"), read_trainer_state(folder)["optimizer_param_groups"])
    state_a, state_b = opt_a.state_dict(), opt_b.state_dict()
    assert state_b["param_groups"][0]["lr"] == 1e-2 and state_b["param_groups"][0]["eps"] == 1e-5
    assert state_a["state"].keys() == state_b["state"].keys()
    assert len(state_a["state"]) == len(list(model_a.parameters()))
    for key, value in state_a["state"].items():
        assert value.keys() == state_b["state"][key].keys()
        assert {"step", "exp_avg", "exp_avg_sq"} <= set(value)
        for name, tensor in value.items():
            assert torch.equal(tensor, state_b["state"][key][name]), (key, name)
    flat, _ = flatten_optimizer_state(opt_b)
    saved = load_file(folder / "optimizer.safetensors")
    assert flat.keys() == saved.keys() and all(torch.equal(flat[k], saved[k]) for k in saved)

    take_adam_steps(model_a, opt_a, steps=2, seed=1)
    take_adam_steps(model_b, opt_b, steps=2, seed=1)
    assert_same_parameters(model_a, model_b)


# -- atomic writes ---------------------------------------------------------------------------------


def test_a_save_that_fails_midway_leaves_no_partial_folder(tmp_path, model, tiny_model_config, monkeypatch):
    real_save = checkpoint_module.save_file
    calls = []

    def save_then_fail(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the model is written; the optimizer write dies
            with open(path, "wb") as handle:
                handle.write(b"partial")
            raise OSError("disk full")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", save_then_fail)
    optimizer = torch.optim.Adam(model.parameters())
    take_adam_steps(model, optimizer, steps=1)
    parent = tmp_path / "checkpoints"
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(parent / "step-00000001", model, run_config_dict(tiny_model_config), {"step": 1}, optimizer)
    assert len(calls) == 2
    assert not parent.exists()  # the folder made for the checkpoint goes too


def test_a_failed_save_over_an_existing_checkpoint_keeps_the_old_one(checkpoint, model, tiny_model_config, monkeypatch):
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", fail)
    with pytest.raises(OSError):
        save_checkpoint(checkpoint, model, run_config_dict(tiny_model_config), {"step": 9})
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]


# -- finding checkpoints ---------------------------------------------------------------------------


def make_folders(run, names):
    for name in names:
        (run / "checkpoints" / name).mkdir(parents=True)
        (run / "checkpoints" / name / "config.json").write_text("{}")
    (run / "config.json").write_text("{}")
    return run


def test_resolve_run_folder_prefers_best(tmp_path):
    run = make_folders(tmp_path / "run", ["step-00000010", "best-00000004", "step-00000002", "best-00000001"])
    assert resolve_checkpoint(run) == run / "checkpoints" / "best-00000004"


def test_resolve_run_folder_without_best_takes_the_newest_step_numerically(tmp_path):
    run = make_folders(tmp_path / "run", ["step-9", "step-10", "step-2", ".step-11.tmp-x", "notes"])
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-10"
    assert newest_checkpoint(run, "step") == run / "checkpoints" / "step-10"


def test_resolve_a_checkpoint_folder_is_itself(checkpoint):
    assert resolve_checkpoint(checkpoint) == checkpoint


def test_resolve_none_follows_runs_latest(tmp_path):
    runs = tmp_path / "runs"
    run = make_folders(runs / "20250101-000000", ["step-00000003"])
    point_latest(runs, run)
    assert os.readlink(runs / "latest") == run.name  # relative inside runs/: the pair can move
    assert (runs / "latest").resolve() == run.resolve()
    assert resolve_latest(runs) == run.resolve()
    assert resolve_checkpoint(None, runs) == run.resolve() / "checkpoints" / "step-00000003"


def test_resolve_latest_when_there_is_none(tmp_path):
    with pytest.raises(CheckpointError, match="latest does not exist") as caught:
        resolve_checkpoint(None, tmp_path / "runs")
    assert "zforcing train" in caught.value.hint


@pytest.mark.parametrize("what", ["missing", "file", "empty-folder", "run-without-checkpoints"])
def test_resolve_rejects_what_is_not_a_checkpoint(tmp_path, what):
    path = tmp_path / "thing"
    if what == "file":
        path.write_text("hello")
    elif what == "empty-folder":
        path.mkdir()
    elif what == "run-without-checkpoints":
        (path / "checkpoints").mkdir(parents=True)
        (path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint(path)
    assert str(path) in caught.value.message
    assert caught.value.hint


def test_prune_keeps_the_newest(tmp_path):
    run = make_folders(tmp_path / "run", ["step-1", "step-3", "step-20", "step-100", "best-5"])
    (run / "checkpoints" / "step-1" / "model.safetensors").write_bytes(b"x")
    prune_checkpoints(run, "step", keep=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-5", "step-100", "step-20"]


# -- errors on load --------------------------------------------------------------------------------


def test_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="is not a checkpoint") as caught:
        load_model(tmp_path)
    assert "config.json" in caught.value.message


def test_config_json_without_a_model(checkpoint):
    (checkpoint / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a zforcing checkpoint"):
        load_model(checkpoint)


def test_missing_model_safetensors(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete") as caught:
        load_model(checkpoint)
    assert "model.safetensors is missing" in caught.value.message


@pytest.mark.parametrize("keep", [0, 7, 200, -100], ids=["empty", "7-bytes", "header-cut", "data-cut"])
def test_truncated_model_safetensors(checkpoint, keep):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match="corrupted") as caught:
        load_model(checkpoint)
    assert "model.safetensors" in caught.value.message


def test_garbage_model_safetensors(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupted"):
        load_model(checkpoint)


@pytest.mark.parametrize("content", ['{"model": {"hidden_size": ', "", "\x00\x00"], ids=["truncated", "empty", "binary"])
def test_corrupted_config_json(checkpoint, content):
    (checkpoint / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match="corrupted") as caught:
        load_model(checkpoint)
    assert "config.json" in caught.value.message


def test_config_weights_mismatch(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model"]["hidden_size"] = 16
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its config.json") as caught:
        load_model(checkpoint)
    assert "\n" not in caught.value.message  # one line, not torch's whole report


def test_weights_missing_a_tensor(checkpoint):
    from safetensors.torch import save_file

    tensors = load_file(checkpoint / "model.safetensors")
    tensors.pop(next(iter(tensors)))
    save_file(tensors, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(checkpoint)


@pytest.mark.parametrize("change", [{"colour": "red"}, {"modality": "pictures"}], ids=["unknown-field", "bad-modality"])
def test_invalid_model_config(checkpoint, change):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model"].update(change)
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="invalid model config"):
        load_model(checkpoint)


def test_checkpoint_from_a_newer_version(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["format_version"] = checkpoint_module.CHECKPOINT_FORMAT + 1
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="newer zforcing"):
        load_model(checkpoint)


def test_corrupted_trainer_state(checkpoint):
    (checkpoint / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupted"):
        read_trainer_state(checkpoint)
    (checkpoint / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_trainer_state(checkpoint)
