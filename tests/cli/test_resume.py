"""`zforcing train --resume` as a user types it: repeated options, a moved dataset, run lengths,
and `runs/latest` wherever the run lies."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from zforcing_cli.data import EMBEDDED, open_dataset, prepare
from zforcing_cli.presets import preset_configs
from zforcing_cli.settings import resolve

from conftest import assert_clean_error, invoke, plain, write_amat_folder

TRAIN = ("train", "--batch-size", 4, "--seed", 1, "--device", "cpu")


def trainer_step(run_dir) -> int:
    (folder,) = sorted((run_dir / "checkpoints").glob("step-*"))[-1:]
    return json.loads((folder / "trainer_state.json").read_text())["step"]


@pytest.fixture
def two_step_run(cwd, tiny_data):
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 2)
    assert result.exit_code == 0, plain(result.output)
    return cwd / "run"


def test_resume_accepts_the_original_options_repeated(two_step_run, tiny_data):
    result = invoke(*TRAIN, "--data", tiny_data, "--out", two_step_run, "--max-steps", 3, "--preset", "small",
                    "--aux-condition", "z", "--resume")
    assert result.exit_code == 0, plain(result.output)
    assert "Resuming from" in plain(result.stderr) and "(step 2 of 3)" in plain(result.stderr)
    assert trainer_step(two_step_run) == 3


def test_resume_names_both_values_of_a_changed_option(two_step_run):
    line = assert_clean_error(invoke("train", "--out", two_step_run, "--resume", "--seed", 2), 2)
    assert "--seed 2 differs from the run's 1" in line


def test_lr_patience_is_recorded_and_kept_on_resume(cwd, tiny_data):
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 2, "--lr-patience", 5)
    assert result.exit_code == 0, plain(result.output)
    assert json.loads((cwd / "run" / "config.json").read_text())["train"]["lr_patience"] == 5
    line = assert_clean_error(invoke("train", "--out", "run", "--resume", "--lr-patience", 2), 2)
    assert "--lr-patience 2 differs from the run's 5" in line


def test_a_run_that_recorded_a_patience_of_1_resumes_with_it(two_step_run):
    """Runs written when the default was 1 keep their schedule."""
    config = json.loads((two_step_run / "config.json").read_text())
    assert config["train"]["lr_patience"] == 3  # today's default
    config["train"]["lr_patience"] = 1
    (two_step_run / "config.json").write_text(json.dumps(config))
    result = invoke("train", "--out", two_step_run, "--resume", "--max-steps", 3, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert json.loads((two_step_run / "config.json").read_text())["train"]["lr_patience"] == 1


def test_resume_finds_its_dataset_in_a_new_place(two_step_run, tiny_data, cwd):
    moved = shutil.copytree(tiny_data, cwd / "moved-data")
    result = invoke("train", "--out", two_step_run, "--resume", "--max-steps", 3, "--data", moved, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert "now lies at" in plain(result.stderr)
    assert json.loads((two_step_run / "config.json").read_text())["data"]["location"] == str(moved.resolve())


def test_resume_refuses_a_different_dataset(two_step_run, cwd):
    write_amat_folder(cwd / "other-amat", seed=9)
    prepare("mnist", str(cwd / "other-amat"), cwd / "other")
    line = assert_clean_error(invoke("train", "--out", two_step_run, "--resume", "--data", cwd / "other"), 1)
    assert "is not the dataset the run was trained on" in line and "fingerprint" in line
    assert trainer_step(two_step_run) == 2


def test_resume_after_the_dataset_moved_says_to_pass_data(cwd, tiny_data):
    data = shutil.copytree(tiny_data, cwd / "data")
    assert invoke(*TRAIN, "--data", data, "--out", "run", "--max-steps", 1).exit_code == 0
    data.rename(cwd / "elsewhere")
    result = invoke("train", "--out", "run", "--resume", "--max-steps", 2)
    assert_clean_error(result, 1, "The run's dataset cannot be opened")
    assert "--data" in plain(result.stderr)


def test_max_steps_beyond_one_epoch_trains_as_asked(cwd, tiny_data):
    """24 images in batches of 4: an epoch is 6 updates, and the small preset is one epoch."""
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 8)
    assert result.exit_code == 0, plain(result.output)
    assert trainer_step(cwd / "run") == 8


def test_epochs_below_max_steps_say_which_wins(cwd, tiny_data):
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 8, "--epochs", 1)
    assert result.exit_code == 0, plain(result.output)
    assert "--epochs 1 ends the run after 6 updates, before --max-steps 8" in plain(result.stderr)
    assert trainer_step(cwd / "run") == 6


def test_runs_latest_finds_a_run_trained_anywhere(cwd, tiny_data, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "my run"
    assert invoke(*TRAIN, "--data", tiny_data, "--out", elsewhere, "--max-steps", 1).exit_code == 0
    assert os.readlink(cwd / "runs" / "latest") == str(elsewhere)
    evaluated = invoke("evaluate", "--device", "cpu", "--json")
    assert evaluated.exit_code == 0, plain(evaluated.output)
    assert json.loads(evaluated.stdout)["checkpoint"].startswith(str(elsewhere.resolve()))
    assert invoke("sample", "--num", 1, "--device", "cpu").exit_code == 0
    resumed = invoke("train", "--resume", "--max-steps", 2, "--device", "cpu")
    assert resumed.exit_code == 0, plain(resumed.output)
    assert trainer_step(elsewhere) == 2


def test_next_line_is_shell_quoted_and_counts_are_singular(cwd, tiny_data):
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "my run", "--max-steps", 1)
    assert result.exit_code == 0, plain(result.output)
    assert "Next: zforcing evaluate 'my run'  or  zforcing sample 'my run'" in plain(result.stdout)
    assert "; 1 update;" in plain(result.stderr)
    assert "nats per image" in plain(result.stdout) and "per sequence" not in plain(result.output)


# -- the departures' options (docs/protocols.md): recorded, kept on --resume, and runs from before them ------

NEW_MODEL_KEYS = ("output_head", "backward_first", "init", "lstm_biases", "cond_ln", "backward_layers", "aux_cost")
NEW_TRAIN_KEYS = ("kl_anneal_on_skip", "skip_rule", "skip_kl_above")


def test_departure_options_are_recorded_and_kept_on_resume(cwd, tiny_data):
    options = ("--output-head", "linear", "--init", "authors", "--lstm-biases", "two", "--backward-layers", 2,
               "--aux-cost", "l2", "--skip-rule", "loss", "--kl-anneal", "--kl-anneal-on-skip", "advance", "--skip-kl-above", 5000)
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 2, *options)
    assert result.exit_code == 0, plain(result.output)
    config = json.loads((cwd / "run" / "config.json").read_text())
    assert {key: config["model"][key] for key in ("output_head", "init", "lstm_biases", "backward_layers", "aux_cost")} == dict(
        output_head="linear", init="authors", lstm_biases="two", backward_layers=2, aux_cost="l2")
    assert (config["train"]["skip_rule"], config["train"]["kl_anneal_on_skip"], config["train"]["skip_kl_above"]) == ("loss", "advance", 5000)
    assert "one-Linear heads" in plain(result.stderr) and "skipping on a non-finite loss only" in plain(result.stderr)
    result = invoke(*TRAIN, "--out", "run", "--max-steps", 3, "--resume", *options)
    assert result.exit_code == 0, plain(result.output)
    assert trainer_step(cwd / "run") == 3
    line = assert_clean_error(invoke("train", "--out", "run", "--resume", "--output-head", "mlp"), 2)
    assert "--output-head mlp differs from the run's linear" in line


def test_a_run_from_before_the_departure_options_resumes_with_their_old_values(two_step_run):
    """config.json of a run made before these options lacks their keys: they take the values
    that reproduce it (the model's equations: test_model.py), and repeating them is accepted."""
    path = two_step_run / "config.json"
    config = json.loads(path.read_text())
    for key in NEW_MODEL_KEYS:
        del config["model"][key]
    for key in NEW_TRAIN_KEYS:
        del config["train"][key]
    path.write_text(json.dumps(config))
    result = invoke(*TRAIN, "--out", two_step_run, "--max-steps", 3, "--resume", "--output-head", "mlp", "--init", "torch",
                    "--skip-rule", "loss-and-grad")
    assert result.exit_code == 0, plain(result.output)
    assert trainer_step(two_step_run) == 3
    line = assert_clean_error(invoke("train", "--out", two_step_run, "--resume", "--lstm-biases", "two"), 2)
    assert "--lstm-biases two differs from the run's one" in line


@pytest.mark.parametrize(("options", "fragment"), [
    (("--backward-first", "data"), "--backward-first data is for speech"),
    (("--cond-ln", "--lstm-biases", "two"), "--cond-ln has no LSTM biases"),
    (("--output-head", "deep"), "--output-head must be one of mlp, linear"),
    (("--skip-rule", "grad"), "--skip-rule must be one of loss-and-grad, loss"),
    (("--skip-kl-above", "0"), "--skip-kl-above must be a finite number above 0"),
])
def test_departure_options_that_contradict_the_data_or_each_other_are_usage_errors(cwd, tiny_data, options, fragment):
    assert_clean_error(invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--max-steps", 1, *options), 2, fragment)
    assert not (cwd / "run").exists()


def test_cond_ln_takes_the_paper_presets_model_without_its_two_biases():
    meta = open_dataset(EMBEDDED).meta
    model, _ = preset_configs("paper", meta)
    config = resolve({"preset": "paper", "cond_ln": True}, meta, 1000).model  # as train takes --cond-ln
    assert model.lstm_biases == "two" and config.cond_ln and config.lstm_biases == "one" and config.init == "authors"
