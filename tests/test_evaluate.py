"""evaluate_split: at most batch_size (sequence, sample) pairs per forward pass, whatever K is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zforcing_cli.data import Batch
from zforcing_cli.evaluate import combine_logsumexp, evaluate_split, sample_chunks
from zforcing_cli.model import ZForcing


class ShortSplit:
    """The first `steps` steps of each sequence of a split: 784-step passes would take seconds."""

    def __init__(self, split, steps: int):
        self.split, self.steps = split, steps

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, indices):
        targets, mask, _ = self.split.batch(indices)
        return Batch(targets[:, : self.steps], mask[:, : self.steps])


@pytest.fixture
def model(tiny_model_config) -> ZForcing:
    torch.manual_seed(0)
    return ZForcing(tiny_model_config)


def record_forward_rows(model: ZForcing) -> list[int]:
    """From now on, the number of rows each forward pass of model receives."""
    rows = []
    forward = model.forward

    def recording_forward(targets, *args, **kwargs):
        rows.append(targets.shape[0])
        return forward(targets, *args, **kwargs)

    model.forward = recording_forward
    return rows


@torch.no_grad()
def reference_bounds(model, split, passes, seed: int) -> tuple[float, float, float]:
    """Per-sequence ELBO, KL and IWAE, drawing the samples in the given order of forward passes,
    each (sequence indices, samples per sequence); IWAE from all of a sequence's weights at once."""
    generator = torch.Generator().manual_seed(seed)
    elbo = kl = 0.0
    log_weights: dict[int, list[torch.Tensor]] = {}
    for indices, samples in passes:
        targets, mask, _ = split.batch(np.array(indices))
        out = model(targets.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0),
                    generator=generator, auxiliary=False)
        elbo += out.elbo.double().sum().item()
        kl += out.kl.double().sum().item()
        for index, weights in zip(indices, out.log_importance_weight.double().view(len(indices), samples)):
            log_weights.setdefault(index, []).append(weights)
    per_sequence = [torch.cat(weights) for weights in log_weights.values()]
    draws = sum(len(weights) for weights in per_sequence)  # sequences × K
    iwae = np.mean([torch.logsumexp(weights, 0).item() - math.log(len(weights)) for weights in per_sequence])
    return elbo / draws, kl / draws, iwae


@pytest.mark.parametrize(("samples", "batch_size", "expected"), [
    (3, 6, [3]), (6, 6, [6]), (6, 3, [3, 3]), (7, 3, [3, 3, 1]), (1, 1, [1]),
])
def test_sample_chunks(samples, batch_size, expected):
    assert sample_chunks(samples, batch_size) == expected


def test_combine_logsumexp_equals_logsumexp_of_all_terms():
    terms = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 50 - 3000
    running = None
    for chunk in terms.split([4, 4, 2], dim=1):
        running = combine_logsumexp(running, chunk)
    torch.testing.assert_close(running, torch.logsumexp(terms, dim=1), rtol=0, atol=1e-9)


def test_more_samples_than_batch_size_go_one_sequence_at_a_time(model, tiny_dataset):
    split = ShortSplit(tiny_dataset.split("test"), steps=32)
    expected = reference_bounds(model, split, [([i], n) for i in (0, 1) for n in (2, 2, 1)], seed=7)
    rows, reports = record_forward_rows(model), []
    result = evaluate_split(model, split, batch_size=2, seed=7, limit=2, iwae_samples=5,
                            progress=lambda done, total: reports.append((done, total)))
    assert rows == [2, 2, 1, 2, 2, 1]
    # progress in (sequence, sample) pairs, after each forward pass: one sequence shows its way
    assert reports == [(2, 10), (4, 10), (5, 10), (7, 10), (9, 10), (10, 10)]
    assert (result.elbo, result.kl, result.iwae) == pytest.approx(expected, rel=1e-9)
    assert result.steps == 2 * 32 and result.sequences == 2


def test_samples_that_fit_keep_whole_sequences_per_pass(model, tiny_dataset):
    split = ShortSplit(tiny_dataset.split("test"), steps=32)
    expected = reference_bounds(model, split, [([0, 1], 3), ([2, 3], 3), ([4], 3)], seed=3)
    rows = record_forward_rows(model)
    result = evaluate_split(model, split, batch_size=8, seed=3, limit=5, iwae_samples=3)
    assert rows == [6, 6, 3]  # batch_size // K sequences, all K samples of each
    assert (result.elbo, result.kl, result.iwae) == pytest.approx(expected, rel=1e-9)
    assert evaluate_split(model, split, batch_size=8, seed=3, limit=5, iwae_samples=3) == result


def test_huge_k_never_exceeds_batch_size_rows(model, tiny_dataset):
    split = ShortSplit(tiny_dataset.split("test"), steps=16)
    expected = reference_bounds(model, split, [([0], 50)] * 40, seed=1)
    rows = record_forward_rows(model)
    result = evaluate_split(model, split, batch_size=50, seed=1, limit=1, iwae_samples=2000)
    assert max(rows) == 50 and sum(rows) == 2000
    assert math.isfinite(result.iwae)
    assert (result.elbo, result.kl, result.iwae) == pytest.approx(expected, rel=1e-9)


def test_batch_size_below_one_is_refused(model, tiny_dataset):
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_split(model, tiny_dataset.split("test"), batch_size=0, iwae_samples=2)
