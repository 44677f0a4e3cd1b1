"""What the commands report: never a non-finite number passed off as a result, valid JSON
everywhere, memory bounded by --batch-size, and the details a researcher notices."""

from __future__ import annotations

import importlib
import json
import math
import shutil
import stat
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.main import get_command

from zforcing_cli.cli import app
from zforcing_cli.evaluate import EvalResult
from zforcing_cli.model import ZForcing
from zforcing_cli.presets import MNIST_PRESETS, PRESETS, TRAINING_KINDS, describe_aux_weight, describe_length, training_preset

from conftest import assert_clean_error, invoke, plain

train_module = importlib.import_module("zforcing_cli.train")
update_module = importlib.import_module("zforcing_cli.update")
TINY_TRAIN = ("train", "--batch-size", 4, "--device", "cpu")


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as every JSON reader but Python's does."""
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def nan_validation(*args, **kwargs) -> EvalResult:
    return EvalResult(elbo=math.nan, kl=math.inf, iwae=None, iwae_samples=0, sequences=8, steps=8 * 784)


def test_a_non_finite_validation_bound_is_never_a_result(cwd, tiny_data, monkeypatch):
    monkeypatch.setattr(train_module, "evaluate_split", nan_validation)
    result = invoke(*TINY_TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 2)
    line = assert_clean_error(result, 1, "without a finite validation bound")
    assert "nan" not in plain(result.stdout).lower()
    assert "not finite" in plain(result.stderr)
    assert not list((cwd / "run" / "checkpoints").glob("best-*"))
    records = [strict_json(line) for line in (cwd / "run" / "metrics.jsonl").read_text().splitlines()]
    (valid,) = [record for record in records if record["type"] == "valid"]
    assert valid["elbo"] is None and valid["kl"] is None and valid["improved"] is False
    assert valid["status"] == "non-finite: elbo, kl, nll_bound"
    assert all(record["status"] == "ok" for record in records if record["type"] == "train")
    assert line


def test_a_non_finite_bound_is_not_the_best_after_a_finite_one(cwd, tiny_data, monkeypatch):
    """best-* keeps the finite bound, and a later NaN does not replace it."""
    real = train_module.evaluate_split
    calls = {"n": 0}

    def finite_then_nan(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs) if calls["n"] == 1 else nan_validation()

    monkeypatch.setattr(train_module, "evaluate_split", finite_then_nan)
    result = invoke(*TINY_TRAIN, "--data", tiny_data, "--out", "run", "--epochs", 2)
    assert result.exit_code == 0, plain(result.output)
    assert [p.name for p in (cwd / "run" / "checkpoints").glob("best-*")] == ["best-00000006"]
    assert "Best validation bound: NLL ≤ " in plain(result.stdout) and "nan" not in plain(result.stdout)


def test_evaluate_json_stays_valid_when_a_bound_is_not_finite(in_trained, monkeypatch):
    evaluate_command = importlib.import_module("zforcing_cli.cli.evaluate")
    monkeypatch.setattr(evaluate_command, "evaluate_split", nan_validation)
    result = invoke("evaluate", "--json", "--device", "cpu")
    assert result.exit_code == 1
    report = strict_json(result.stdout)
    assert report["elbo"] is None and report["nll_elbo"] is None and report["status"].startswith("non-finite")
    assert "Error: The bounds came out non-finite" in plain(result.stderr)


def test_evaluate_json_paths_are_absolute_and_units_named(in_trained):
    result = invoke("evaluate", "--json", "--device", "cpu", "--limit", 2)
    assert result.exit_code == 0, plain(result.output)
    report = strict_json(result.stdout)
    assert report["checkpoint"].startswith("/") and report["data"].startswith("/")
    assert report["unit"] == "nats per image" and report["status"] == "ok"


@pytest.fixture
def nan_checkpoint(best_checkpoint, cwd):
    folder = shutil.copytree(best_checkpoint, cwd / "broken")
    tensors = load_file(folder / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], math.nan)
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_non_finite_weights_are_a_clear_error(nan_checkpoint, command, cwd):
    line = assert_clean_error(invoke(command, nan_checkpoint, "--device", "cpu"), 1, "non-finite weights")
    assert "Unexpected" not in line
    assert not (cwd / "samples.png").exists()


def test_a_diverging_lr_stops_with_the_step_named(cwd, tiny_data, monkeypatch):
    model, small = MNIST_PRESETS["small"]
    monkeypatch.setitem(MNIST_PRESETS, "small", (model, replace(small, max_consecutive_skips=3)))
    line = assert_clean_error(invoke(*TINY_TRAIN, "--data", tiny_data, "--out", "run", "--lr", 1e30, "--max-steps", 6), 1, "Training diverged")
    assert "(steps 2 to 4)" in line
    assert not list((cwd / "run").glob("checkpoints/best-*"))


def test_skipped_updates_are_shown(cwd, tiny_data, monkeypatch):
    real = update_module.objective
    calls = {"n": 0}

    def second_is_nan(out, kl_weight, config, aux_weight=None):
        calls["n"] += 1
        return real(out, kl_weight, config, aux_weight) * (math.nan if calls["n"] == 2 else 1.0)

    monkeypatch.setattr(update_module, "objective", second_is_nan)
    result = invoke(*TINY_TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 3)
    assert result.exit_code == 0, plain(result.output)
    assert "step 2: update skipped (non-finite loss or gradient; 1 skipped update so far)" in plain(result.stderr)


