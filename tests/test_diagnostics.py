"""Posterior-collapse diagnostics: KL per step and dimension, active units, the heat map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import PNG_SIGNATURE, assert_clean_error, invoke, plain
from zforcing_cli.diagnostics import ACTIVE_THRESHOLD, diagnose_split
from zforcing_cli.evaluate import evaluate_split
from zforcing_cli.model import ZForcing, ZForcingConfig


def tiny_model(seed: int = 0) -> ZForcing:
    torch.manual_seed(seed)
    config = ZForcingConfig(modality="binary", input_size=2, start_index=2, embed_size=4, hidden_size=8, latent_size=4, mlp_size=8)
    return ZForcing(config).train(False)


def test_kl_per_step_and_per_dimension_sum_to_the_kl_per_sequence(tiny_dataset):
    model, split = tiny_model(), tiny_dataset.split("test")
    found = diagnose_split(model, split, batch_size=3, seed=5)
    bounds = evaluate_split(model, split, batch_size=3, seed=5)  # the same noise: the same KL
    assert len(found.kl_per_step) == 784 and len(found.kl_per_dimension) == 4
    assert sum(found.kl_per_step) == pytest.approx(bounds.kl, rel=1e-6)
    assert sum(found.kl_per_dimension) == pytest.approx(bounds.kl, rel=1e-6)
    assert np.allclose(np.asarray(found.kl_per_step_and_dimension).sum(1), found.kl_per_step)
    assert found.sequences == len(split)


def test_a_posterior_that_ignores_the_data_has_no_active_units(tiny_dataset):
    model = tiny_model()
    with torch.no_grad():
        model.posterior.out.weight.zero_()  # q(z_t | ...) = N(bias): the same for every sequence
    found = diagnose_split(model, tiny_dataset.split("test"))
    assert found.active_dimensions == 0 and set(found.active_per_step) == {0}
    assert np.max(found.posterior_mean_variance) < 1e-12


def test_a_posterior_that_reads_the_data_has_active_units(tiny_dataset):
    model = tiny_model()
    with torch.no_grad():
        model.posterior.out.weight.mul_(20.0)  # means that swing with the input
    found = diagnose_split(model, tiny_dataset.split("test"))
    variance = np.asarray(found.posterior_mean_variance)
    assert found.active_dimensions == int((variance > ACTIVE_THRESHOLD).any(0).sum()) > 0
    assert found.active_per_step == (variance > ACTIVE_THRESHOLD).sum(1).tolist()


def test_per_step_figures_count_ended_sequences_as_zero(text_data):
    from zforcing_cli.data import open_dataset
    from zforcing_cli.data.text import START

    dataset = open_dataset(text_data)
    torch.manual_seed(0)
    model = ZForcing(ZForcingConfig(modality="tokens", input_size=dataset.meta.input_size, start_index=START,
                                    embed_size=8, hidden_size=16, latent_size=4, mlp_size=16)).train(False)
    split = dataset.split("test")
    found = diagnose_split(model, split, batch_size=4, seed=1)
    assert len(found.kl_per_step) == max(len(split.sentence(i)) for i in range(len(split))) + 1
    assert sum(found.kl_per_step) == pytest.approx(evaluate_split(model, split, batch_size=4, seed=1).kl, rel=1e-6)


def test_cli_diagnostics_table_json_and_plot(in_trained):
    result = invoke("evaluate", "--diagnostics", "--limit", 4, "--plot", "kl.png")
    assert result.exit_code == 0, plain(result.output)
    table = plain(result.stdout)
    assert "active latent dimensions (Var E_q[z] > 0.01)" in table and "KL per step: largest" in table
    assert (in_trained / "kl.png").read_bytes().startswith(PNG_SIGNATURE)
    report = json.loads(invoke("evaluate", "--diagnostics", "--limit", 4, "--json").stdout)
    diagnostics = report["diagnostics"]
    assert len(diagnostics["kl_per_step"]) == 784 and len(diagnostics["kl_per_step_and_dimension"][0]) == diagnostics["latent_size"]
    assert diagnostics["kl"] == pytest.approx(report["kl"], rel=1e-6)
    (in_trained / "kl.png").unlink()


def test_cli_plot_errors(in_trained):
    assert_clean_error(invoke("evaluate", "--plot", "kl.png"), 2, "--diagnostics")
    assert_clean_error(invoke("evaluate", "--diagnostics", "--plot", "kl.jpg"), 2, ".png or .svg")


def test_a_target_that_does_not_vary_is_reported_quiet_and_its_aux_at_the_floor(tiny_dataset):
    """The collapse of the paper's claim made visible: b_t that is the same for every sequence
    (here: a backward LSTM that ignores its input), and an aux head whose log-variance sits at
    the clamp's floor."""
    model = tiny_model()
    with torch.no_grad():
        model.backward_rnn.weight_ih_l0.zero_()  # b_t no longer reads y
        model.aux_head.mlp.out.bias[model.config.hidden_size:] = -50.0  # every log-variance clamped to -8
    found = diagnose_split(model, tiny_dataset.split("test"))
    assert found.aux_floor_fraction == 1.0 and set(found.aux_floor_per_step) == {1.0}
    assert found.backward_variance_median < 1e-12 and found.backward_quiet_fraction == 1.0
    assert found.floor_variance == pytest.approx(np.exp(-8.0))


def test_a_target_that_varies_is_not_quiet(tiny_dataset):
    model = tiny_model()
    with torch.no_grad():
        model.backward_rnn.weight_ih_l0.mul_(30.0)  # b_t swings with the pixels
    found = diagnose_split(model, tiny_dataset.split("test"))
    assert found.aux_floor_fraction == 0.0  # the untrained head's log-variances are near 0
    assert found.backward_variance_median > 1e-3 and found.backward_quiet_fraction < 0.5
    assert len(found.backward_variance_per_step) == 784


def test_the_collapse_warning_names_the_kl_and_its_unit():
    from zforcing_cli.diagnostics import COLLAPSED_KL, collapse_warning

    assert collapse_warning(0.11, "nats per image") == (
        "The latents have collapsed: the validation KL is 0.11 nats per image (under 0.5), so z_t carries almost "
        "nothing about the data; see docs/diagnostics.md, \"Why the latents collapse\".")
    assert collapse_warning(COLLAPSED_KL, "nats per sentence") is None
    assert collapse_warning(3.9, "nats per sentence") is None
    assert collapse_warning(float("nan"), "nats per sequence") is None  # no bound, no claim
