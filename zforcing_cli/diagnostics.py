"""Is the latent variable in use? The paper's central claim (Figure 2, Table 2) made visible.

Over a split's sequences, with one posterior sample each:

- the KL rate, E_x[KL(q(z_t | h_{t-1}, b_t) ‖ p(z_t | h_{t-1}))], per step and per sequence; the
  KL per time step and per latent dimension, and both at once (a steps × dimensions map);
- the latent dimensions in use, counted by their KL: dimension d is in use at step t when its
  KL at t, averaged over the sequences that reach t, exceeds IN_USE_KL nats;
- AU-Δ, Burda et al.'s (2016) active-unit test moved to the posterior-minus-prior mean:
  dimension d is active at step t when Var_x(μ_q − μ_p) exceeds ACTIVE_THRESHOLD. The prior
  p(z_t | h_{t-1}) is learnt and follows the data through h_{t-1}; a posterior mean that only
  follows the prior's varies over the data without carrying anything the prior lacks. For a
  fixed N(0, I) prior, μ_p = 0 and this is Burda's test;
- secondary, and misleading under a learnt prior: Burda's raw test on Var_x(μ_q) alone, kept so
  that the two can be compared;
- the auxiliary cost −log p(b_t | z_t) per step, and how much of it sits at the floor that the
  clamp of its log-variance allows: the share of b_t's dimensions whose aux log-variance is at
  −clamp (the head then claims to know b_t to within e^(−clamp/2));
- the variance over the data of the aux cost's target b_t, per step and unit: a target that
  barely varies from sequence to sequence is predicted to the floor without any information
  in z_t (docs/diagnostics.md, "Why the latents collapse").

Means are taken along the sampled path of the steps before t. Per-step KL and aux figures are
sums over the sequences divided by their number (a sequence that has ended adds nothing), so
that they add up over steps to the per-sequence averages that `evaluate` reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from .data import PreparedSplit
from .evaluate import evaluation_batches, sequence_count
from .fileio import write_bytes
from .model import StepTerms, ZForcing
from .plots import figure_bytes, new_figure

IN_USE_KL = 0.01  # nats: a latent dimension whose KL at a step, averaged over the data, exceeds this is in use there
ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016)'s threshold on a variance over the data, here of μ_q − μ_p (AU-Δ)


def collapse_warning(kl: float, steps: float, unit: str) -> str | None:
    """The one-line warning for a validation KL of `kl` nats per sequence over `steps` steps per
    sequence (on average) when its rate per step is under IN_USE_KL, else None. Under that rate
    the average step has no latent dimension in use, whatever the KL per sequence adds up to."""
    rate = kl / steps if steps > 0 else float("nan")
    if not rate < IN_USE_KL:
        return None
    per = unit.removeprefix("nats ")
    return (f"The latents are hardly in use: the validation KL is {rate:.2g} nats per step ({kl:.2f} nats {per}), "
            f"under the {IN_USE_KL:g} that one latent dimension must carry at a step to count as in use; "
            "see docs/diagnostics.md, \"Why the latents collapse\".")


@dataclass
class Diagnostics:
    sequences: int
    steps: int  # valid steps, summed over the sequences
    latent_size: int
    kl_per_step: list[float]  # (T,) nats
    kl_per_dimension: list[float]  # (Z,) nats, summed over steps
    kl_per_step_and_dimension: list[list[float]]  # (T, Z)
    in_use_per_step: list[int]  # (T,) dimensions whose KL, averaged over the sequences that reach t, exceeds IN_USE_KL
    in_use_dimensions: int  # dimensions in use at some step
    in_use_units: int  # (step, dimension) pairs in use
    mean_difference_variance: list[list[float]]  # (T, Z) Var over the data of μ_q − μ_p (AU-Δ's variances)
    au_delta_per_step: list[int]  # (T,) dimensions whose Var_x(μ_q − μ_p) exceeds ACTIVE_THRESHOLD
    au_delta_dimensions: int  # dimensions AU-Δ-active at some step
    raw_posterior_mean_variance: list[list[float]]  # (T, Z) secondary: Var over the data of μ_q alone
    raw_active_per_step: list[int]  # (T,) secondary: Burda's raw test, Var_x(μ_q) > ACTIVE_THRESHOLD
    aux_per_step: list[float]  # (T,)
    aux_floor_per_step: list[float]  # (T,) share of b_t's dimensions whose aux log-variance is at the floor
    aux_floor_fraction: float  # the same over every valid step
    backward_variance_per_step: list[float]  # (T,) median over units of Var over the data of b_t
    backward_variance_median: float  # median over steps and units of Var_x(b_t)
    backward_quiet_fraction: float  # share of (step, unit) whose Var_x(b_t) is below the aux floor's variance
    floor_variance: float  # e^(-clamp): the aux head's smallest variance
    in_use_threshold: float = IN_USE_KL
    active_threshold: float = ACTIVE_THRESHOLD

    @property
    def kl(self) -> float:
        """The KL rate in nats per sequence."""
        return float(sum(self.kl_per_step))

    @property
    def kl_per_valid_step(self) -> float:
        """The KL rate in nats per step: the KL summed over the sequences and their steps, over the steps."""
        return self.kl * self.sequences / self.steps if self.steps else 0.0

    @property
    def mean_in_use_per_step(self) -> float:
        return mean_count(self.in_use_per_step)

    @property
    def mean_au_delta_per_step(self) -> float:
        return mean_count(self.au_delta_per_step)

    @property
    def mean_raw_active_per_step(self) -> float:
        return mean_count(self.raw_active_per_step)

    def to_dict(self) -> dict:
        return {**asdict(self), "kl": self.kl, "kl_per_valid_step": self.kl_per_valid_step,
                "mean_in_use_per_step": self.mean_in_use_per_step, "mean_au_delta_per_step": self.mean_au_delta_per_step,
                "mean_raw_active_per_step": self.mean_raw_active_per_step}


def mean_count(per_step: list[int]) -> float:
    return float(np.mean(per_step)) if per_step else 0.0


class Accumulator:
    """Running sums over batches of sequences of different lengths (float64)."""

    def __init__(self, latent_size: int, hidden_size: int, clamp: float):
        self.latent_size, self.hidden_size, self.clamp = latent_size, hidden_size, clamp
        self.sequences = 0
        self.kl = np.zeros((0, latent_size))  # (T, Z) Σ over sequences
        self.aux = np.zeros(0)
        self.count = np.zeros(0)  # sequences valid at each step
        self.difference_sum = np.zeros((0, latent_size))  # of μ_q − μ_p
        self.difference_squares = np.zeros((0, latent_size))
        self.mean_sum = np.zeros((0, latent_size))  # of μ_q
        self.mean_squares = np.zeros((0, latent_size))
        self.floor = np.zeros(0)  # Σ over sequences of the dimensions at the aux floor
        self.b_sum = np.zeros((0, hidden_size))
        self.b_squares = np.zeros((0, hidden_size))

    SUMS = ("kl", "aux", "count", "difference_sum", "difference_squares", "mean_sum", "mean_squares", "floor", "b_sum",
            "b_squares")

    def grow(self, steps: int) -> None:
        extra = steps - len(self.count)
        if extra > 0:
            for name in self.SUMS:
                array = getattr(self, name)
                setattr(self, name, np.concatenate([array, np.zeros((extra, *array.shape[1:]))]))

    def add(self, terms: StepTerms) -> None:
        """One batch's terms: kl, posterior_mean, prior_mean (B, T, Z); aux, mask, aux_at_floor
        (B, T); backward (B, T, H)."""
        mask = terms.mask.double()
        steps = mask.shape[1]
        self.grow(steps)
        weights = mask.unsqueeze(-1)

        def masked_sum(values: torch.Tensor, weight: torch.Tensor) -> np.ndarray:
            return (values.double() * weight).sum(0).cpu().numpy()

        difference = terms.posterior_mean - terms.prior_mean
        self.kl[:steps] += masked_sum(terms.kl, weights)
        self.aux[:steps] += masked_sum(terms.aux, mask)
        self.count[:steps] += mask.sum(0).cpu().numpy()
        self.difference_sum[:steps] += masked_sum(difference, weights)
        self.difference_squares[:steps] += masked_sum(difference.double().pow(2), weights)
        self.mean_sum[:steps] += masked_sum(terms.posterior_mean, weights)
        self.mean_squares[:steps] += masked_sum(terms.posterior_mean.double().pow(2), weights)
        self.floor[:steps] += masked_sum(terms.aux_at_floor, mask)
        self.b_sum[:steps] += masked_sum(terms.backward, weights)
        self.b_squares[:steps] += masked_sum(terms.backward.double().pow(2), weights)
        self.sequences += mask.shape[0]

    def spread(self, sums: np.ndarray, squares: np.ndarray) -> np.ndarray:
        """Var over the sequences, per step and column (0 where fewer than two sequences reach)."""
        count = np.maximum(self.count, 1)[:, None]
        variance = np.maximum(squares / count - (sums / count) ** 2, 0.0)
        variance[self.count < 2] = 0.0  # one sequence has no spread
        return variance

    def result(self) -> Diagnostics:
        # In use: the KL averaged over the sequences that reach the step, not over all of them,
        # so that a step few text sentences reach is judged on those sentences.
        in_use = self.kl / np.maximum(self.count, 1)[:, None] > IN_USE_KL  # (T, Z)
        difference_variance = self.spread(self.difference_sum, self.difference_squares)
        au_delta = difference_variance > ACTIVE_THRESHOLD
        raw_variance = self.spread(self.mean_sum, self.mean_squares)
        b_variance = self.spread(self.b_sum, self.b_squares)[self.count >= 2]  # (steps with a spread, H)
        floor_variance = float(np.exp(-self.clamp))
        per_sequence = max(self.sequences, 1)
        kl = self.kl / per_sequence
        return Diagnostics(
            sequences=self.sequences,
            steps=int(self.count.sum()),
            latent_size=self.latent_size,
            kl_per_step=kl.sum(1).tolist(),
            kl_per_dimension=kl.sum(0).tolist(),
            kl_per_step_and_dimension=kl.tolist(),
            in_use_per_step=in_use.sum(1).astype(int).tolist(),
            in_use_dimensions=int(in_use.any(0).sum()),
            in_use_units=int(in_use.sum()),
            mean_difference_variance=difference_variance.tolist(),
            au_delta_per_step=au_delta.sum(1).astype(int).tolist(),
            au_delta_dimensions=int(au_delta.any(0).sum()),
            raw_posterior_mean_variance=raw_variance.tolist(),
            raw_active_per_step=(raw_variance > ACTIVE_THRESHOLD).sum(1).astype(int).tolist(),
            aux_per_step=(self.aux / per_sequence).tolist(),
            aux_floor_per_step=(self.floor / np.maximum(self.count, 1) / self.hidden_size).tolist(),
            aux_floor_fraction=float(self.floor.sum() / max(self.count.sum(), 1) / self.hidden_size),
            backward_variance_per_step=np.median(self.spread(self.b_sum, self.b_squares), axis=1).tolist(),
            backward_variance_median=float(np.median(b_variance)) if b_variance.size else 0.0,
            backward_quiet_fraction=float((b_variance < floor_variance).mean()) if b_variance.size else 0.0,
            floor_variance=floor_variance,
        )


@torch.no_grad()
def diagnose_split(
    model: ZForcing,
    split: PreparedSplit,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    seed: int = 0,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Diagnostics:
    """The diagnostics over the split's first `limit` sequences (all when None)."""
    totals = Accumulator(model.config.latent_size, model.config.hidden_size, model.config.latent_clamp)
    count = sequence_count(split, limit)
    for batch, noise in evaluation_batches(model, split, count, batch_size, device, seed, progress):
        terms = model.step_terms(batch.targets, batch.mask, noise=noise, first_input=batch.first_input)
        totals.add(terms)
    return totals.result()