@pytest.mark.parametrize("rule, limit, reasons", [
    ("loss-and-grad", None, "non-finite loss or gradient"),
    ("loss", None, "non-finite loss"),
    ("loss", 10_000.0, "non-finite loss, or a KL of 10,000 or more"),
])
def test_a_skipped_update_says_what_the_skip_rule_skips(rule, limit, reasons):
    from zforcing_cli.runconfig import TrainConfig
    from zforcing_cli.train import skip_reasons

    assert skip_reasons(TrainConfig(skip_rule=rule, skip_kl_above=limit)) == reasons


def test_iwae_holds_at_most_batch_size_copies(in_trained, monkeypatch):
    rows = []
    real_forward = ZForcing.forward

    def recording_forward(self, targets, *args, **kwargs):
        rows.append(targets.shape[0])
        return real_forward(self, targets, *args, **kwargs)

    monkeypatch.setattr(ZForcing, "forward", recording_forward)
    result = invoke("evaluate", "--iwae", 10, "--limit", 1, "--batch-size", 3, "--json", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert max(rows) <= 3 and sum(rows) == 10
    report = strict_json(result.stdout)
    assert report["iwae"] >= report["elbo"] - 1.0  # a bound at least as tight, up to the noise of K=10


def test_evaluate_says_how_long_it_will_take(in_trained, monkeypatch):
    """Off a terminal, once the job has run JobProgress.MEASURE_SECONDS (a job shorter than that
    needs no estimate)."""
    from zforcing_cli.console import JobProgress

    monkeypatch.setattr(JobProgress, "MEASURE_SECONDS", 0.0)
    result = invoke("evaluate", "--batch-size", 2, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert "Evaluating test: about" in plain(result.stderr)


def test_checkpoint_files_have_the_run_folder_permissions(trained):
    work, _ = trained
    run = (work / "runs" / "latest").resolve()
    config_mode = stat.S_IMODE((run / "config.json").stat().st_mode)
    for file in (run / "checkpoints").rglob("*"):
        if file.is_file():
            assert stat.S_IMODE(file.stat().st_mode) == config_mode, file


def test_train_help_shows_the_defaults_of_every_data_kind_and_preset(cwd):
    """Not MNIST's defaults as if every data kind had them: a table of each kind's presets."""
    text = plain(invoke("train", "--help", env={"COLUMNS": "300"}).stdout)
    lines = {" ".join(line.split()) for line in text.splitlines()}
    for kind, kind_name, modality in TRAINING_KINDS:
        for preset in PRESETS:
            config = training_preset(preset, kind_name, modality)
            row = (f"{kind} {preset} {describe_length(config)} {config.batch_size} {config.lr:g} "
                   f"{describe_aux_weight(config)} {config.bwd_weight:g}")
            assert row in lines, row
    assert "speech (timit, wav) small 3,000 updates 32 0.001" in " ".join(text.split())
    assert "[default: (the preset's: table below)]" in " ".join(text.split())


def test_a_run_prints_the_settings_it_trains_with(cwd, tiny_data):
    result = invoke(*TINY_TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 2, "--aux-weight", "0.003")
    assert result.exit_code == 0, plain(result.output)
    line = next(line for line in plain(result.stderr).splitlines() if line.startswith("Settings:"))
    assert line.startswith("Settings: small preset, LSTMs of ")
    assert "2 updates" in line and "α 0.003," in line and "precision fp32" in line


@pytest.mark.parametrize("options, schedule", [
    ((), "preset"),  # the preset's schedule of α, whatever it is
    (("--aux-weight", "0.003"), (None, 0.003)),  # --aux-weight alone: a constant α, the paper's form
    (("--aux-weight", "0.003", "--aux-start", "0.01"), (0.01, 0.003)),
    (("--aux-start", "0.01"), (0.01, "preset")),  # from 0.01 to the preset's final α
])
def test_alpha_options_combine_with_the_presets_schedule(cwd, tiny_data, options, schedule):
    result = invoke(*TINY_TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 1, *options)
    assert result.exit_code == 0, plain(result.output)
    recorded = json.loads((cwd / "run" / "config.json").read_text())["train"]
    preset = MNIST_PRESETS["small"][1]
    start, final = (preset.aux_start, preset.aux_weight) if schedule == "preset" else schedule
    assert (recorded["aux_start"], recorded["aux_weight"]) == (start, preset.aux_weight if final == "preset" else final)


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "sample", "interpolate"])
def test_every_option_has_a_description(command):
    for param in get_command(app).commands[command].params:
        assert param.help, f"{command} {param.name} has no description"


@pytest.mark.parametrize("total_steps, warned", [(10**9, True), (1_000, False)])
def test_a_training_that_would_take_days_says_so_once(monkeypatch, total_steps, warned):
    """Measured over its first updates, a run's estimate is said up front when it is over a day."""
    from io import StringIO

    from rich.console import Console
    from rich.progress import Progress

    from zforcing_cli.cli import train as train_cli_module
    from zforcing_cli.train import TrainEvent

    clock = iter([0.0, *range(1, 100)])  # seconds: the reporter starts at 0, then 1 s an update
    monkeypatch.setattr(train_cli_module.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(train_cli_module.TrainReporter, "MEASURE_SECONDS", 20.0)
    out = StringIO()
    reporter = train_cli_module.TrainReporter(Progress(console=Console(file=out, width=300)), 1, "nats")
    reporter(TrainEvent("start", 0, total_steps, 0, metrics={"parameters": 10, "finished": False, "loops": "compiled loops"}))
    for step in range(1, 40):
        reporter(TrainEvent("progress", step, total_steps, 0))
    text = out.getvalue()
    assert text.count("Warning:") == (1 if warned else 0)
    if warned:
        assert "Training will take about" in text and "days more" in text and "--max-steps" in text
