"""sweep/spec.py: a spec is read and checked whole; each mistake is one error that names it."""

from __future__ import annotations

import pytest

from zforcing_cli.errors import UsageError
from sweep_helpers import write_spec  # noqa: F401 - a fixture
from zforcing_cli.sweep.spec import read_spec


def test_the_issues_spec_shape_reads(write_spec):
    spec = read_spec(write_spec(space="aux_weight = [0.0, 0.001]\nlr = { low = 1e-4, high = 1e-2, log = true }\n"
                                      "hidden_size = { low = 8, high = 32, step = 8 }",
                                sweep='seeds = [0, 1, 2, 3, 4]\ntrials = 2\nsampler = "tpe"\nreference = { aux_weight = 0.0 }'))
    assert spec.name == "tiny" and spec.seeds == [0, 1, 2, 3, 4] and spec.trials == 2 and spec.sampler == "tpe"
    assert spec.space["aux_weight"].values == (0.0, 0.001)
    assert (spec.space["lr"].low, spec.space["lr"].high, spec.space["lr"].log) == (1e-4, 1e-2, True)
    assert (spec.space["hidden_size"].low, spec.space["hidden_size"].step) == (8, 8)
    assert spec.metric.name == "valid_bound" and spec.metric.direction == "minimize"
    assert spec.reference == {"aux_weight": 0.0} and spec.base["max_steps"] == 2


def test_a_grid_defaults_to_all_its_points_and_the_hash_ignores_the_count(write_spec):
    grid = read_spec(write_spec(space="aux_weight = [0.0, 0.001]\nbwd_weight = [0.0, 1.0, 2.0]", sweep="seeds = [0]"))
    assert grid.sampler == "grid" and grid.trials == 6
    more = read_spec(write_spec(space="aux_weight = [0.0, 0.001]\nbwd_weight = [0.0, 1.0, 2.0]", sweep="seeds = [0]\ntrials = 3"))
    assert more.trials == 3 and more.digest() == grid.digest()
    other = read_spec(write_spec(space="aux_weight = [0.0, 0.002]\nbwd_weight = [0.0, 1.0, 2.0]", sweep="seeds = [0]"))
    assert other.digest() != grid.digest()


def test_train_option_names_become_field_names(write_spec):
    spec = read_spec(write_spec(space='aux_condition = ["z", "hz"]\ndropout = [0.0, 0.1]', sweep="seeds = [0]"))
    assert spec.space["aux_on_hidden"].values == (False, True)
    assert spec.space["embed_dropout"].values == (0.0, 0.1)


def test_a_variant_axis_takes_tables_of_settings_labelled_by_them(write_spec):
    spec = read_spec(write_spec(space='variant = [{}, { aux_weight = 0.0 }, { aux_weight = 0.0, bwd_weight = 0.0 }]\nlr = [0.001, 0.002]',
                                sweep="seeds = [0]\nreference = { variant = { aux_weight = 0.0 }, lr = 0.001 }"))
    assert spec.space["variant"].values == ("base settings", "aux_weight = 0", "aux_weight = 0, bwd_weight = 0")
    assert spec.sampler == "grid" and spec.trials == 6
    assert spec.reference == {"variant": "aux_weight = 0", "lr": 0.001}
    assert spec.settings_of({"variant": "aux_weight = 0, bwd_weight = 0", "lr": 0.002}) == {"aux_weight": 0.0, "bwd_weight": 0.0, "lr": 0.002}
    assert spec.settings_of({"variant": "base settings", "lr": 0.001}) == {"lr": 0.001}
    labels = read_spec(write_spec(space='variant = [{ latent = false }, { output_head = "linear", hidden_size = 16 }]', sweep="seeds = [0]"))
    assert labels.space["variant"].values == ("latent = false", 'hidden_size = 16, output_head = "linear"')
    other = read_spec(write_spec(space='variant = [{}, { aux_weight = 0.001 }]\nlr = [0.001, 0.002]', sweep="seeds = [0]"))
    assert other.digest() != spec.digest()


@pytest.mark.parametrize("space, sweep, fragment", [
    ("variant = [{ aux_wieght = 0.0 }]", "seeds = [0]", "Unknown setting 'aux_wieght' in a variant"),
    ("variant = [0.0, 1.0]", "seeds = [0]", "variant in"),
    ("variant = [{ seed = 1 }]", "seeds = [0]", "the seeds come from [sweep] seeds"),
    ("variant = [{ lr = 0.1 }, { lr = 0.1 }]", "seeds = [0]", "lists the same settings twice"),
    ("variant = [{ lr = 0.1 }]\nlr = [0.1, 0.2]", "seeds = [0]", "lr in"),
    ("variant = [{}, { lr = 0.1 }]", "seeds = [0]\nreference = { variant = { lr = 0.2 } }", "is not one of [space] variant"),
    ("aux_weight = [0.0, 0.001]", "seeds = [0]\nreference = { variant = {} }", "which is not in [space]"),
    ("aux_wieght = [0.0, 0.001]", "seeds = [0]", "Unknown setting 'aux_wieght' in"),
    ("", "seeds = [0]", "has an empty search space"),
    ("lr = { low = 0.1, high = 0.01 }", 'seeds = [0]\nsampler = "tpe"\ntrials = 2', "the range's low end 0.1 is above its high end 0.01"),
    ("aux_weight = [0.0, 0.001]", "trials = 2", "No seeds in"),
    ("aux_weight = [0.0, 0.001]", "seeds = []", "No seeds in"),
    ("aux_weight = [0.0, 0.001]", "seeds = [1, 1]", "lists a seed twice"),
    ("aux_weight = []", "seeds = [0]", "aux_weight in"),
    ("lr = { low = 0.001, high = 0.01 }", 'seeds = [0]\nsampler = "grid"', "is a range, which a grid cannot take"),
    ("lr = { low = 0.001, high = 0.01 }", 'seeds = [0]\nsampler = "tpe"', "TPE needs to know how many"),
    ("lr = { low = 0.0, high = 0.01, log = true }", 'seeds = [0]\nsampler = "tpe"\ntrials = 2', "lr in"),
    ("seed = [0, 1]", "seeds = [0]", "the seeds come from [sweep] seeds"),
    ("aux_weight = [0.0, 0.001]", "seeds = [0]\nreference = { aux_weight = 0.5 }", "is not in the search space"),
    ("aux_weight = [0.0, 0.001]", "seeds = [0]\nreference = { lr = 0.5 }", "which is not in [space]"),
    ("aux_weight = [0.0, 0.001]", "seeds = [0]\ntrails = 3", "Unknown key 'trails'"),
    ("batch_size = [4, 2.5]", "seeds = [0]", "batch_size in"),
])
def test_a_bad_spec_is_one_error_naming_what_is_wrong(write_spec, space, sweep, fragment):
    with pytest.raises(UsageError) as raised:
        read_spec(write_spec(space=space, sweep=sweep))
    assert fragment in raised.value.message and raised.value.hint


def test_an_unknown_base_setting_is_named_with_its_table(tmp_path, write_spec):
    path = write_spec()
    path.write_text(path.read_text().replace("[base]\n", "[base]\nhiden_size = 3\n"))
    with pytest.raises(UsageError) as raised:
        read_spec(path)
    assert raised.value.message == f"Unknown setting 'hiden_size' in {path} [base]."
    assert "hidden_size" in raised.value.hint
