"""Training as a library: exact resume, non-finite losses, the lr schedule and the run folder."""

from __future__ import annotations

import copy
import importlib
from dataclasses import asdict, replace
import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from zforcing_cli import diagnostics
from zforcing_cli.checkpoint import newest_checkpoint, resolve_latest
from zforcing_cli.data import open_dataset
from zforcing_cli.errors import TrainingError, UsageError, ZForcingError
from zforcing_cli.evaluate import evaluate_split
from zforcing_cli.model import ZForcing
from zforcing_cli.plots import CURVE_PANELS
from zforcing_cli.train import StopRequest, Trainer, TrainingStopped, train

from conftest import prepared_mnist, tiny_run_config

CPU = torch.device("cpu")
# The objective and the updates, which the tests below patch where the training step looks them up.
update_module = importlib.import_module("zforcing_cli.update")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """14 train images: with batch 4, epochs of 4 updates whose last batch is partial."""
    return prepared_mnist(tmp_path_factory.mktemp("resume_data"), {"train": 14, "valid": 4, "test": 4}, seed=3)


@pytest.fixture(scope="module")
def two_step_epochs(tmp_path_factory):
    """8 train images: with batch 4, two updates per epoch."""
    return prepared_mnist(tmp_path_factory.mktemp("plateau_data"), {"train": 8, "valid": 4, "test": 4}, seed=4)


def read_records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["type"] == kind]


def final_checkpoint(run_dir: Path) -> Path:
    folder = newest_checkpoint(run_dir, "step")
    assert folder is not None
    return folder


def model_tensors(folder: Path) -> dict[str, list]:
    return {name: tensor.tolist() for name, tensor in load_file(folder / "model.safetensors").items()}


def comparable_state(folder: Path) -> dict:
    state = json.loads((folder / "trainer_state.json").read_text())
    state.pop("elapsed")
    return state


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in records]


# -- exact resume ----------------------------------------------------------------------------------

EPOCHS = 2
STEPS_PER_EPOCH = 4  # ceil(14 / 4)


