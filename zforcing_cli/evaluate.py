"""The paper's bounds (DESIGN.md §3): ELBO with analytic KL, and the IWAE bound with K samples."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from .data import PreparedSplit
from .model import ZForcing


@dataclass
class EvalResult:
    """Averages per sequence, in nats, over `sequences` whole sequences (padding never counted)."""

    elbo: float  # E_q[log p(y|z)] - KL, averaged over the K samples when iwae_samples > 0
    kl: float
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
) -> EvalResult:
    """Bounds on log p(y) averaged over the split's sequences (or its first `limit`)."""
    was_training = model.training
    model.train(False)
    count = min(len(split), limit) if limit else len(split)
    repeats = max(iwae_samples, 1)
    chunk = max(1, batch_size // repeats)  # sequences per forward pass, K copies each
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    totals = {"elbo": 0.0, "kl": 0.0, "iwae": 0.0, "steps": 0}
    for start in range(0, count, chunk):
        targets, mask = split.batch(np.arange(start, min(start + chunk, count)))
        targets = targets.to(device).repeat_interleave(repeats, dim=0)
        mask = mask.to(device).repeat_interleave(repeats, dim=0)
        out = model(targets, mask, generator=generator, auxiliary=False)
        totals["elbo"] += out.elbo.double().sum().item() / repeats
        totals["kl"] += out.kl.double().sum().item() / repeats
        totals["steps"] += int(mask.sum().item()) // repeats
        if iwae_samples:
            log_weights = out.log_importance_weight.double().view(-1, repeats)  # (b, K)
            totals["iwae"] += (torch.logsumexp(log_weights, dim=1) - math.log(repeats)).sum().item()
        if progress is not None:
            progress(min(start + chunk, count), count)
    model.train(was_training)
    return EvalResult(
        elbo=totals["elbo"] / count,
        kl=totals["kl"] / count,
        iwae=totals["iwae"] / count if iwae_samples else None,
        iwae_samples=iwae_samples,
        sequences=count,
        steps=totals["steps"],
    )
