"""The paper's bounds (DESIGN.md §3): ELBO with analytic KL, and the IWAE bound with K samples."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from .data import Batch, PreparedDataset, PreparedSplit
from .data.prepared import END
from .distributed import Group
from .model import ZForcing


def bound_unit(modality: str) -> str:
    """What one bound is per: an image for binarized MNIST, a sentence for text, a sequence for audio."""
    return {"binary": "nats per image", "tokens": "nats per sentence"}.get(modality, "nats per sequence")


def bound_sign(modality: str) -> tuple[str, float]:
    """How the paper's tables state a bound for the data kind, and the factor that turns the
    ELBO (a lower bound on log p) into the figure: audio as log-likelihood ≥ the bound (Table 1,
    higher is better), images and text as NLL ≤ minus the bound (Tables 2 and 3, lower is
    better; text with its perplexity beside it)."""
    return ("log-likelihood ≥", 1.0) if modality == "frames" else ("NLL ≤", -1.0)


def stated_bound(modality: str, bound: float, unit: str, exact: bool = False) -> str:
    """A bound on log p(y) as bound_sign states it: 'log-likelihood ≥ -356.46 nats per sequence',
    'NLL ≤ 92.10 nats per image'; exact (a model without latent, whose ELBO is log p(y) itself):
    'NLL 92.10 nats per image (exact)'."""
    label, sign = bound_sign(modality)
    if exact:
        return f"{label.split()[0]} {sign * bound:,.2f} {unit} (exact)"
    return f"{label} {sign * bound:,.2f} {unit}"


def perplexity(bound_per_sequence: float, sequences: int, tokens: int) -> float:
    """Word perplexity exp(-Σ bound / #target tokens) from a bound averaged per sequence."""
    return math.exp(-bound_per_sequence * sequences / tokens)


def unigram_perplexity(train: PreparedSplit, split: PreparedSplit, limit: int | None = None) -> float:
    """The perplexity of a unigram model of the train split's target tokens (each sentence's
    words and its </s>), add-one smoothed over the tokens a sentence can hold, on the first
    `limit` sentences of split (all when None): the baseline a sequence model must beat."""
    return math.exp(unigram_nll(train, split, limit) / target_tokens(split, limit))


def target_tokens(split: PreparedSplit, limit: int | None = None) -> int:
    """The target tokens of the first `limit` sentences of a text split (all when None): their
    words and one </s> each, what a perplexity is per."""
    count = sequence_count(split, limit)
    return int(split.arrays["offsets"][count]) + count


def unigram_nll(train: PreparedSplit, split: PreparedSplit, limit: int | None = None) -> float:
    """The negative log-likelihood in nats, summed over the first `limit` sentences of split, of
    the unigram model of unigram_perplexity."""
    vocabulary = train.meta.input_size
    counts = np.bincount(np.asarray(train.arrays["tokens"]), minlength=vocabulary).astype(np.float64)
    counts[END] += len(train)
    outcomes = vocabulary - 2  # <pad> and <s> are never targets
    log_probs = np.log((counts + 1.0) / (counts.sum() + outcomes))
    count = sequence_count(split, limit)
    words = np.asarray(split.arrays["tokens"][: int(split.arrays["offsets"][count])])
    return -float(log_probs[words].sum() + count * log_probs[END])


BASELINES = {"binary": "uniform Bernoulli (every pixel 1 with probability 1/2)",
             "frames": "global Gaussian (the train split's mean and std for every sample)",
             "tokens": "unigram (add-one smoothed train counts)"}
BASELINE_BATCH = 64  # sequences read at a time for the Gaussian baseline


def baseline_nll(dataset: PreparedDataset, split: str, limit: int | None = None) -> float:
    """The negative log-likelihood, in nats per sequence, of a model that ignores the past (the
    BASELINES) on the first `limit` sequences of split (all when None): what a bound means only
    beside. Exact for the data: the same sequences and targets as evaluate_split's bound."""
    modality, evaluated = dataset.meta.modality, dataset.split(split)
    count = sequence_count(evaluated, limit)
    if modality == "binary":
        return dataset.meta.sequence_length * math.log(2.0)
    if modality == "tokens":
        return unigram_nll(dataset.split("train"), evaluated, limit) / count
    return global_gaussian_nll(evaluated, count) / count


def global_gaussian_nll(split: PreparedSplit, count: int) -> float:
    """Σ -log N(x; 0, 1) over the target samples of the split's first `count` sequences. The
    samples are normalised by the train split's mean and std, so this is the bound of a model
    that predicts every sample from those two figures: 0.5·ln(2πe) per sample on the train split."""
    squares = samples = 0.0
    for start in range(0, count, BASELINE_BATCH):
        batch = split.batch(np.arange(start, min(start + BASELINE_BATCH, count)))
        mask = batch.mask.double()  # (B, T)
        squares += float((batch.targets.double().pow(2).sum(-1) * mask).sum())
        samples += float(mask.sum()) * batch.targets.shape[-1]
    return 0.5 * (samples * math.log(2.0 * math.pi) + squares)


@dataclass
class EvalResult:
    """Averages per sequence, in nats, over `sequences` whole sequences (padding never counted)."""

    elbo: float  # E_q[log p(y|z)] - KL with each sequence's first sample: the same with or without IWAE
    kl: float  # of that first sample
    iwae: float | None  # log (1/K) Σ_k p(y, z_k) / q(z_k | y)
    iwae_samples: int
    sequences: int
    steps: int  # valid target steps (pixels, frames or tokens)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_split(
    model: ZForcing,
    split: PreparedSplit,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    seed: int = 0,
    limit: int | None = None,
    iwae_samples: int = 0,
    progress: Callable[[int, int], None] | None = None,
    group: Group | None = None,
) -> EvalResult:
    """Bounds on log p(y) averaged over the split's sequences (or its first `limit`).

    A forward pass holds at most batch_size (sequence, sample) pairs, whatever K is: with
    K <= batch_size it takes batch_size // K sequences with all their K samples; with more
    samples it takes one sequence and batch_size of its samples at a time, folded into a running
    logsumexp, so that memory does not grow with K. progress(done, total) follows each pass in
    (sequence, sample) pairs, so that even one sequence with a large K shows how far it is.

    The noise is each sequence's own (SequenceNoise): the figures do not depend on batch_size,
    on how the sequences are shared among ranks, or, for the ELBO, on K.

    The sums stay on the device until the end (one wait for it, not one per batch). With a
    group (distributed training), each rank takes its share of every pass, and the sums are
    added over the ranks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    count = sequence_count(split, limit)
    samples = max(iwae_samples, 1)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # ELBO, KL and IWAE sums, steps
    done = 0

    def advance(pairs: int) -> None:
        nonlocal done
        done += pairs
        if progress is not None:
            progress(done, count * samples)

    for batch, noise in evaluation_passes(model, split, count, max(1, batch_size // samples), device, seed, None, group):
        totals += _bound_sums(model, batch, sample_chunks(samples, batch_size), noise, advance)
    if group is not None:
        group.all_reduce(totals)
    elbo, kl, iwae, steps = totals.tolist()
    return EvalResult(
        elbo=elbo / count,
        kl=kl / count,
        iwae=iwae / count if iwae_samples else None,
        iwae_samples=iwae_samples,
        sequences=count,
        steps=int(steps),
    )


def sequence_count(split: PreparedSplit, limit: int | None) -> int:
    """How many sequences a pass over the split takes: its first `limit`, or all of them."""
    return min(len(split), limit) if limit else len(split)


def evaluation_batches(
    model: ZForcing, split: PreparedSplit, count: int, per_pass: int, device: torch.device | str, seed: int,
    progress: Callable[[int, int], None] | None,
) -> Iterator[tuple[Batch, Tensor]]:
    """The split's first `count` sequences, per_pass at a time, on device, each batch with the
    noise (B, T, Z) of the ELBO's sample (evaluate_split's, for the same seed); the model is in
    evaluation mode meanwhile (its mode is restored after) and progress(done, count) follows
    each batch."""
    for batch, noise in evaluation_passes(model, split, count, per_pass, device, seed, progress):
        yield batch, noise.draw(1)


ELBO_STREAM, IWAE_STREAM = 0, 1  # a sequence's two noise streams: its first sample, and the K - 1 others


def noise_generator(seed: int, sequence: int, stream: int, device: torch.device | str) -> torch.Generator:
    """The generator of one sequence's stream of noise: a function of (seed, sequence, stream) alone."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, sequence, stream]).generate_state(1, np.uint64)[0] >> 1))
    return generator