@pytest.fixture(scope="module")
def uninterrupted(small_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_a") / "run"
    result = train(run_dir, tiny_run_config(small_dataset, epochs=EPOCHS, lr=3e-3), small_dataset, CPU)
    assert result.state.step == EPOCHS * STEPS_PER_EPOCH
    return run_dir


@pytest.mark.parametrize("stop", [2, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1], ids=["mid-epoch", "epoch-boundary", "mid-second-epoch"])
def test_resume_is_bit_identical(uninterrupted, small_dataset, tmp_path, stop):
    run_dir = tmp_path / "run"
    first = train(run_dir, tiny_run_config(small_dataset, epochs=EPOCHS, lr=3e-3, max_steps=stop), small_dataset, CPU)
    assert first.state.step == stop
    assert newest_checkpoint(run_dir, "step").name == f"step-{stop:08d}"
    resumed = train(run_dir, tiny_run_config(small_dataset, epochs=EPOCHS, lr=3e-3), small_dataset, CPU, resume=True)
    assert resumed.state.step == EPOCHS * STEPS_PER_EPOCH

    a, b = final_checkpoint(uninterrupted), final_checkpoint(run_dir)
    assert a.name == b.name
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    # The weights really moved: the comparison is not between two untrained models.
    torch.manual_seed(0)
    initial = ZForcing(tiny_run_config(small_dataset).model).state_dict()
    assert all(not torch.equal(initial[n], weights_a[n]) for n in weights_a)

    optim_a, optim_b = load_file(a / "optimizer.safetensors"), load_file(b / "optimizer.safetensors")
    assert optim_a.keys() == optim_b.keys() and len(optim_a) > 0
    for name in optim_a:
        assert torch.equal(optim_a[name], optim_b[name]), name
    assert comparable_state(a) == comparable_state(b)
    assert without_timing(read_records(uninterrupted, "train")) == without_timing(read_records(run_dir, "train"))


def test_stopping_mid_epoch_does_not_change_the_lr_schedule(two_step_epochs, tmp_path):
    """A run stopped mid-epoch and resumed must halve the lr exactly when the uninterrupted one does.

    lr=1e-30 leaves every float32 weight unchanged, so every validation bound is identical and only
    the plateau logic decides: the uninterrupted run halves once (end of epoch 2).
    """
    def config(**extra):
        return tiny_run_config(two_step_epochs, epochs=2, lr=1e-30, lr_patience=1, **extra)

    train(tmp_path / "a", config(), two_step_epochs, CPU)
    train(tmp_path / "b", config(max_steps=1), two_step_epochs, CPU)
    train(tmp_path / "b", config(), two_step_epochs, CPU, resume=True)
    state_a = comparable_state(final_checkpoint(tmp_path / "a"))
    state_b = comparable_state(final_checkpoint(tmp_path / "b"))
    assert state_a["lr_halvings"] == 1
    assert (state_b["lr_halvings"], state_b["lr"]) == (state_a["lr_halvings"], state_a["lr"])
    assert state_b == state_a


def test_resume_without_a_checkpoint_starts_from_step_0(small_dataset, tmp_path):
    """A run killed before its first checkpoint keeps only its config (and perhaps a cut-off
    metrics line); resuming it trains it whole, exactly as a fresh run."""
    config = tiny_run_config(small_dataset, max_steps=2)
    fresh = train(tmp_path / "fresh", config, small_dataset, CPU)
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"type": "train", "step": 1, "lo')
    events = []
    resumed = train(killed, config, small_dataset, CPU, events.append, resume=True)
    assert [(e.path, e.metrics) for e in events if e.kind == "resume"] == [(None, {})]
    assert resumed.state.step == 2
    assert model_tensors(resumed.last_checkpoint) == model_tensors(fresh.last_checkpoint)
    assert [r["step"] for r in read_records(killed, "train")] == [1, 2]


def test_new_run_refuses_an_existing_folder(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "precious").write_text("x")
    with pytest.raises(ZForcingError, match="already exists"):
        train(run_dir, tiny_run_config(small_dataset, max_steps=1), small_dataset, CPU)
    assert [p.name for p in run_dir.iterdir()] == ["precious"]


def test_a_resume_reports_stale_lock_resume_warning_then_start(small_dataset, tmp_path):
    config = tiny_run_config(small_dataset, max_steps=1)
    train(tmp_path / "run", config, small_dataset, CPU)
    (tmp_path / "run" / "train.lock").write_text(json.dumps({"pid": 4321, "host": "gone"}))  # its holder died
    (tmp_path / "runs").write_text("")  # not a folder: runs/latest cannot be made
    events = []
    train(tmp_path / "run", replace(config, train=replace(config.train, max_steps=2)), small_dataset, CPU, events.append,
          resume=True, latest_link=tmp_path / "runs")
    assert [event.kind for event in events[:4]] == ["stale_lock", "resume", "warning", "start"]
    assert "process 4321 on gone" in events[0].message
    assert events[1].path == tmp_path / "run" / "checkpoints" / "step-00000001" and events[1].step == 1
    assert "latest was not updated" in events[2].message


# -- the trainer's state ---------------------------------------------------------------------------


def test_state_dict_and_load_state_dict_carry_a_run_on_exactly(small_dataset, tmp_path):
    """A trainer that loads another's state_dict() takes the same next update: weights, Adam,
    the trainer's counters and torch's RNG (dropout's) all travel."""
    config = tiny_run_config(small_dataset, lr=3e-3, kl_anneal=True)
    config = replace(config, model=replace(config.model, embed_dropout=0.3))  # the RNG matters
    first = Trainer(tmp_path / "a", config, small_dataset, CPU)
    first.folder.create()
    for start in (0, 4):
        first.take_step(np.arange(start, start + 4))
    first.read_metrics()
    # A copy, as a checkpoint or the broadcast to the other ranks makes: like torch's own state
    # dicts, state_dict() hands out the live tensors of the weights and of Adam's state.
    saved = copy.deepcopy(first.state_dict())
    rng = torch.get_rng_state()
    assert saved["state"]["step"] == 2 and saved["state"]["torch_rng_state"]
    second = Trainer(tmp_path / "b", config, small_dataset, CPU)  # which seeds torch's RNG afresh
    second.folder.create()
    second.load_state_dict(saved)
    assert torch.equal(torch.get_rng_state(), rng)
    again = second.state_dict()
    assert again["state"] == saved["state"]
    assert same(again["model"], saved["model"]) and same(again["optimizer"][0], saved["optimizer"][0])
    assert again["optimizer"][1] == saved["optimizer"][1]
    for trainer in (second, first):
        torch.set_rng_state(rng)  # torch's RNG is the process's: each trainer continues from the saved one
        trainer.take_step(np.arange(8, 12))
        trainer.read_metrics()
    assert same(snapshot(first), snapshot(second))
    assert asdict(first.state) == {**asdict(second.state), "elapsed": first.state.elapsed}


# -- non-finite losses -----------------------------------------------------------------------------


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    for index, state in trainer.updater.optimizer.state_dict()["state"].items():
        for key, value in state.items():
            params[f"optimizer.{index}.{key}"] = value.clone()
    return params


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def nan_loss(out, kl_weight, config, aux_weight=None):
    return real_objective(out, kl_weight, config, aux_weight) * float("nan")


def nan_gradient(out, kl_weight, config, aux_weight=None):
    """A finite loss whose gradient is NaN: d sqrt(x)/dx is infinite at 0, times 0."""
    loss = real_objective(out, kl_weight, config, aux_weight)
    x = out.nll.sum()
    return loss + 0.0 * torch.sqrt(x - x.detach())


real_objective = update_module.objective


def run_with_bad_steps(dataset, run_dir, bad_calls, make_bad, **overrides):
    calls = {"n": 0}

    def objective(out, kl_weight, config, aux_weight=None):
        calls["n"] += 1
        if calls["n"] in bad_calls:
            return make_bad(out, kl_weight, config, aux_weight)
        return real_objective(out, kl_weight, config, aux_weight)

    history = []
    trainer_box = {}

    def callback(event):
        if event.kind in ("start", "step", "skip"):
            history.append((event.kind, event.step, snapshot(trainer_box["t"])))

    trainer = Trainer(run_dir, tiny_run_config(dataset, **overrides), dataset, CPU, callback)
    trainer_box["t"] = trainer
    trainer.folder.create()
    trainer.folder.write_config(trainer.run_config)
    return trainer, history, objective


@pytest.mark.parametrize("make_bad", [nan_loss, nan_gradient], ids=["nan-loss", "nan-gradient"])
def test_a_non_finite_step_never_reaches_the_weights(tiny_dataset, tmp_path, monkeypatch, make_bad):
    trainer, history, objective = run_with_bad_steps(tiny_dataset, tmp_path / "run", {2}, make_bad, max_steps=4)
    monkeypatch.setattr(update_module, "objective", objective)
    result = trainer.run()

    assert [kind for kind, _, _ in history] == ["start", "step", "skip", "step", "step"]
    (_, _, before), (_, _, after_skip) = history[1], history[2]
    assert same(before, after_skip)  # weights and Adam state untouched by the bad step
    assert not same(after_skip, history[3][2])  # training went on
    assert result.state.step == 4
    assert result.state.skipped_steps == 1
    assert result.state.consecutive_skips == 0
    for value in trainer.model.state_dict().values():
        assert torch.isfinite(value).all()
    saved = json.loads((final_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert saved["skipped_steps"] == 1


def test_too_many_non_finite_steps_in_a_row_stop_training(tiny_dataset, tmp_path, monkeypatch):
    trainer, history, objective = run_with_bad_steps(
        tiny_dataset, tmp_path / "run", {2, 3, 4}, nan_loss, max_steps=6, max_consecutive_skips=3,
    )
    monkeypatch.setattr(update_module, "objective", objective)
    with pytest.raises(TrainingError, match="3 updates in a row") as caught:
        trainer.run()
    assert "--lr" in caught.value.hint
    assert [kind for kind, _, _ in history] == ["start", "step", "skip", "skip", "skip"]
    assert trainer.state.step == 4 and trainer.state.skipped_steps == 3
    assert same(history[1][2], history[-1][2])


def test_isolated_skips_do_not_add_up_to_divergence(tiny_dataset, tmp_path, monkeypatch):
    trainer, history, objective = run_with_bad_steps(
        tiny_dataset, tmp_path / "run", {1, 3, 5}, nan_loss, max_steps=6, max_consecutive_skips=2,
    )
    monkeypatch.setattr(update_module, "objective", objective)
    result = trainer.run()
    assert result.state.skipped_steps == 3 and result.state.step == 6


# -- the lr schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize("patience, halved", [(1, [False, True, True]), (2, [False, False, True])])
def test_lr_halves_when_validation_stops_improving(two_step_epochs, tmp_path, patience, halved):
    """lr=1e-30 cannot move a float32 weight, so the validation bound never improves."""
    lr = 1e-30
    run_dir = tmp_path / "run"
    result = train(run_dir, tiny_run_config(two_step_epochs, epochs=3, lr=lr, lr_patience=patience), two_step_epochs, CPU)
    valid = read_records(run_dir, "valid")
    assert [r["lr_halved"] for r in valid] == halved
    assert len({r["elbo"] for r in valid}) == 1
    expected_lrs, current = [], lr
    for was_halved in halved:
        current *= 0.5 if was_halved else 1.0
        expected_lrs.append(current)
    assert [r["lr"] for r in valid] == pytest.approx(expected_lrs, rel=1e-12)
    state = json.loads((final_checkpoint(run_dir) / "trainer_state.json").read_text())
    assert state["lr_halvings"] == sum(halved) == result.state.lr_halvings
    assert state["lr"] == pytest.approx(current, rel=1e-12)
    assert state["optimizer_param_groups"][0]["lr"] == pytest.approx(current, rel=1e-12)  # Adam uses it
    # Updates after a halving run at the new lr.
    train_lrs = [r["lr"] for r in read_records(run_dir, "train")]
    assert train_lrs[-1] == pytest.approx(expected_lrs[-2], rel=1e-12)


# -- the run folder --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs_root")
    run_dir = runs / "run-1"
    events = []
    config = tiny_run_config(tiny_dataset, epochs=1, checkpoint_every=2, keep_checkpoints=2, kl_anneal=True)
    result = train(run_dir, config, tiny_dataset, CPU, events.append)
    return runs, run_dir, result, events


def test_run_folder_has_best_and_pruned_step_checkpoints(finished_run):
    _, run_dir, result, _ = finished_run
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # checkpoint_every=2 wrote step-2, step-4 and step-6; keep_checkpoints=2 kept the newest two.
    assert names == ["best-00000006", "step-00000004", "step-00000006"]
    assert result.best_checkpoint == run_dir / "checkpoints" / "best-00000006"
    assert result.last_checkpoint == run_dir / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in result.best_checkpoint.iterdir()) == ["config.json", "model.safetensors", "trainer_state.json"]
    assert (result.last_checkpoint / "optimizer.safetensors").is_file()
    assert not [p for p in run_dir.rglob(".*")]  # no temporary folders or files left


def test_runs_latest_names_the_run_wherever_it_is(tiny_dataset, tmp_path):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere" / "run"
    train(runs / "inside", tiny_run_config(tiny_dataset, max_steps=1), tiny_dataset, CPU, latest_link=runs)
    assert os.readlink(runs / "latest") == "inside"  # relative: runs/ can move as a whole
    train(elsewhere, tiny_run_config(tiny_dataset, max_steps=1), tiny_dataset, CPU, latest_link=runs)
    assert os.readlink(runs / "latest") == str(elsewhere)
    assert resolve_latest(runs) == elsewhere.resolve()


def test_metrics_have_train_and_valid_records(finished_run):
    _, run_dir, result, _ = finished_run
    train_records, valid_records = read_records(run_dir, "train"), read_records(run_dir, "valid")
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    for record in train_records:
        assert {"loss", "nll", "kl", "aux", "bwd", "elbo", "lr", "kl_weight"} <= record.keys()
        assert math.isfinite(record["loss"])
        # KL annealing: w_kl = 0.2 + 5e-5 per update.
        assert record["kl_weight"] == pytest.approx(0.2 + 5e-5 * record["step"])
    assert len(valid_records) == 1 and valid_records[0]["step"] == 6
    assert valid_records[0]["elbo"] == pytest.approx(result.state.best_valid)
    assert valid_records[0]["nll_bound"] == pytest.approx(-valid_records[0]["elbo"])


def test_training_curves_png_and_svg_with_four_labelled_panels(finished_run):
    _, run_dir, _, _ = finished_run
    assert (run_dir / "training_curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    root = ET.parse(run_dir / "training_curves.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = " ".join(element.text or "" for element in root.iter("{http://www.w3.org/2000/svg}text"))
    for title, _, _ in CURVE_PANELS:
        assert title in texts
    assert [key for _, key, _ in CURVE_PANELS] == ["elbo", "kl", "aux", "lr"]
    assert texts.count("updates") == 4 and "nats (per image)" in texts and "validation" in texts


def test_events_report_progress(finished_run):
    _, _, _, events = finished_run
    kinds = [event.kind for event in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("step") == 6 and kinds.count("validation") == 1
    assert all(event.total_steps == 6 for event in events)
    assert events[0].metrics["parameters"] > 0


@pytest.mark.parametrize("threshold, warnings", [(1e9, 1), (0.0, 0)])
def test_collapsed_latents_are_told_once(tiny_dataset, tmp_path, monkeypatch, threshold, warnings):
    """A validation KL per step under IN_USE_KL warns once, in one line that points to the docs,
    however many validations follow."""
    monkeypatch.setattr(diagnostics, "IN_USE_KL", threshold)
    events = []
    train(tmp_path / "run", tiny_run_config(tiny_dataset, epochs=3), tiny_dataset, CPU, events.append)
    assert [e.kind for e in events].count("validation") == 3
    told = [e.message for e in events if e.kind == "warning"]
    assert len(told) == warnings
    if warnings:
        assert told[0].startswith("The latents are hardly in use: the validation KL is ") and "nats per image" in told[0]
        assert "docs/diagnostics.md" in told[0] and "\n" not in told[0]


def test_a_scheduled_aux_weight_is_logged_with_each_update(tiny_dataset, tmp_path):
    train(tmp_path / "run", tiny_run_config(tiny_dataset, max_steps=4, aux_start=0.01, aux_weight=0.001, aux_increment=0.003),
          tiny_dataset, CPU)
    logged = [r["aux_weight"] for r in read_records(tmp_path / "run", "train")]
    assert logged == pytest.approx([0.01, 0.007, 0.004, 0.001])


def test_evaluating_the_best_checkpoint_reproduces_the_validation_bound(finished_run, tiny_dataset):
    from zforcing_cli.checkpoint import load_model
    from zforcing_cli.evaluate import evaluate_split

    _, run_dir, result, _ = finished_run
    model, config = load_model(result.best_checkpoint)
    assert config["data"]["location"] == tiny_dataset.location
    again = evaluate_split(model, open_dataset(config["data"]["location"]).split("valid"), batch_size=8,
                           seed=config["train"]["seed"])
    assert again.elbo == pytest.approx(result.state.best_valid, rel=1e-6)
    assert again.sequences == 8


def test_resume_clears_checkpoint_writes_cut_short_by_a_kill(small_dataset, tmp_path):
    config = tiny_run_config(small_dataset, max_steps=1)
    run_dir = tmp_path / "run"
    train(run_dir, config, small_dataset, CPU)
    half_written = run_dir / "checkpoints" / ".step-00000002.tmp-x1y2"
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"partial")
    train(run_dir, replace(config, train=replace(config.train, max_steps=2)), small_dataset, CPU, resume=True)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best-00000002", "step-00000001", "step-00000002"]


def test_a_stop_at_the_last_update_leaves_the_final_validation_due(small_dataset, tmp_path):
    """Stopped right after its last update, a run is not finished: its resume validates (and
    says nothing of having taken all its updates); a finished run's resume does nothing."""
    config = tiny_run_config(small_dataset, max_steps=2)
    stop = StopRequest()

    def stop_at_the_end(event):
        if event.kind == "step" and event.step == 2:
            stop.set("SIGINT")

    with pytest.raises(TrainingStopped, match="at step 2"):
        train(tmp_path / "run", config, small_dataset, CPU, stop_at_the_end, stop=stop)
    assert read_records(tmp_path / "run", "valid") == []
    events = []
    resumed = train(tmp_path / "run", config, small_dataset, CPU, events.append, resume=True)
    assert [e.metrics["finished"] for e in events if e.kind == "start"] == [False]
    assert [r["step"] for r in read_records(tmp_path / "run", "valid")] == [2]
    assert resumed.best_checkpoint.name == "best-00000002"
    again = []
    train(tmp_path / "run", config, small_dataset, CPU, again.append, resume=True)
    assert [e.metrics["finished"] for e in again if e.kind == "start"] == [True]
    assert [r["step"] for r in read_records(tmp_path / "run", "valid")] == [2]


# -- precision -------------------------------------------------------------------------------------


def test_bf16_on_the_cpu_trains_under_autocast_and_resumes_bit_for_bit(small_dataset, tmp_path):
    def config(**extra):
        return tiny_run_config(small_dataset, lr=3e-3, precision="bf16", **extra)

    train(tmp_path / "whole", config(max_steps=3), small_dataset, CPU)
    train(tmp_path / "part", config(max_steps=1), small_dataset, CPU)
    train(tmp_path / "part", config(max_steps=3), small_dataset, CPU, resume=True)
    a, b = final_checkpoint(tmp_path / "whole"), final_checkpoint(tmp_path / "part")
    assert a.name == b.name == "step-00000003"
    assert model_tensors(a) == model_tensors(b)
    assert comparable_state(a) == comparable_state(b)
    assert all(t.dtype == torch.float32 for t in load_file(a / "model.safetensors").values())  # the weights stay fp32
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["train"]["precision"] == "bf16"
    # Autocast ran: the first loss is near fp32's but not equal to it.
    train(tmp_path / "fp32", tiny_run_config(small_dataset, lr=3e-3, max_steps=1), small_dataset, CPU)
    bf16_loss, fp32_loss = (read_records(tmp_path / run, "train")[0]["loss"] for run in ("whole", "fp32"))
    assert bf16_loss != fp32_loss and bf16_loss == pytest.approx(fp32_loss, rel=0.02)


def test_fp16_and_tf32_on_the_cpu_and_unknown_precisions_are_refused(tiny_dataset, tmp_path):
    with pytest.raises(UsageError, match="fp16 needs a CUDA device") as caught:
        train(tmp_path / "run", tiny_run_config(tiny_dataset, precision="fp16"), tiny_dataset, CPU)
    assert "bf16" in caught.value.hint
    with pytest.raises(UsageError, match="tf32 needs a CUDA device") as caught:
        train(tmp_path / "run", tiny_run_config(tiny_dataset, precision="tf32"), tiny_dataset, CPU)
    assert "--precision fp32" in caught.value.hint and "TensorFloat-32" in caught.value.hint
    with pytest.raises(UsageError, match="must be fp32, tf32, bf16 or fp16, not 'fp8'"):
        train(tmp_path / "run", tiny_run_config(tiny_dataset, precision="fp8"), tiny_dataset, CPU)
    assert not (tmp_path / "run").exists()


# -- metrics read every few updates (as on a GPU), here on the CPU ---------------------------------


def deferred_trainer(dataset, run_dir, callback=None, read_every=3, **overrides) -> Trainer:
    trainer = Trainer(run_dir, tiny_run_config(dataset, **overrides), dataset, CPU, callback, read_every=read_every)
    trainer.folder.create()
    trainer.folder.write_config(trainer.run_config)
    return trainer


def test_deferred_metrics_arrive_when_they_are_read(tiny_dataset, tmp_path):
    events = []
    trainer = deferred_trainer(tiny_dataset, tmp_path / "deferred", events.append, max_steps=5, kl_anneal=True)
    assert trainer.updater.on_device and trainer.updater.optimizer.param_groups[0]["fused"]
    trainer.run()
    order = [(e.kind, e.step) for e in events if e.kind in ("progress", "step")]
    assert order == [("progress", 1), ("progress", 2), ("step", 1), ("step", 2), ("step", 3), ("progress", 4), ("progress", 5),
                     ("step", 4), ("step", 5)]
    # The same numbers as updates checked one by one (Adam's fused kernel rounds a little differently).
    train(tmp_path / "checked", tiny_run_config(tiny_dataset, max_steps=5, kl_anneal=True), tiny_dataset, CPU)
    deferred, checked = read_records(tmp_path / "deferred", "train"), read_records(tmp_path / "checked", "train")
    assert [r["step"] for r in deferred] == [r["step"] for r in checked] == [1, 2, 3, 4, 5]
    for a, b in zip(deferred, checked):
        assert a["kl_weight"] == b["kl_weight"] and a["epoch"] == b["epoch"]
        for name in ("loss", "nll", "kl", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-4), name


def test_a_deferred_skip_is_counted_when_the_metrics_are_read(tiny_dataset, tmp_path, monkeypatch):
    seen = []
    _, _, objective = run_with_bad_steps(tiny_dataset, tmp_path / "unused", {2}, nan_loss)
    monkeypatch.setattr(update_module, "objective", objective)
    trainer = deferred_trainer(tiny_dataset, tmp_path / "run", lambda e: seen.append((e.kind, e.step, trainer.state.skipped_steps)),
                               max_steps=4, kl_anneal=True)
    result = trainer.run()
    steps = [(kind, step, skipped) for kind, step, skipped in seen if kind in ("progress", "step", "skip")]
    assert steps == [("progress", 1, 0), ("progress", 2, 0), ("step", 1, 0), ("skip", 2, 1), ("step", 3, 1),
                     ("progress", 4, 1), ("step", 4, 1)]
    assert (result.state.step, result.state.skipped_steps, result.state.consecutive_skips) == (4, 1, 0)
    assert result.state.kl_weight == pytest.approx(0.2 + 5e-5 * 3)  # three updates taken
    # Adam's fused kernel left the skipped update out: three steps in its state, as when the
    # host checks each update.
    assert all(state["step"].item() == 3 for state in trainer.updater.optimizer.state_dict()["state"].values())
    checked, _, objective = run_with_bad_steps(tiny_dataset, tmp_path / "checked", {2}, nan_loss, max_steps=4, kl_anneal=True)
    monkeypatch.setattr(update_module, "objective", objective)
    checked.run()
    for name, value in checked.model.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_deferred_divergence_names_the_steps_in_a_row(tiny_dataset, tmp_path, monkeypatch):
    _, _, objective = run_with_bad_steps(tiny_dataset, tmp_path / "unused", {2, 3, 4}, nan_loss)
    monkeypatch.setattr(update_module, "objective", objective)
    trainer = deferred_trainer(tiny_dataset, tmp_path / "run", read_every=5, max_steps=6, max_consecutive_skips=3)
    with pytest.raises(TrainingError, match=r"3 updates in a row had a non-finite loss \(steps 2 to 4\)"):
        trainer.run()
    assert trainer.state.step == 5 and trainer.state.skipped_steps == 3  # noticed at the next reading


def test_deferred_run_names_the_update_that_broke_the_weights(tiny_dataset, tmp_path):
    def break_weights(event):
        if event.kind == "progress" and event.step == 2:
            with torch.no_grad():
                for parameter in trainer.model.parameters():
                    parameter.fill_(float("nan"))

    trainer = deferred_trainer(tiny_dataset, tmp_path / "run", break_weights, read_every=4, max_steps=6)
    with pytest.raises(TrainingError, match="the update at step 2 made the weights non-finite .*, so step 3 could not be taken"):
        trainer.run()


def test_deferred_run_resumes_bit_for_bit_with_its_gradient_scaler(small_dataset, tmp_path):
    """fp16's gradient scaler (here a CPU one on an fp32 run: fp16 itself needs a GPU) is saved
    in the training checkpoint and restored with it."""
    def scaled_trainer(run_dir, max_steps):
        trainer = deferred_trainer(small_dataset, run_dir, read_every=2, max_steps=max_steps, lr=3e-3, kl_anneal=True)
        trainer.updater.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        return trainer

    scaled_trainer(tmp_path / "whole", 3).run()
    scaled_trainer(tmp_path / "part", 1).run()
    resumed = Trainer(tmp_path / "part", tiny_run_config(small_dataset, max_steps=3, lr=3e-3, kl_anneal=True), small_dataset, CPU,
                      read_every=2)
    resumed.updater.scaler = torch.amp.GradScaler("cpu")
    resumed.open(resume=True)
    assert resumed.updater.scaler.get_scale() == 2.0**8
    resumed.run()
    resumed.close()
    a, b = final_checkpoint(tmp_path / "whole"), final_checkpoint(tmp_path / "part")
    assert a.name == b.name == "step-00000003"
    assert model_tensors(a) == model_tensors(b)
    assert comparable_state(a) == comparable_state(b)
    scaler = comparable_state(a)["grad_scaler"]
    assert (scaler["scale"], scaler["_growth_tracker"]) == (2.0**9, 1)  # grew after two updates, one counted since
    assert without_timing(read_records(tmp_path / "whole", "train")) == without_timing(read_records(tmp_path / "part", "train"))


def test_a_gradient_scaler_finding_its_scale_is_not_divergence(small_dataset, tmp_path):
    """A scaler that starts far too high skips the first updates while it halves its scale
    (here about 8: the gradients × 2^127 overflow float32 as fp16's overflow float16). More
    skips in a row than max_consecutive_skips do not stop the run then."""
    trainer = deferred_trainer(small_dataset, tmp_path / "scaled", read_every=2, max_steps=14, max_consecutive_skips=2)
    trainer.updater.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    trainer.run()
    assert 2 < trainer.state.skipped_steps < 14 and trainer.updater.scaler.get_scale() < 2.0**127


# -- CUDA (skipped without a GPU) ------------------------------------------------------------------

CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA_ONLY
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_cuda_training_resumes(small_dataset, tmp_path, precision, monkeypatch):
    cuda = torch.device("cuda")

    def config(**extra):
        return tiny_run_config(small_dataset, epochs=2, lr=3e-3, log_every=2, precision=precision, kl_anneal=True, **extra)

    # The scaler starts where fp16's first gradients of these tiny models fit (FP16_INITIAL_SCALE
    # would skip the first ~10 updates, all five here, while it backs off).
    monkeypatch.setattr(update_module, "FP16_INITIAL_SCALE", 2.0**6)
    train(tmp_path / "whole", config(max_steps=5), small_dataset, cuda)
    train(tmp_path / "part", config(max_steps=3), small_dataset, cuda)
    train(tmp_path / "part", config(max_steps=5), small_dataset, cuda, resume=True)
    a, b = final_checkpoint(tmp_path / "whole"), final_checkpoint(tmp_path / "part")
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-4, atol=1e-5)
    state = comparable_state(a)
    assert state["step"] == 5 and state["skipped_steps"] == comparable_state(b)["skipped_steps"]
    assert bool(state["grad_scaler"]) == (precision == "fp16")
    assert [r["step"] for r in read_records(tmp_path / "whole", "train")] == [2, 4, 5]


def sync_warnings(work) -> int:
    """How many times work() made the host wait for the GPU (torch's sync debug mode)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing CUDA operation" in str(warning.message) for warning in caught)


@CUDA_ONLY
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_updates_and_validation_do_not_wait_for_the_gpu(small_dataset, tmp_path, precision, monkeypatch):
    monkeypatch.setattr(update_module, "FP16_INITIAL_SCALE", 2.0**6)  # see test_cuda_training_resumes
    trainer = Trainer(tmp_path / "run", tiny_run_config(small_dataset, precision=precision, kl_anneal=True, eval_batch_size=2),
                      small_dataset, torch.device("cuda"))
    trainer.folder.create()
    order = np.arange(12)
    trainer.take_step(order[:4])  # first use: lazy initialisations
    assert sync_warnings(lambda: (trainer.take_step(order[4:8]), trainer.take_step(order[8:12]))) == 0
    trainer.read_metrics()
    assert trainer.state.step == 3
    # Validation waits once, at its end, however many passes it takes (two here).
    assert sync_warnings(lambda: evaluate_split(trainer.model, trainer.valid_split, batch_size=2, device="cuda")) == 1
