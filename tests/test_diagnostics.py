"""Is z in use: the KL rate, dimensions in use by their KL, AU-Δ, KL per step and dimension, the heat map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import PNG_SIGNATURE, assert_clean_error, invoke, plain
from zforcing_cli.diagnostics import ACTIVE_THRESHOLD, IN_USE_KL, Accumulator, diagnose_split
from zforcing_cli.evaluate import evaluate_split, evaluation_batches
from zforcing_cli.model import StepTerms, ZForcing, ZForcingConfig


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


def posterior_equal_to_the_prior(model: ZForcing) -> None:
    """q(z_t | h_{t-1}, b_t) := p(z_t | h_{t-1}): the posterior's MLP made the prior's, reading
    h_{t-1} with the prior's weights and b_t with none. z_t then tells the decoder nothing the
    prior does not, whatever the data, yet its mean follows the data through h_{t-1}."""
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.prior.out.weight.mul_(20.0)  # prior means that swing with h_{t-1}
        model.posterior.hidden.weight[:, :hidden] = model.prior.hidden.weight
        model.posterior.hidden.weight[:, hidden:] = 0.0
        model.posterior.hidden.bias.copy_(model.prior.hidden.bias)
        model.posterior.out.load_state_dict(model.prior.out.state_dict())


def test_a_posterior_equal_to_a_learnt_prior_is_not_in_use_though_burdas_raw_test_counts_it(tiny_dataset):
    model = tiny_model()
    posterior_equal_to_the_prior(model)
    found = diagnose_split(model, tiny_dataset.split("test"))
    assert found.kl < 1e-6 and found.kl_per_valid_step < 1e-9
    assert found.in_use_dimensions == 0 and found.in_use_units == 0 and set(found.in_use_per_step) == {0}
    assert found.au_delta_dimensions == 0 and set(found.au_delta_per_step) == {0}
    assert np.max(found.mean_difference_variance) < 1e-10
    # What the old headline measured: μ_q varies with the data (through h_{t-1}), so Burda's
    # raw test counts units active on a z that carries nothing.
    assert found.mean_raw_active_per_step > 1 and np.max(found.raw_posterior_mean_variance) > ACTIVE_THRESHOLD


def every_step_terms(model: ZForcing, split, seed: int = 0) -> StepTerms:
    """The terms of all of the split's sequences in one batch, with diagnose_split's noise."""
    ((batch, noise),) = evaluation_batches(model, split, len(split), len(split), "cpu", seed, None)
    with torch.no_grad():
        return model.step_terms(batch.targets, batch.mask, noise=noise, first_input=batch.first_input)


def test_a_posterior_that_reads_b_t_is_in_use_by_its_kl(tiny_dataset):
    """The count and AU-Δ, checked against the definitions computed here from the terms."""
    model = tiny_model()
    posterior_equal_to_the_prior(model)
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.posterior.hidden.weight[:, hidden:] = 3.0 * torch.randn(model.config.mlp_size, hidden)  # now b_t moves q
        model.backward_rnn.weight_ih_l0.mul_(10.0)  # and b_t moves with the pixels
    split = tiny_dataset.split("test")
    found = diagnose_split(model, split, batch_size=len(split))
    terms = every_step_terms(model, split)
    kl = terms.kl.double().mean(0)  # (T, Z): every sequence has every step
    assert found.in_use_per_step == (kl > IN_USE_KL).sum(1).tolist()
    assert found.in_use_units == int((kl > IN_USE_KL).sum()) > 0
    assert found.in_use_dimensions == int((kl > IN_USE_KL).any(0).sum()) > 0
    assert found.kl_per_valid_step == pytest.approx(float(kl.sum(1).mean()), rel=1e-9)
    difference = (terms.posterior_mean - terms.prior_mean).double()
    variance = difference.var(0, unbiased=False)  # (T, Z)
    assert np.allclose(found.mean_difference_variance, variance.numpy(), rtol=1e-6, atol=1e-12)
    assert found.au_delta_per_step == (variance > ACTIVE_THRESHOLD).sum(1).tolist()
    assert found.mean_au_delta_per_step > 0


def hand_made_terms(kl: list[list[float]], posterior_mean: list[list[float]], prior_mean: list[list[float]],
                    lengths: list[int]) -> StepTerms:
    """StepTerms of len(lengths) sequences of one latent dimension, with the given values (B, T)."""
    batch, steps = len(lengths), len(kl[0])
    mask = (torch.arange(steps) < torch.tensor(lengths)[:, None]).double()
    zeros = torch.zeros(batch, steps, dtype=torch.float64)
    column = lambda values: torch.tensor(values, dtype=torch.float64).unsqueeze(-1)  # noqa: E731
    return StepTerms(nll=zeros, kl=column(kl), aux=zeros, bwd=zeros, log_ratio=zeros, posterior_mean=column(posterior_mean),
                     prior_mean=column(prior_mean), backward=torch.zeros(batch, steps, 1, dtype=torch.float64),
                     aux_at_floor=zeros, mask=mask, bwd_mask=mask)


def test_in_use_averages_each_step_over_the_sequences_that_reach_it_and_au_delta_reads_the_difference():
    totals = Accumulator(latent_size=1, hidden_size=1, clamp=8.0)
    # Sequence lengths 3 and 1. Step 1: KL 0.004 and 0.012 (mean 0.008, not in use); step 3 is
    # reached by the first sequence only: 0.015 (in use), though over both sequences it would be
    # 0.0075. The prior's mean follows the posterior's up to a constant at steps 1 and 2, so the
    # raw means vary (by ±1) while μ_q − μ_p does not.
    totals.add(hand_made_terms(kl=[[0.004, 0.02, 0.015], [0.012, 9.0, 9.0]],
                               posterior_mean=[[1.0, 0.5, 0.0], [-1.0, 0.0, 0.0]],
                               prior_mean=[[0.8, 0.0, 0.0], [-1.2, 0.0, 0.0]], lengths=[3, 1]))
    found = totals.result()
    assert found.in_use_per_step == [0, 1, 1] and found.in_use_units == 2 and found.in_use_dimensions == 1
    assert found.kl_per_valid_step == pytest.approx((0.004 + 0.02 + 0.015 + 0.012) / 4)
    assert found.kl == pytest.approx((0.004 + 0.02 + 0.015 + 0.012) / 2)
    assert found.raw_active_per_step == [1, 0, 0] and found.au_delta_per_step == [0, 0, 0]
    assert found.mean_difference_variance[0][0] == pytest.approx(0.0, abs=1e-15)


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
    assert "KL rate, nats per step" in table and "dimensions in use (KL > 0.01 nats), at some step" in table
    assert "AU-Δ (Var(μ_q − μ_p) > 0.01), per step" in table and "E_q[z]" not in table
    assert (in_trained / "kl.png").read_bytes().startswith(PNG_SIGNATURE)
    report = json.loads(invoke("evaluate", "--diagnostics", "--limit", 4, "--json").stdout)
    diagnostics = report["diagnostics"]
    assert len(diagnostics["kl_per_step"]) == 784 and len(diagnostics["kl_per_step_and_dimension"][0]) == diagnostics["latent_size"]
    assert diagnostics["kl"] == pytest.approx(report["kl"], rel=1e-6)
    assert diagnostics["kl_per_valid_step"] == pytest.approx(report["kl"] / 784, rel=1e-6)
    assert len(diagnostics["in_use_per_step"]) == len(diagnostics["au_delta_per_step"]) == 784
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


def test_the_collapse_warning_names_the_kl_per_step_and_per_sequence():
    from zforcing_cli.diagnostics import collapse_warning

    assert collapse_warning(0.98, 784, "nats per image") == (
        "The latents are hardly in use: the validation KL is 0.0013 nats per step (0.98 nats per image), under the "
        "0.01 that one latent dimension must carry at a step to count as in use; see docs/diagnostics.md, "
        "\"Why the latents collapse\".")
    assert collapse_warning(IN_USE_KL * 20, 20, "nats per sentence") is None  # exactly the threshold per step
    assert collapse_warning(3.3, 25, "nats per sentence") is None  # 0.13 nats per step
    assert collapse_warning(float("nan"), 784, "nats per sequence") is None  # no bound, no claim
