"""One training update: the objective of Eq. 10, the training step that computes it, the update
itself (checked on the host, or left on the device), Adam, the random draws of each update and
epoch, and the Updater that takes the updates of a run.

An update returns a record: its METRICS, then (at SKIPPED) 1 when it was skipped (a non-finite
loss or gradient), 0 otherwise. Nothing here reads the trainer: the benchmark builds the update
it times from the same objective and Adam (bench/workload.py).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .data import Batch
from .device import autocast_dtype
from .distributed import Group
from .model import StepTerms, ZForcing
from .runconfig import TrainConfig
from .schedule import annealed_aux_weight, annealed_kl_weight_on_device, aux_weight_reaches_zero

METRICS = ("loss", "nll", "kl", "aux", "bwd", "elbo", "grad_norm")  # an update's, in this order
SKIPPED = len(METRICS)  # where an update's record says whether it was skipped

# fp16's gradient scaler starts at torch's default scale, which suits a loss of order 1. Ours is
# in nats per sequence, summed over time (hundreds to thousands), and so are its gradients: the
# scaled gradients overflow float16 and the first updates are skipped while the scaler halves
# its scale (about 10 on MNIST's tiny test models). Those skips are the scaler calibrating, not
# divergence, so an fp16 run may skip this many more in a row before it stops (2^16 -> 2^-8).
FP16_INITIAL_SCALE = 2.0**16
FP16_BACKOFFS = 24


def objective(out, kl_weight: float, config: TrainConfig, aux_weight: float | None = None) -> torch.Tensor:
    """Eq. 10 per sequence, averaged over the batch: -log p(y|h) + w·KL + α·aux + β·bwd, with α
    the given aux_weight (config.aux_weight when None)."""
    aux_weight = config.aux_weight if aux_weight is None else aux_weight
    per_sequence = out.nll + kl_weight * out.kl
    if aux_weight:
        per_sequence = per_sequence + aux_weight * out.aux
    if config.bwd_weight:
        per_sequence = per_sequence + config.bwd_weight * out.bwd
    return per_sequence.mean()


class TrainingStep(nn.Module):
    """What an update computes before its backward pass: the objective on a batch, and the
    METRICS but the gradient norm (detached, one tensor). At a precision below fp32 (dtype bf16
    or fp16) the model's forward pass runs under autocast, and each step's terms return to fp32
    before the sums over time and the objective.

    DistributedDataParallel wraps this module: from its output (the loss) DDP finds the
    parameters an update uses, and averages their gradients over the ranks."""

    def __init__(self, model: ZForcing, config: TrainConfig, dtype: torch.dtype | None):
        super().__init__()
        self.model, self.config, self.dtype = model, config, dtype

    def forward(self, y: Tensor, mask: Tensor, first_input: Tensor | None, noise: Tensor,
                kl_weight: float | Tensor, aux_weight: float | None = None) -> tuple[Tensor, Tensor]:
        if self.dtype is None:
            out = self.model(y, mask, noise=noise, first_input=first_input)
        else:
            with torch.autocast(y.device.type, dtype=self.dtype), onednn_off(y.device.type == "cpu"):
                terms = self.model.step_terms(y, mask, noise=noise, first_input=first_input)
            out = in_float32(terms).summed()
        loss = objective(out, kl_weight, self.config, aux_weight)
        metrics = torch.stack([loss, out.nll.mean(), out.kl.mean(), out.aux.mean(), out.bwd.mean(), out.elbo.mean()]).detach()
        return loss, metrics


@contextmanager
def onednn_off(off: bool) -> Iterator[None]:
    """With off, torch's oneDNN kernels stay unused meanwhile: autocast on the CPU would give
    oneDNN's LSTM bfloat16 inputs, for which it has no kernel on CPUs without bfloat16
    instructions (AVX2 ones); torch's own kernels take them everywhere."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled and not off
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def in_float32(terms: StepTerms) -> StepTerms:
    return replace(terms, **{item.name: getattr(terms, item.name).float() for item in fields(terms)})


def loss_skipped(metrics: Tensor, config: TrainConfig) -> Tensor:
    """Whether the skip rule skips an update by its METRICS (a bool tensor on their device): a
    loss that is not finite, or with skip_kl_above, a mean KL per sequence at least that."""
    skipped = torch.logical_not(torch.isfinite(metrics[0]))
    if config.skip_kl_above is not None:
        skipped = skipped | (metrics[2] >= config.skip_kl_above)
    return skipped


