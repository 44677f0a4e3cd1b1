"""`zforcing train`'s model sizes as options and `--config FILE`: what lands in config.json, which
source wins, what --resume refuses, and a bad file as one error before any run folder."""

from __future__ import annotations

import json
import re

import pytest

from zforcing_cli.model import ZForcing, count_parameters
from zforcing_cli.modelconfig import ZForcingConfig

from conftest import assert_clean_error, invoke, plain

TRAIN = ("train", "--batch-size", 4, "--seed", 1, "--device", "cpu", "--max-steps", 1)
SIZES = {"hidden_size": 12, "latent_size": 3, "mlp_size": 10, "embed_size": 5}


def recorded_model(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())["model"]


def test_size_options_land_in_config_json_and_the_parameter_count(cwd, tiny_data):
    options = [part for name, value in SIZES.items() for part in ("--" + name.replace("_", "-"), value)]
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", *options)
    assert result.exit_code == 0, plain(result.output)
    model = recorded_model(cwd / "run")
    assert {name: model[name] for name in SIZES} == SIZES
    printed = int(re.search(r"([\d,]+) parameters;", plain(result.stderr)).group(1).replace(",", ""))
    assert printed == count_parameters(ZForcing(ZForcingConfig.from_dict(model)))
    assert "LSTMs of 12, z of 3, MLPs of 10, embedding 5" in plain(result.stderr)  # the Settings line


def test_a_config_file_sets_values_under_the_command_line_and_over_the_preset(cwd, tiny_data):
    (cwd / "settings.toml").write_text("hidden_size = 12\nlatent_size = 3\ndropout = 0.25\nvalid_limit = 7\n")
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--config", "settings.toml", "--latent-size", 4)
    assert result.exit_code == 0, plain(result.output)
    config = json.loads((cwd / "run" / "config.json").read_text())
    assert config["model"]["hidden_size"] == 12  # the file over the small preset's 64
    assert config["model"]["latent_size"] == 4  # the command line over the file
    assert config["model"]["embed_dropout"] == 0.25 and config["train"]["valid_limit"] == 7
    assert "LSTMs of 12, z of 4" in plain(result.stderr)


def test_a_config_file_gives_the_run_length(cwd, tiny_data):
    (cwd / "settings.toml").write_text("max_steps = 2\nbatch_size = 4\n")
    result = invoke("train", "--data", tiny_data, "--out", "run", "--config", "settings.toml", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert json.loads((cwd / "run" / "config.json").read_text())["train"]["max_steps"] == 2


def test_resume_refuses_another_hidden_size_and_accepts_the_same(cwd, tiny_data):
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--hidden-size", 12)
    assert result.exit_code == 0, plain(result.output)
    line = assert_clean_error(invoke("train", "--out", "run", "--resume", "--hidden-size", 16), 2)
    assert "--hidden-size 16 differs from the run's 12" in line
    (cwd / "same.toml").write_text("hidden_size = 12\n")
    result = invoke("train", "--out", "run", "--resume", "--config", "same.toml", "--max-steps", 2, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)


def test_resume_names_a_changed_settings_file_entry_by_its_key_and_file(cwd, tiny_data):
    (cwd / "first.toml").write_text("valid_limit = 7\nhidden_size = 12\n")
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--config", "first.toml")
    assert result.exit_code == 0, plain(result.output)
    (cwd / "second.toml").write_text('valid_limit = 5\nhidden_size = 12\naux_condition = "z"\n')
    result = invoke("train", "--out", "run", "--resume", "--config", "second.toml")
    line = assert_clean_error(result, 2, "valid_limit = 5 in second.toml differs from the run's 7")
    assert "--valid-limit" not in plain(result.output)  # no such option
    assert "Remove valid_limit from second.toml (or set it to 7)" in plain(result.stderr)
    (cwd / "third.toml").write_text("hidden_size = 16\n")  # an option exists, but the file gave it
    line = assert_clean_error(invoke("train", "--out", "run", "--resume", "--config", "third.toml"), 2)
    assert "hidden_size = 16 in third.toml differs from the run's 12" in line
    line = assert_clean_error(invoke("train", "--out", "run", "--resume", "--config", "third.toml", "--hidden-size", 14), 2)
    assert "--hidden-size 14 differs from the run's 12" in line  # the command line's value, named as it was given


@pytest.mark.parametrize(("text", "fragment"), [
    (None, "missing.toml does not exist"),
    ("hidden_size = \n", "not valid TOML"),
    ("hiden_size = 12\n", "Unknown setting 'hiden_size'"),
    ('hidden_size = "big"\n', "hidden_size in"),
    ("hidden_size = 0\n", "must be above 0"),
    ("[model]\nhidden_size = 12\n", "is a table"),
])
def test_a_bad_config_file_is_one_error_and_no_run_folder(cwd, tiny_data, text, fragment):
    path = cwd / ("missing.toml" if text is None else "bad.toml")
    if text is not None:
        path.write_text(text)
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--config", path)
    assert result.exit_code in (1, 2), plain(result.output)
    assert fragment in assert_clean_error(result, result.exit_code)
    assert not (cwd / "run").exists() and not (cwd / "runs").exists()


def test_a_size_below_1_is_refused_by_the_option(cwd, tiny_data):
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--mlp-size", 0)
    assert result.exit_code == 2 and not (cwd / "run").exists()
    assert "--mlp-size" in plain(result.output)


def test_clip_norm_is_an_option_recorded_and_kept_on_resume(cwd, tiny_data):
    result = invoke(*TRAIN, "--data", tiny_data, "--out", "run", "--clip-norm", 5)
    assert result.exit_code == 0, plain(result.output)
    assert json.loads((cwd / "run" / "config.json").read_text())["train"]["clip_norm"] == 5.0
    line = assert_clean_error(invoke("train", "--out", "run", "--resume", "--clip-norm", 7), 2)
    assert "--clip-norm 7" in line and "5" in line
    line = assert_clean_error(invoke(*TRAIN, "--data", tiny_data, "--out", "other", "--clip-norm", 0), 2)
    assert "--clip-norm must be a finite number above 0, not 0.0." in line
    assert not (cwd / "other").exists()
