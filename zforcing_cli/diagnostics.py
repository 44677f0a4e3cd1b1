"""Is the latent variable in use? The paper's central claim (Figure 2, Table 2) made visible.

Over a split's sequences, with one posterior sample each:

- the KL per time step and per latent dimension, and both at once (a steps × dimensions map);
- the active latent units (Burda et al., 2016): a unit is active when the variance over the
  data of its posterior mean E_q[z] exceeds 0.01. Here a unit is a dimension d at step t, with
  the mean taken along the sampled path of the steps before it; a dimension counts as active
  when it is active at some step;
- the auxiliary cost −log p(b_t | z_t) per step, and how much of it sits at the floor that the
  clamp of its log-variance allows: the share of b_t's dimensions whose aux log-variance is at
  −clamp (the head then claims to know b_t to within e^(−clamp/2));
- the variance over the data of the aux cost's target b_t, per step and unit: a target that
  barely varies from sequence to sequence is predicted to the floor without any information
  in z_t (docs/diagnostics.md, "Why the latents collapse").

Per-step figures are sums over the sequences divided by their number (a sequence that has
ended adds nothing), so that they add up over steps to the per-sequence averages that
`evaluate` reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from .data import PreparedSplit
from .evaluate import evaluation_batches, sequence_count
from .fileio import write_bytes
from .model import ZForcing
from .plots import figure_bytes, new_figure

ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016): Var_x(E_q[z_u]) above this makes unit u active
COLLAPSED_KL = 0.5  # nats per sequence: below this at a validation, training warns that z is unused


def collapse_warning(kl: float, unit: str) -> str | None:
    """The one-line warning for a validation KL (nats per sequence) under COLLAPSED_KL, else None."""
    if not kl < COLLAPSED_KL:
        return None
    per = unit.removeprefix("nats ")
    return (f"The latents have collapsed: the validation KL is {kl:.2f} nats {per} (under {COLLAPSED_KL:g}), so z_t "
            "carries almost nothing about the data; see docs/diagnostics.md, \"Why the latents collapse\".")


@dataclass
class Diagnostics:
    sequences: int
    kl_per_step: list[float]  # (T,) nats
    kl_per_dimension: list[float]  # (Z,) nats, summed over steps
    kl_per_step_and_dimension: list[list[float]]  # (T, Z)
    aux_per_step: list[float]  # (T,)
    posterior_mean_variance: list[list[float]]  # (T, Z) Var over the data of E_q[z_t,d]
    active_per_step: list[int]  # (T,) dimensions active at each step
    active_dimensions: int  # dimensions active at some step
    latent_size: int
    aux_floor_per_step: list[float]  # (T,) share of b_t's dimensions whose aux log-variance is at the floor
    aux_floor_fraction: float  # the same over every valid step
    backward_variance_per_step: list[float]  # (T,) median over units of Var over the data of b_t
    backward_variance_median: float  # median over steps and units of Var_x(b_t)
    backward_quiet_fraction: float  # share of (step, unit) whose Var_x(b_t) is below the aux floor's variance
    floor_variance: float  # e^(-clamp): the aux head's smallest variance
    threshold: float = ACTIVE_THRESHOLD

    @property
    def kl(self) -> float:
        return float(sum(self.kl_per_step))

    @property
    def mean_active_per_step(self) -> float:
        return float(np.mean(self.active_per_step)) if self.active_per_step else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "kl": self.kl, "mean_active_per_step": self.mean_active_per_step}


class Accumulator:
    """Running sums over batches of sequences of different lengths (float64)."""

    def __init__(self, latent_size: int, hidden_size: int, clamp: float):
        self.latent_size, self.hidden_size, self.clamp = latent_size, hidden_size, clamp
        self.sequences = 0
        self.kl = np.zeros((0, latent_size))  # (T, Z) Σ over sequences
        self.aux = np.zeros(0)
        self.count = np.zeros(0)  # sequences valid at each step
        self.mean_sum = np.zeros((0, latent_size))
        self.mean_squares = np.zeros((0, latent_size))
        self.floor = np.zeros(0)  # Σ over sequences of the dimensions at the aux floor
        self.b_sum = np.zeros((0, hidden_size))
        self.b_squares = np.zeros((0, hidden_size))

    def grow(self, steps: int) -> None:
        extra = steps - len(self.count)
        if extra > 0:
            pad = lambda array: np.concatenate([array, np.zeros((extra, *array.shape[1:]))])  # noqa: E731
            self.kl, self.aux, self.count = pad(self.kl), pad(self.aux), pad(self.count)
            self.mean_sum, self.mean_squares = pad(self.mean_sum), pad(self.mean_squares)
            self.floor, self.b_sum, self.b_squares = pad(self.floor), pad(self.b_sum), pad(self.b_squares)

    def add(self, kl: torch.Tensor, aux: torch.Tensor, mean: torch.Tensor, mask: torch.Tensor,
            backward: torch.Tensor, aux_at_floor: torch.Tensor) -> None:
        """kl, mean (B, T, Z); aux, mask, aux_at_floor (B, T); backward (B, T, H)."""
        mask = mask.double()
        steps = mask.shape[1]
        self.grow(steps)
        weights = mask.unsqueeze(-1)
        self.kl[:steps] += (kl.double() * weights).sum(0).cpu().numpy()
        self.aux[:steps] += (aux.double() * mask).sum(0).cpu().numpy()
        self.count[:steps] += mask.sum(0).cpu().numpy()
        self.mean_sum[:steps] += (mean.double() * weights).sum(0).cpu().numpy()
        self.mean_squares[:steps] += (mean.double().pow(2) * weights).sum(0).cpu().numpy()
        self.floor[:steps] += (aux_at_floor.double() * mask).sum(0).cpu().numpy()
        self.b_sum[:steps] += (backward.double() * weights).sum(0).cpu().numpy()
        self.b_squares[:steps] += (backward.double().pow(2) * weights).sum(0).cpu().numpy()
        self.sequences += mask.shape[0]

    def spread(self, sums: np.ndarray, squares: np.ndarray) -> np.ndarray:
        """Var over the sequences, per step and column (0 where fewer than two sequences reach)."""
        count = np.maximum(self.count, 1)[:, None]
        variance = np.maximum(squares / count - (sums / count) ** 2, 0.0)
        variance[self.count < 2] = 0.0  # one sequence has no spread
        return variance

    def result(self) -> Diagnostics:
        variance = self.spread(self.mean_sum, self.mean_squares)
        active = variance > ACTIVE_THRESHOLD
        b_variance = self.spread(self.b_sum, self.b_squares)[self.count >= 2]  # (steps with a spread, H)
        floor_variance = float(np.exp(-self.clamp))
        per_sequence = max(self.sequences, 1)
        kl = self.kl / per_sequence
        return Diagnostics(
            sequences=self.sequences,
            kl_per_step=kl.sum(1).tolist(),
            kl_per_dimension=kl.sum(0).tolist(),
            kl_per_step_and_dimension=kl.tolist(),
            aux_per_step=(self.aux / per_sequence).tolist(),
            posterior_mean_variance=variance.tolist(),
            active_per_step=active.sum(1).astype(int).tolist(),
            active_dimensions=int(active.any(0).sum()),
            latent_size=self.latent_size,
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
        totals.add(terms.kl, terms.aux, terms.posterior_mean, terms.mask, terms.backward, terms.aux_at_floor)
    return totals.result()


def write_diagnostics_plot(diagnostics: Diagnostics, path, title: str) -> None:
    """A heat map of the KL over time × latent dimension, with the KL and the active units per
    step below it; PNG or SVG by the path's suffix."""
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
    units_axes.plot(positions, diagnostics.active_per_step, color="#d62728", linewidth=1.0, alpha=0.8,
                    label=f"active units (Var E_q[z] > {diagnostics.threshold:g})")
    units_axes.set(ylabel="active units", ylim=(0, max(diagnostics.latent_size, 1) * 1.05))
    lines = step_axes.get_legend_handles_labels()
    more = units_axes.get_legend_handles_labels()
    step_axes.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)
    write_bytes(path, figure_bytes(figure, str(path).rsplit(".", 1)[-1].lower()))