def checked_update(
    step: TrainingStep, optimizer: torch.optim.Optimizer, batch: Batch, noise: Tensor, kl_weight: float, config: TrainConfig,
    aux_weight: float | None = None,
) -> Tensor:
    """One Adam update, checked on the host: an update the skip rule skips by its loss is never
    backpropagated, and (skip_rule "loss-and-grad") a non-finite gradient never reaches Adam.
    Returns its record (the module's docstring). Each check waits for the device:
    device_update does not."""
    loss, metrics = step(batch.targets, batch.mask, batch.first_input, noise, kl_weight, aux_weight)
    optimizer.zero_grad(set_to_none=True)
    if loss_skipped(metrics, config):
        return torch.cat([metrics, metrics.new_tensor([math.nan, 1.0])])
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(step.parameters(), config.clip_norm)
    if config.skip_rule == "loss-and-grad" and not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return torch.cat([metrics, metrics.new_tensor([math.nan, 1.0])])
    optimizer.step()
    return torch.cat([metrics, grad_norm.reshape(1).to(metrics.dtype), metrics.new_zeros(1)])


def device_update(
    step: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, noise: Tensor, kl_weight: float | Tensor,
    config: TrainConfig, scaler: torch.amp.GradScaler | None = None, group: Group | None = None, share: float = 1.0,
    aux_weight: float | None = None,
) -> Tensor:
    """One update that never waits for the device; returns what checked_update returns, on the
    device. optimizer is Adam with fused=True: when the loss or the gradient is not finite, its
    kernel leaves the weights and its state as they were (`found_inf`, the attribute through
    which GradScaler skips an update). scaler: fp16's gradient scaler.

    The skip rule is checked_update's; with skip_rule "loss" a non-finite gradient reaches Adam,
    as in the authors' scripts (the weights then stop being finite, and the run stops).

    step is a TrainingStep. With a group, it is in DistributedDataParallel, batch is this
    rank's `share` of the global batch, and the metrics are added over the ranks. DDP averages
    the ranks' gradients, so each rank weighs its loss by share × ranks: the average is then
    the gradient of the mean over the global batch, however unevenly it was divided."""
    loss, metrics = step(batch.targets, batch.mask, batch.first_input, noise, kl_weight, aux_weight)
    if group is not None:
        metrics = group.all_reduce(metrics * share)
        loss = loss * (share * group.world_size)
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(step.parameters(), config.clip_norm)
    skipped = loss_skipped(metrics, config)
    if config.skip_rule == "loss-and-grad":
        skipped = skipped | torch.logical_not(torch.isfinite(grad_norm))
    skipped = skipped.to(metrics.dtype)
    optimizer.found_inf = skipped
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    if scaler is not None:
        scaler.update()
    return torch.cat([metrics, grad_norm.reshape(1).to(metrics.dtype), skipped.reshape(1)])


def make_optimizer(model: nn.Module, config: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """Adam with the run's settings. fused: one kernel for every parameter, which can also skip
    a non-finite update on the device (device_update); otherwise torch's default."""
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, config.adam_beta2), eps=config.adam_eps,
                            weight_decay=config.weight_decay, fused=True if fused else None)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The noise of update `step` depends only on (seed, step): resuming needs no RNG stream."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    return generator


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


def batch_inputs(split, indices: np.ndarray, model: ZForcing, seed: int, step: int, device: torch.device,
                 group: Group | None = None) -> tuple[Batch, Tensor, float]:
    """What update `step` + 1 takes on the global batch `indices` of split: this process's rows of
    it on the device, their noise and their share of the batch. The noise is the whole batch's
    (B, T, Z) draw for this update, as one process draws it, cut to the rows: N ranks take the
    update one process would. A rank left without rows (a last batch smaller than the ranks)
    takes the batch's last one with a share of 0, so that it still takes part in the update."""
    rows, share = slice(0, len(indices)), 1.0
    if group is not None:
        rows = group.rows(len(indices))
        share = (rows.stop - rows.start) / len(indices)
        if not share:
            rows = slice(len(indices) - 1, len(indices))
    batch = split.batch(indices[rows]).to(device)
    steps = batch.targets.shape[1]
    full_steps = steps if group is None else split.steps(indices)
    noise = torch.randn(len(indices), full_steps, model.config.latent_size, generator=step_generator(seed, step, device),
                        device=device, dtype=next(model.parameters()).dtype)
    return batch, noise[rows, :steps], share


def weights_finite(model: nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(parameter).all() for parameter in model.parameters()]).all())


@dataclass
class PendingUpdate:
    """An update taken whose metrics have not been read yet."""

    step: int
    epoch: int
    lr: float
    record: Tensor