class SequenceNoise:
    """The reparameterisation noise of one pass's sequences, each drawn from its own generators,
    so that a sequence's samples are the same whichever pass (batch size, rank) it falls in.

    A sequence's first sample (the ELBO's) comes from its ELBO_STREAM, the K - 1 others from its
    IWAE_STREAM: the ELBO is the same whether or not IWAE samples are asked for. Each draw
    covers a sequence's valid steps; padding gets zeros (it never reaches a valid step)."""

    def __init__(self, seed: int, indices: np.ndarray, lengths: list[int], steps: int, latent_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.sequences, self.lengths, self.steps = len(indices), lengths, steps
        self.latent_size, self.dtype, self.device = latent_size, dtype, device
        self.elbo = [noise_generator(seed, int(index), ELBO_STREAM, device) for index in indices]
        self.iwae = [noise_generator(seed, int(index), IWAE_STREAM, device) for index in indices]
        self.drawn = 0  # samples drawn per sequence so far

    def draw(self, copies: int) -> Tensor:
        """The next `copies` samples of each sequence: (sequences × copies, T, Z), each sequence's together."""
        noise = torch.zeros(self.sequences, copies, self.steps, self.latent_size, dtype=self.dtype, device=self.device)
        first = 1 if self.drawn == 0 else 0
        for row, length in enumerate(self.lengths):
            if first:
                noise[row, 0, :length] = self.normal((length, self.latent_size), self.elbo[row])
            if copies > first:
                noise[row, first:, :length] = self.normal((copies - first, length, self.latent_size), self.iwae[row])
        self.drawn += copies
        return noise.view(-1, self.steps, self.latent_size)

    def normal(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=self.dtype, device=self.device)


def evaluation_passes(
    model: ZForcing, split: PreparedSplit, count: int, per_pass: int, device: torch.device | str, seed: int,
    progress: Callable[[int, int], None] | None, group: Group | None = None,
) -> Iterator[tuple[Batch | None, SequenceNoise]]:
    """evaluation_batches' passes, each with its noise. With a group, each holds this rank's
    share of the pass's sequences (None when it has none), and its noise theirs."""
    was_training = model.training
    model.train(False)
    dtype = next(model.parameters()).dtype
    try:
        for start in range(0, count, per_pass):
            stop = min(start + per_pass, count)
            indices = np.arange(start, stop)
            rows = slice(0, len(indices)) if group is None else group.rows(len(indices))
            mine = indices[rows]
            batch = split.batch(mine) if len(mine) else None
            lengths = [] if batch is None else batch.mask.sum(1).long().tolist()  # on the host: no wait for a device
            steps = 0 if batch is None else batch.targets.shape[1]
            noise = SequenceNoise(seed, mine, lengths, steps, model.config.latent_size, dtype, device)
            yield None if batch is None else batch.to(device), noise
            if progress is not None:
                progress(stop, count)
    finally:
        model.train(was_training)


def sample_chunks(samples: int, batch_size: int) -> Iterator[int]:
    """How many of a sequence's K samples each forward pass takes: all K at once if they fit.
    A generator, not a list: with K = 10^12 a list of its chunks alone would fill the memory."""
    for start in range(0, samples, batch_size):
        yield min(batch_size, samples - start)


def _bound_sums(model: ZForcing, batch: Batch | None, chunks: Iterator[int], noise: SequenceNoise,
                advance: Callable[[int], None]) -> Tensor:
    """ELBO and KL of each sequence's first sample, IWAE over all its samples (the chunks'
    sum), summed over these sequences, and their steps, as a float64 tensor on the device (zeros
    for no sequences). advance(pairs) follows each chunk with the pass's (sequence, sample)
    pairs it covered."""
    sums = torch.zeros(4, dtype=torch.float64, device=noise.device)
    if batch is None:
        for chunk in chunks:
            advance(noise.sequences * chunk)
        return sums
    sums[3] = batch.mask.double().sum()
    log_weight_sum = None  # per sequence: log Σ_k w_k over the samples drawn so far
    samples = 0
    for chunk in chunks:
        first = samples == 0
        copies = batch.repeat_interleave(chunk)
        out = model(copies.targets, copies.mask, noise=noise.draw(chunk), auxiliary=False, first_input=copies.first_input)
        if first:
            sums[0] = out.elbo.double().view(-1, chunk)[:, 0].sum()
            sums[1] = out.kl.double().view(-1, chunk)[:, 0].sum()
        log_weights = out.log_importance_weight.double().view(-1, chunk)  # (sequences, chunk)
        log_weight_sum = combine_logsumexp(log_weight_sum, log_weights)
        samples += chunk
        advance(noise.sequences * chunk)
    sums[2] = (log_weight_sum - math.log(samples)).sum()
    return sums


def combine_logsumexp(running: Tensor | None, log_terms: Tensor) -> Tensor:
    """running (B,) = log Σ exp of the terms seen so far (None: none yet), extended by log_terms (B, n).

    Each chunk is reduced on its own and merged with logaddexp, so no exp ever overflows and
    only one chunk of terms exists at a time.
    """
    chunk_sum = torch.logsumexp(log_terms, dim=1)
    return chunk_sum if running is None else torch.logaddexp(running, chunk_sum)
