"""evaluate_split: at most batch_size (sequence, sample) pairs per forward pass, whatever K is."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch

from zforcing_cli.data import Batch
from zforcing_cli.evaluate import ELBO_STREAM, IWAE_STREAM, combine_logsumexp, evaluate_split, noise_generator, sample_chunks
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
def reference_bounds(model, split, sequences: int, draws: list[int], seed: int) -> tuple[float, float, float]:
    """Per-sequence ELBO, KL and IWAE, each sequence on its own with all its K samples in one
    forward pass: the first from its ELBO stream, the others from its IWAE stream in draws of
    the given sizes (as evaluate_split's chunks take them); IWAE from all the weights at once."""
    elbo = kl = iwae = 0.0
    for index in range(sequences):
        targets, mask, _ = split.batch(np.array([index]))
        shape = (int(mask.sum()), model.config.latent_size)
        first = noise_generator(seed, index, ELBO_STREAM, "cpu")
        others = noise_generator(seed, index, IWAE_STREAM, "cpu")
        noise = torch.cat([torch.randn(1, *shape, generator=first)]
                          + [torch.randn(size, *shape, generator=others) for size in draws if size])
        samples = len(noise)
        out = model(targets.repeat(samples, 1), mask.repeat(samples, 1), noise=noise, auxiliary=False)
        elbo += out.elbo[0].item()
        kl += out.kl[0].item()
        iwae += torch.logsumexp(out.log_importance_weight.double(), 0).item() - math.log(samples)
    return elbo / sequences, kl / sequences, iwae / sequences


@pytest.mark.parametrize(("samples", "batch_size", "expected"), [
    (3, 6, [3]), (6, 6, [6]), (6, 3, [3, 3]), (7, 3, [3, 3, 1]), (1, 1, [1]),
])
def test_sample_chunks(samples, batch_size, expected):
    assert list(sample_chunks(samples, batch_size)) == expected


def test_combine_logsumexp_equals_logsumexp_of_all_terms():
    terms = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 50 - 3000
    running = None
    for chunk in terms.split([4, 4, 2], dim=1):
        running = combine_logsumexp(running, chunk)
    torch.testing.assert_close(running, torch.logsumexp(terms, dim=1), rtol=0, atol=1e-9)


def test_more_samples_than_batch_size_go_one_sequence_at_a_time(model, tiny_dataset):
    split = ShortSplit(tiny_dataset.split("test"), steps=32)
    expected = reference_bounds(model, split, 2, draws=[1, 2, 1], seed=7)
    rows, reports = record_forward_rows(model), []
    result = evaluate_split(model, split, batch_size=2, seed=7, limit=2, iwae_samples=5,
                            progress=lambda done, total: reports.append((done, total)))
    assert rows == [2, 2, 1, 2, 2, 1]
    # progress in (sequence, sample) pairs, after each forward pass: one sequence shows its way
    assert reports == [(2, 10), (4, 10), (5, 10), (7, 10), (9, 10), (10, 10)]
    assert (result.elbo, result.kl, result.iwae) == pytest.approx(expected, rel=1e-5)
    assert result.steps == 2 * 32 and result.sequences == 2


def test_samples_that_fit_keep_whole_sequences_per_pass(model, tiny_dataset):
    split = ShortSplit(tiny_dataset.split("test"), steps=32)
    expected = reference_bounds(model, split, 5, draws=[2], seed=3)
    rows = record_forward_rows(model)
    result = evaluate_split(model, split, batch_size=8, seed=3, limit=5, iwae_samples=3)
    assert rows == [6, 6, 3]  # batch_size // K sequences, all K samples of each
    assert (result.elbo, result.kl, result.iwae) == pytest.approx(expected, rel=1e-5)
    assert evaluate_split(model, split, batch_size=8, seed=3, limit=5, iwae_samples=3) == result


def test_huge_k_never_exceeds_batch_size_rows(model, tiny_dataset):
    split = ShortSplit(tiny_dataset.split("test"), steps=16)
    expected = reference_bounds(model, split, 1, draws=[49] + [50] * 39, seed=1)
    rows = record_forward_rows(model)
    result = evaluate_split(model, split, batch_size=50, seed=1, limit=1, iwae_samples=2000)
    assert max(rows) == 50 and sum(rows) == 2000
    assert math.isfinite(result.iwae)
    assert (result.elbo, result.kl, result.iwae) == pytest.approx(expected, rel=1e-5)


class Stop(Exception):
    pass


def test_an_astronomical_k_starts_at_once_in_bounded_memory(model, tiny_dataset):
    """K = 10^15: the samples stream through, batch_size at a time. Holding them, or even the
    list of their chunks (5·10^14 entries), would fail before the first pass."""
    split = ShortSplit(tiny_dataset.split("test"), steps=8)
    rows, reports = record_forward_rows(model), []

    def stop_after_three(done: int, total: int) -> None:
        reports.append((done, total))
        if len(reports) == 3:
            raise Stop

    tracemalloc.start()
    try:
        with pytest.raises(Stop):
            evaluate_split(model, split, batch_size=2, limit=1, iwae_samples=10**15, progress=stop_after_three)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == [2, 2, 2]
    assert reports == [(2, 10**15), (4, 10**15), (6, 10**15)]
    assert peak < 4 << 20  # bytes of Python objects: nothing that grows with K


def test_the_elbo_is_the_same_with_or_without_iwae_and_whatever_the_batch_size(model, tiny_dataset):
    split = ShortSplit(tiny_dataset.split("test"), steps=32)
    alone = evaluate_split(model, split, batch_size=4, seed=9, limit=5)
    for iwae, batch_size in ((7, 4), (7, 100), (0, 1), (3, 2)):
        other = evaluate_split(model, split, batch_size=batch_size, seed=9, limit=5, iwae_samples=iwae)
        assert (other.elbo, other.kl) == pytest.approx((alone.elbo, alone.kl), rel=1e-5), (iwae, batch_size)
    assert evaluate_split(model, split, batch_size=4, seed=10, limit=5).elbo != pytest.approx(alone.elbo, rel=1e-5)


def test_batch_size_below_one_is_refused(model, tiny_dataset):
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_split(model, tiny_dataset.split("test"), batch_size=0, iwae_samples=2)