class PendingUpdates:
    """The updates whose metrics stay on the device until read() reads them all at once, and
    the time they took."""

    def __init__(self) -> None:
        self.updates: list[PendingUpdate] = []
        self.window_start: float | None = None  # when the first of them began

    def begin(self) -> None:
        """An update begins (the first of a window starts its clock)."""
        self.window_start = self.window_start or time.perf_counter()

    def add(self, update: PendingUpdate) -> None:
        self.updates.append(update)

    def read(self, model: nn.Module) -> tuple[list[tuple[PendingUpdate, dict | None, bool]], float, float]:
        """Reads the records (one wait for the device) and empties the window. Returns each
        update with its METRICS (None: skipped) and whether it made the weights non-finite, then
        the seconds each update took on average, and all of them together."""
        if not self.updates:
            return [], 0.0, 0.0
        pending, self.updates = self.updates, []
        records = torch.stack([update.record for update in pending]).tolist()
        elapsed = time.perf_counter() - self.window_start
        self.window_start = None
        skipped = [bool(record[SKIPPED]) for record in records]
        broken = None
        if any(skipped) and not weights_finite(model):
            # Weights that are not finite stay so and make every later update non-finite: the
            # update before the last run of skipped ones broke them.
            broken = max(i for i, skip in enumerate(skipped) if skip and (i == 0 or not skipped[i - 1]))
        read = [(update, None if skip else dict(zip(METRICS, record)), index == broken)
                for index, (update, record, skip) in enumerate(zip(pending, records, skipped))]
        return read, elapsed / len(pending), elapsed


class Updater:
    """Takes a run's updates: the TrainingStep (in DistributedDataParallel once started, with a
    group), Adam and, for fp16, the gradient scaler.

    on_device: an update that is not finite is skipped on the device (device_update, Adam
    fused), and with KL annealing w_kl follows a count of the updates taken that stays there;
    otherwise the host checks each update (checked_update)."""

    def __init__(self, model: ZForcing, config: TrainConfig, device: torch.device, on_device: bool, group: Group | None = None):
        self.config, self.device, self.on_device, self.group = config, device, on_device, group
        self.training_step: nn.Module = TrainingStep(model, config, autocast_dtype(config.precision, device))
        self.optimizer = make_optimizer(model, config, fused=on_device)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=FP16_INITIAL_SCALE) if config.precision == "fp16" else None
        self.good_updates: Tensor | None = None  # on the device, with KL annealing: the updates w_kl counts

    def start(self, good_updates: int) -> None:
        """Before the first update, and distributed after every rank has its state (DDP's wrap
        gives every rank rank 0's weights): the step in DDP, and on the device the count of the
        updates w_kl counts so far (schedule.kl_anneal_updates)."""
        config = self.config
        if self.group is not None:
            # An update uses every parameter but the auxiliary heads' when their weight is 0.
            unused = aux_weight_reaches_zero(config) or not config.bwd_weight
            self.training_step = self.group.wrap(self.training_step, find_unused=unused)
        if self.on_device and config.kl_anneal:
            self.good_updates = torch.tensor(float(good_updates), dtype=torch.float64, device=self.device)

    def __call__(self, batch: Batch, noise: Tensor, share: float, step: int, kl_weight: float) -> Tensor:
        """The update after `step` updates, on this rank's `share` of the batch; kl_weight is the
        host's w_kl (on the device, the count kept there gives it). Returns its record."""
        config = self.config
        aux_weight = annealed_aux_weight(config, step)
        if not self.on_device:
            return checked_update(self.training_step, self.optimizer, batch, noise, kl_weight, config, aux_weight)
        if self.good_updates is not None:
            kl_weight = annealed_kl_weight_on_device(config, self.good_updates)
        record = device_update(self.training_step, self.optimizer, batch, noise, kl_weight, config, self.scaler, self.group,
                               share, aux_weight)
        if self.good_updates is not None:
            self.good_updates += 1 if config.kl_anneal_on_skip == "advance" else 1 - record[SKIPPED]
        return record

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def skips_before_divergence(self) -> int:
        """Non-finite updates in a row that stop the run: max_consecutive_skips, and with fp16
        also one per halving the gradient scaler may need to find its scale."""
        return self.config.max_consecutive_skips + (FP16_BACKOFFS if self.scaler is not None else 0)


__all__ = [
    "METRICS", "SKIPPED", "objective", "TrainingStep", "checked_update", "device_update", "make_optimizer",
    "step_generator", "epoch_order", "batch_inputs", "PendingUpdate", "PendingUpdates", "Updater",
]
