"""settings.py: settings by name become the configs a run trains with."""

from __future__ import annotations

from dataclasses import fields

import pytest

from zforcing_cli.data import open_dataset
from zforcing_cli.errors import UsageError
from zforcing_cli.model import ZForcingConfig
from zforcing_cli.presets import preset_configs
from zforcing_cli.runconfig import TrainConfig
from zforcing_cli.settings import SETTINGS, check_settings, read_settings_file, resolve


@pytest.fixture(scope="module")
def embedded():
    return open_dataset("embedded")


def test_every_config_field_is_a_setting_but_those_the_data_fixes():
    names = {field.name for field in fields(TrainConfig)} | {field.name for field in fields(ZForcingConfig)}
    assert names - set(SETTINGS) == {"modality", "input_size", "start_index"}
    assert {"data", "preset", "threads", "dropout", "aux_condition"} <= set(SETTINGS)


def test_an_unknown_setting_names_the_closest_ones():
    with pytest.raises(UsageError) as raised:
        check_settings({"hiden_size": 8}, " in x.toml")
    assert raised.value.message == "Unknown setting 'hiden_size' in x.toml."
    assert raised.value.hint.startswith("Did you mean hidden_size, ")  # the closest first


@pytest.mark.parametrize("name, value, fragment", [
    ("batch_size", 3.5, "batch_size must be int, not 3.5"),
    ("batch_size", True, "batch_size must be int, not True"),
    ("kl_anneal", 1, "kl_anneal must be bool, not 1"),
    ("lr", "fast", "lr must be float, not 'fast'"),
    ("lr", 0.0, "lr must be above 0, not 0.0"),
    ("dropout", 1.0, "dropout must be in [0, 1), not 1.0"),
    ("precision", "fp8", "precision must be one of fp32, tf32, bf16, fp16"),
    ("preset", "huge", "preset must be one of small, paper"),
])
def test_a_wrong_value_names_the_setting(name, value, fragment):
    with pytest.raises(UsageError) as raised:
        check_settings({name: value})
    assert fragment in raised.value.message


def test_names_of_the_train_options_set_their_fields():
    checked = check_settings({"dropout": 0.1, "aux_condition": "hz", "lr": 1})
    assert checked == {"embed_dropout": 0.1, "aux_on_hidden": True, "lr": 1.0}
    assert isinstance(checked["lr"], float)
    with pytest.raises(UsageError, match="given twice"):
        check_settings({"dropout": 0.1, "embed_dropout": 0.2})


def test_given_settings_beat_the_preset_which_beats_the_data_kinds_defaults(embedded):
    settings = check_settings({"preset": "paper", "hidden_size": 12, "lr": 0.01, "aux_condition": "hz"})
    resolved = resolve(settings, embedded.meta, 1000)
    paper_model, paper_train = preset_configs("paper", embedded.meta)
    assert resolved.preset == "paper"
    assert resolved.model.hidden_size == 12 and resolved.model.aux_on_hidden
    assert resolved.model.latent_size == paper_model.latent_size  # the preset's where not given
    assert resolved.train.lr == 0.01 and resolved.train.batch_size == paper_train.batch_size
    small = resolve({}, embedded.meta, 1000)
    assert (small.model, small.train) == preset_configs("small", embedded.meta)  # nothing given: the kind's defaults


def test_the_run_length_and_alpha_follow_the_train_options_rules(embedded):
    constant = resolve(check_settings({"aux_weight": 0.002}), embedded.meta, 1000).train
    assert constant.aux_start is None and constant.aux_weight == 0.002  # α alone: constant
    assert resolve(check_settings({"epochs": 3}), embedded.meta, 1000).train.max_steps is None
    longer = resolve(check_settings({"max_steps": 500, "batch_size": 10}), embedded.meta, 1000).train
    assert (longer.max_steps, longer.epochs) == (500, 5)  # 100 batches an epoch
    fitted = resolve(check_settings({"batch_size": 64}), embedded.meta, 24)
    assert fitted.train.batch_size == 24 and "records a batch of 24" in fitted.notes[0]


def test_a_settings_file_is_flat_toml(tmp_path):
    good = tmp_path / "run.toml"
    good.write_text('preset = "small"\nhidden_size = 32\nkl_anneal = true\n')
    assert read_settings_file(good) == {"preset": "small", "hidden_size": 32, "kl_anneal": True}
    nested = tmp_path / "nested.toml"
    nested.write_text("[model]\nhidden_size = 32\n")
    with pytest.raises(UsageError, match=r"\[model\] is a table"):
        read_settings_file(nested)
    broken = tmp_path / "broken.toml"
    broken.write_text("hidden_size = \n")
    with pytest.raises(UsageError, match="is not valid TOML"):
        read_settings_file(broken)
    typo = tmp_path / "typo.toml"
    typo.write_text("hidden = 3\n")
    with pytest.raises(UsageError, match=f"Unknown setting 'hidden' in {typo}"):
        read_settings_file(typo)


def test_settings_that_contradict_each_other_are_a_usage_error(embedded):
    with pytest.raises(UsageError, match="contradict each other: cond_ln has no LSTM biases"):
        resolve(check_settings({"cond_ln": True, "lstm_biases": "two"}), embedded.meta, 1000)
    with pytest.raises(UsageError, match="backward_first 'data' needs frames"):
        resolve(check_settings({"backward_first": "data"}), embedded.meta, 1000)


def test_a_model_without_latent_trains_on_its_nll_alone_and_refuses_a_weight_of_z(embedded):
    resolved = resolve(check_settings({"latent": False}), embedded.meta, 1000)  # the small preset sets α and β
    assert not resolved.model.latent
    train = resolved.train
    assert (train.aux_weight, train.aux_start, train.bwd_weight, train.kl_anneal) == (0.0, None, 0.0, False)
    with pytest.raises(UsageError, match="--bwd-weight 1.0"):
        resolve(check_settings({"latent": False, "bwd_weight": 1.0}), embedded.meta, 1000)