def write_diagnostics_plot(diagnostics: Diagnostics, path, title: str) -> None:
    """A heat map of the KL over time × latent dimension, with the KL per step and the latent
    dimensions in use (by their KL, and by AU-Δ) per step below it; PNG or SVG by the path's suffix."""
    figure = new_figure(10, 7.5)
    heat_axes, step_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    kl = np.asarray(diagnostics.kl_per_step_and_dimension).T  # (Z, T)
    steps = kl.shape[1]
    image = heat_axes.imshow(kl, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                             extent=(0.5, steps + 0.5, -0.5, kl.shape[0] - 0.5))
    figure.colorbar(image, ax=heat_axes, label="KL (nats per sequence)")
    heat_axes.set(title=title, ylabel="latent dimension")
    positions = np.arange(1, steps + 1)
    step_axes.plot(positions, diagnostics.kl_per_step, color="#1f77b4", linewidth=1.2, label="KL per step")
    step_axes.set(xlabel="time step t", ylabel="KL (nats)")
    step_axes.grid(True, alpha=0.3)
    units_axes = step_axes.twinx()
    units_axes.plot(positions, diagnostics.in_use_per_step, color="#d62728", linewidth=1.0, alpha=0.8,
                    label=f"dimensions in use (KL > {diagnostics.in_use_threshold:g} nats)")
    units_axes.plot(positions, diagnostics.au_delta_per_step, color="#ff7f0e", linewidth=1.0, alpha=0.8, linestyle="--",
                    label=f"AU-Δ (Var(μ_q − μ_p) > {diagnostics.active_threshold:g})")
    units_axes.set(ylabel="latent dimensions", ylim=(0, max(diagnostics.latent_size, 1) * 1.05))
    lines = step_axes.get_legend_handles_labels()
    more = units_axes.get_legend_handles_labels()
    step_axes.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)
    write_bytes(path, figure_bytes(figure, str(path).rsplit(".", 1)[-1].lower()))
