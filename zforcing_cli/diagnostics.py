"""Is the latent variable in use? The paper's central claim (Figure 2, Table 2) made visible.

Over a split's sequences, with one posterior sample each:

- the KL per time step and per latent dimension, and both at once (a steps × dimensions map);
- the active latent units (Burda et al., 2016): a unit is active when the variance over the
  data of its posterior mean E_q[z] exceeds 0.01. Here a unit is a dimension d at step t, with
  the mean taken along the sampled path of the steps before it; a dimension counts as active
  when it is active at some step;
- the auxiliary cost −log p(b_t | z_t) per step.

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

    def __init__(self, latent_size: int):
        self.latent_size = latent_size
        self.sequences = 0
        self.kl = np.zeros((0, latent_size))  # (T, Z) Σ over sequences
        self.aux = np.zeros(0)
        self.count = np.zeros(0)  # sequences valid at each step
        self.mean_sum = np.zeros((0, latent_size))
        self.mean_squares = np.zeros((0, latent_size))

    def grow(self, steps: int) -> None:
        extra = steps - len(self.count)
        if extra > 0:
            pad = lambda array: np.concatenate([array, np.zeros((extra, *array.shape[1:]))])  # noqa: E731
            self.kl, self.aux, self.count = pad(self.kl), pad(self.aux), pad(self.count)
            self.mean_sum, self.mean_squares = pad(self.mean_sum), pad(self.mean_squares)

    def add(self, kl: torch.Tensor, aux: torch.Tensor, mean: torch.Tensor, mask: torch.Tensor) -> None:
        """kl, mean (B, T, Z); aux, mask (B, T)."""
        mask = mask.double()
        steps = mask.shape[1]
        self.grow(steps)
        weights = mask.unsqueeze(-1)
        self.kl[:steps] += (kl.double() * weights).sum(0).cpu().numpy()
        self.aux[:steps] += (aux.double() * mask).sum(0).cpu().numpy()
        self.count[:steps] += mask.sum(0).cpu().numpy()
        self.mean_sum[:steps] += (mean.double() * weights).sum(0).cpu().numpy()
        self.mean_squares[:steps] += (mean.double().pow(2) * weights).sum(0).cpu().numpy()
        self.sequences += mask.shape[0]

    def result(self) -> Diagnostics:
        count = np.maximum(self.count, 1)[:, None]
        variance = np.maximum(self.mean_squares / count - (self.mean_sum / count) ** 2, 0.0)
        variance[self.count < 2] = 0.0  # one sequence has no spread
        active = variance > ACTIVE_THRESHOLD
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
    totals = Accumulator(model.config.latent_size)
    count = sequence_count(split, limit)
    for batch, generator in evaluation_batches(model, split, count, batch_size, device, seed, progress):
        terms = model.step_terms(batch.targets, batch.mask, generator=generator, first_input=batch.first_input)
        totals.add(terms.kl, terms.aux, terms.posterior_mean, terms.mask)
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
