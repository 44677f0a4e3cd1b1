"""Why are the latents in use, or not? Measurements of a trained run behind docs/diagnostics.md.

    python scripts/latent_study.py RUN [--limit 500] [--batch-size 32] [--json]

For the run's best checkpoint (or RUN/checkpoints/step-N), on the first --limit sequences of its test split (one posterior
sample each), it measures:

- **the aux cost's target b_t**: its variance over the data (median over steps and units, and
  the share below the aux head's smallest variance e^-clamp), its mean magnitude, and the share
  of aux log-variances at that floor;
- **how much of b_t each variable predicts**: the R² of a ridge regression of b_t on h_{t-1}
  alone, on z_t alone and on both, every variable centred per step first (what a variable
  predicts of the step's mean over the data is not information about the sequence), fitted on
  half of the sequences and scored on the other half;
- **where the gradient that shapes b_t comes from**: on one training batch (`--batch-size`),
  the norm of the gradient reaching b_t from each weighted term of the training objective
  (output NLL, w·KL, α·aux through the posterior, β·bwd) and its cosine with their sum.

With --json, the figures as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zforcing_cli.checkpoint import load_model, resolve_checkpoint  # noqa: E402
from zforcing_cli.data import open_dataset  # noqa: E402
from zforcing_cli.diagnostics import diagnose_split  # noqa: E402
from zforcing_cli.model import ZForcing, gaussian_kl  # noqa: E402
from zforcing_cli.schedule import annealed_aux_weight  # noqa: E402
from zforcing_cli.runconfig import RunConfig  # noqa: E402

RIDGE = 1e-3  # relative to the (standardised) predictors' variance


def load(run: Path) -> tuple[ZForcing, RunConfig, object]:
    """The model of a run's best checkpoint (or of a checkpoint folder), its config, its data."""
    model, config_values = load_model(resolve_checkpoint(run))
    config = RunConfig.from_dict(config_values)
    dataset = open_dataset(config.data["location"])
    return model.train(False), config, dataset


@torch.no_grad()
def states(model: ZForcing, batch) -> dict[str, torch.Tensor]:
    """h_{t-1}, z_t and b_t of a posterior pass (B, T, ·) each, with the mask (B, T)."""
    y, mask = batch.targets, batch.mask.float()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(*y.shape[:2], model.config.latent_size, generator=generator)
    embedded_u = model.embed(model.shift_right(y, batch.first_input))
    backward = model.backward_states(model.embed(y), mask.sum(1).long())
    hidden, z, _, _, _ = model.posterior_rollout(embedded_u, backward, noise)
    return {"h": hidden[:, :-1], "z": z, "b": backward, "mask": mask}


def centred_rows(values: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """(valid B·T rows, ·): each step's mean over the sequences taken away."""
    weights = mask.unsqueeze(-1)
    mean = (values * weights).sum(0) / weights.sum(0).clamp(min=1)  # (T, ·)
    return (values - mean).double()[mask.bool()].numpy()


def ridge_r2(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Share of y_test's variance a ridge regression fitted on (x_fit, y_fit) predicts (each
    predictor scaled to unit variance first, so that one penalty suits them all)."""
    scale = x_fit.std(0) + 1e-12
    x_fit, x_test = x_fit / scale, x_test / scale
    gram = x_fit.T @ x_fit
    penalty = RIDGE * np.trace(gram) / len(gram) * np.eye(len(gram))
    weights = np.linalg.solve(gram + penalty, x_fit.T @ y_fit)
    residual = y_test - x_test @ weights
    return float(1.0 - (residual**2).sum() / max((y_test**2).sum(), 1e-30))


def predictability(model: ZForcing, split, limit: int) -> dict[str, float]:
    batch = split.batch(np.arange(min(limit, len(split))))
    found = states(model, batch)
    rows = {name: centred_rows(found[name], found["mask"]) for name in ("h", "z", "b")}
    sequences = found["mask"].shape[0]
    half = int(found["mask"][: sequences // 2].sum())  # rows of the first half of the sequences
    fit, test = slice(0, half), slice(half, None)
    result = {}
    for name, parts in (("h_prev", ("h",)), ("z", ("z",)), ("h_prev_and_z", ("h", "z"))):
        x = np.concatenate([rows[part] for part in parts], axis=1)
        result[f"r2_b_from_{name}"] = ridge_r2(x[fit], rows["b"][fit], x[test], rows["b"][test])
    result["mean_abs_b"] = float(found["b"][found["mask"].bool()].abs().mean())
    return result


def gradient_sources(model: ZForcing, config: RunConfig, split, batch_size: int) -> dict[str, float]:
    """The gradient reaching b_t from each weighted term of the objective, on one batch."""
    model.train(True)
    batch = split.batch(np.arange(min(batch_size, len(split))))
    y, mask = batch.targets, batch.mask.float()
    noise = torch.randn(*y.shape[:2], model.config.latent_size, generator=torch.Generator().manual_seed(0))
    embedded_u = model.embed(model.shift_right(y, batch.first_input))
    backward = model.backward_states(model.embed(y), mask.sum(1).long()).detach().requires_grad_(True)
    hidden, z, q_mean, q_logvar, _ = model.posterior_rollout(embedded_u, backward, noise)
    h_prev, h = hidden[:, :-1], hidden[:, 1:]
    p_mean, p_logvar = model.prior(h_prev)
    aux, bwd, _ = model.auxiliary_costs(y, h_prev, z, backward)
    train = config.train
    bwd_mask = mask.clone()
    bwd_mask[:, 0] = 0
    terms = {
        "nll": (model.distribution.nll(model.output_head(h), y) * mask).sum(1).mean(),
        "kl": (gaussian_kl(q_mean, q_logvar, p_mean, p_logvar).sum(-1) * mask).sum(1).mean(),  # w_kl: 1 after annealing
        "aux": annealed_aux_weight(train, train.max_steps or 0) * (aux * mask).sum(1).mean(),
        "bwd": train.bwd_weight * (bwd * bwd_mask).sum(1).mean(),
    }
    gradients = {name: torch.autograd.grad(term, backward, retain_graph=True, allow_unused=True)[0]
                 for name, term in terms.items()}
    gradients = {name: torch.zeros_like(backward) if g is None else g for name, g in gradients.items()}
    total = sum(gradients.values())
    result = {}
    for name, g in gradients.items():
        result[f"grad_b_{name}_norm"] = float(g.norm())
        result[f"grad_b_{name}_cosine"] = float((g * total).sum() / (g.norm() * total.norm()).clamp(min=1e-30))
    result["grad_b_total_norm"] = float(total.norm())
    model.train(False)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, config, dataset = load(args.run)
    split = dataset.split("test")
    found = diagnose_split(model, split, limit=args.limit)
    figures = {
        "kl": found.kl, "kl_per_valid_step": found.kl_per_valid_step, "mean_in_use_per_step": found.mean_in_use_per_step,
        "mean_au_delta_per_step": found.mean_au_delta_per_step, "aux": float(sum(found.aux_per_step)),
        "aux_floor_fraction": found.aux_floor_fraction, "backward_variance_median": found.backward_variance_median,
        "backward_quiet_fraction": found.backward_quiet_fraction,
        **predictability(model, split, args.limit),
        **gradient_sources(model, config, split, args.batch_size),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:32} {value:.4g}")


if __name__ == "__main__":
    main()
