"""Training: Adam on the Eq. 10 objective, with validation, checkpoints and exact resume.

The core never prints: it reports through a progress callback that receives TrainEvents.

On a CPU each update is checked as it ends: a non-finite loss or gradient skips it, and its
metrics are read at once. On a GPU the host never waits for an update: the metrics stay on the
device until the trainer reads them all at once (every log_every updates, and at validations,
checkpoints and the end), a non-finite update is skipped by Adam's fused kernel on the device,
and the skips are counted, and divergence noticed, when the metrics are read. With a
distributed.Group (torchrun), the ranks take the same updates as one process would, each on
its share of every batch.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    flatten_optimizer_state,
    is_run_folder,
    newest_checkpoint,
    point_latest,
    prune_checkpoints,
    read_config,
    read_tensors,
    read_trainer_state,
    remove_unfinished,
    restore_optimizer_state,
    save_checkpoint,
)
from .data import Batch, PreparedDataset
from .device import autocast_dtype, tensor_float32
from .diagnostics import collapse_warning
from .distributed import Group, from_main, rank_seed
from .errors import TrainingError
from .evaluate import bound_unit, evaluate_split
from .fileio import check_can_write, json_record, make_parents, write_bytes, write_json
from .model import StepTerms, ZForcing, ZForcingConfig, count_parameters
from .plots import write_training_curves
from .runlock import RunLock, RunLockedError
from .schedule import annealed_aux_weight, annealed_kl_weight, annealed_kl_weight_on_device, aux_weight_reaches_zero
from .tensorboard import TensorBoardLog, require_tensorboard
from .runlock import holder as lock_holder

METRICS_FILE = "metrics.jsonl"
CURVES_STEM = "training_curves"  # .png and .svg
METRICS = ("loss", "nll", "kl", "aux", "bwd", "elbo", "grad_norm")  # an update's, in this order
STOP_REASONS = ("request", "SIGINT", "SIGTERM")  # what the ranks of a distributed run agree on


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # stop after this many updates, even mid-epoch
    batch_size: int = 32
    lr: float = 1e-3
    adam_eps: float = 1e-5
    adam_beta2: float = 0.999
    weight_decay: float = 0.0  # L2 penalty added to the gradient by Adam (the authors' IMDB setting: 1e-6)
    aux_weight: float = 0.0  # α of Eq. 10 (with aux_start: its final value)
    aux_start: float | None = None  # α's first value, moved towards aux_weight by aux_increment per update
    aux_increment: float = 5e-5  # the authors' step
    bwd_weight: float = 0.0  # β of Eq. 10
    kl_anneal: bool = False  # w_kl from kl_start to 1 by kl_increment per update
    kl_start: float = 0.2
    kl_increment: float = 5e-5
    clip_norm: float = 100.0
    seed: int = 0
    eval_batch_size: int = 500
    valid_limit: int = 0  # validate on the first N valid sequences (0: all)
    lr_patience: int = 1  # epochs without a better validation bound before halving the lr
    lr_decay: float = 0.5
    max_consecutive_skips: int = 20  # non-finite steps in a row before giving up
    checkpoint_every: int = 0  # also checkpoint every N updates (0: at the end of each epoch)
    checkpoint_minutes: float = 10.0  # and when this long has passed since the last one (0: never)
    keep_checkpoints: int = 2
    log_every: int = 10
    precision: str = "fp32"  # fp32 | tf32 | bf16 | fp16: the arithmetic of the forward pass (device.autocast_dtype)


# fp16's gradient scaler starts at torch's default scale, which suits a loss of order 1. Ours is
# in nats per sequence, summed over time (hundreds to thousands), and so are its gradients: the
# scaled gradients overflow float16 and the first updates are skipped while the scaler halves
# its scale (about 10 on MNIST's tiny test models). Those skips are the scaler calibrating, not
# divergence, so an fp16 run may skip this many more in a row before it stops (2^16 -> 2^-8).
FP16_INITIAL_SCALE = 2.0**16
FP16_BACKOFFS = 24


@dataclass
class RunConfig:
    model: ZForcingConfig
    train: TrainConfig
    data: dict  # data_description(): location, kind, protocol, counts, fingerprint, ...
    preset: str = ""  # the preset the sizes came from ("" in runs written by 0.1.0)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": asdict(self.train), "data": self.data, "preset": self.preset}

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        return cls(ZForcingConfig.from_dict(values["model"]), TrainConfig(**values["train"]), values["data"], values.get("preset", ""))


@dataclass
class TrainerState:
    step: int = 0  # updates taken (skipped steps included)
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # batches of this epoch already consumed
    kl_weight: float = 1.0
    lr: float = 1e-3
    best_valid: float | None = None  # best validation ELBO at an epoch's end: the plateau rule's
    best_seen: float | None = None  # best validation ELBO at any validation: the best checkpoint's
    bad_epochs: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    lr_halvings: int = 0
    torch_rng_state: str = ""  # base64; drives dropout
    elapsed: float = 0.0
    validated_step: int = -1  # the step of the last validation (a resumed run does not redo it)
    grad_scaler: dict = field(default_factory=dict)  # fp16: the gradient scaler's scale and growth tracker


@dataclass
class TrainEvent:
    """What the trainer reports.

    kind: resume (metrics: checkpoint, None when restarting from step 0) | stale_lock (metrics:
    the dead holder) | warning (metrics: message) | start (metrics: parameters, finished: True
    when nothing is left to do) | step (an update's metrics) | skip | progress (an update taken
    whose metrics are not read yet, on a GPU: its step and skip events follow when they are,
    several at once) | validation | checkpoint | end.
    """

    kind: str
    step: int
    total_steps: int
    epoch: int
    metrics: dict = field(default_factory=dict)


ProgressCallback = Callable[[TrainEvent], None]


class StopRequest:
    """Set (from a signal handler, another thread, a callback) to stop training cleanly: the
    trainer finishes the update in progress, writes a training checkpoint and raises
    TrainingStopped."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        self.reason = reason


class TrainingStopped(TrainingError):
    """Training stopped on request after writing a complete training checkpoint."""

    def __init__(self, reason: str, step: int, checkpoint: Path):
        super().__init__(f"Stopped by {reason} at step {step:,}; the training checkpoint {checkpoint} holds it.")
        self.reason, self.step, self.checkpoint = reason, step, checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainerState
    best_checkpoint: Path | None
    last_checkpoint: Path | None


# -- one update -----------------------------------------------------------------------------------


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


def checked_update(
    step: TrainingStep, optimizer: torch.optim.Optimizer, batch: Batch, noise: Tensor, kl_weight: float, config: TrainConfig,
    aux_weight: float | None = None,
) -> Tensor:
    """One Adam update, checked on the host: a non-finite loss is never backpropagated and a
    non-finite gradient never reaches Adam. Returns the METRICS and, last, 1 when it was
    skipped (0 otherwise). Each check waits for the device: device_update does not."""
    loss, metrics = step(batch.targets, batch.mask, batch.first_input, noise, kl_weight, aux_weight)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return torch.cat([metrics, metrics.new_tensor([math.nan, 1.0])])
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(step.parameters(), config.clip_norm)
    if not torch.isfinite(grad_norm):
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
    skipped = torch.logical_not(torch.isfinite(metrics[0]) & torch.isfinite(grad_norm)).to(metrics.dtype)
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


@dataclass
class PendingUpdate:
    """An update taken whose metrics the trainer has not read yet."""

    step: int
    epoch: int
    lr: float
    record: Tensor  # checked_update's


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The noise of update `step` depends only on (seed, step): resuming needs no RNG stream."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    return generator


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


def plateau_update(state: TrainerState, valid_elbo: float, config: TrainConfig) -> bool:
    """Track the best validation bound across epochs; halve the lr after `lr_patience` epochs
    without improvement (a non-finite bound is no improvement). Returns True when the lr was
    halved."""
    if math.isfinite(valid_elbo) and (state.best_valid is None or valid_elbo > state.best_valid):
        state.best_valid = valid_elbo
        state.bad_epochs = 0
        return False
    state.bad_epochs += 1
    if state.bad_epochs < config.lr_patience:
        return False
    state.lr *= config.lr_decay
    state.lr_halvings += 1
    state.bad_epochs = 0
    return True


# -- the run --------------------------------------------------------------------------------------


class Trainer:
    """One run's training. With a group (distributed training), every rank makes one, and
    only rank 0 (is_main) writes the run folder; all ranks take part in every update,
    validation and decision, so they stay in step.

    resolve_every: the updates between two readings of the metrics; by default 1 on a CPU and
    log_every on a GPU. Above 1, or on a GPU, or distributed, non-finite updates are skipped on
    the device (device_update) instead of by the host (checked_update).
    """

    def __init__(
        self,
        run_dir: Path,
        run_config: RunConfig,
        dataset: PreparedDataset,
        device: torch.device,
        callback: ProgressCallback | None = None,
        stop: StopRequest | None = None,
        group: Group | None = None,
        resolve_every: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.config = run_config
        self.dataset = dataset
        self.device = device
        self.callback = callback or (lambda event: None)
        self.stop = stop or StopRequest()
        self.group = group
        cfg = run_config.train
        dtype = autocast_dtype(cfg.precision, device)
        torch.manual_seed(cfg.seed)
        self.model = ZForcing(run_config.model).to(device)
        self.training_step: nn.Module = TrainingStep(self.model, cfg, dtype)  # in DDP once run() starts, with a group
        self.resolve_every = resolve_every or (max(1, cfg.log_every) if device.type == "cuda" else 1)
        self.on_device = device.type == "cuda" or group is not None or self.resolve_every > 1
        self.optimizer = make_optimizer(self.model, cfg, fused=self.on_device)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=FP16_INITIAL_SCALE) if cfg.precision == "fp16" else None
        self.state = TrainerState(kl_weight=annealed_kl_weight(cfg, 0), lr=cfg.lr)
        self.train_split = dataset.split("train")
        self.valid_split = dataset.split("valid")
        self.last_checkpoint_time = time.monotonic()
        self.tensorboard: TensorBoardLog | None = None
        self.pending: list[PendingUpdate] = []
        self.window_start: float | None = None  # when the first pending update began
        self.good_updates: Tensor | None = None  # updates not skipped, counted on the device (KL annealing)
        self.agreed_stop: str | None = None  # distributed: the stop all ranks agreed on
        self.agreed_checkpoint = False  # distributed: rank 0's clock asked for a checkpoint
        self.warned_collapse = False  # the latents' collapse is told once

    @property
    def is_main(self) -> bool:
        return self.group is None or self.group.is_main

    # -- set-up -----------------------------------------------------------------------------

    def create_run_folder(self, force: bool = False) -> None:
        """An empty run folder; with force, replace a finished or abandoned run (never one that
        another process is training, nor a folder zforcing did not write)."""
        check_can_write(self.run_dir, force, "run folder", is_run_folder)
        if self.run_dir.is_dir() and any(self.run_dir.iterdir()):
            owner = lock_holder(self.run_dir)
            if owner is not None:
                raise RunLockedError(self.run_dir, owner)
            shutil.rmtree(self.run_dir)
        make_parents(self.run_dir)

    def write_config(self) -> None:
        write_json(self.run_dir / CONFIG_FILE, self.config.to_dict())

    def restore(self) -> Path | None:
        """Load the newest complete training checkpoint of the run; None (and a fresh start)
        when the run was stopped before its first one."""
        remove_unfinished(self.run_dir)
        folder = newest_checkpoint(self.run_dir, "step")
        if folder is None:
            (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
            return None
        saved = read_trainer_state(folder)
        groups = saved.pop("optimizer_param_groups")
        self.load({"model": read_tensors(folder / MODEL_FILE), "optimizer": (read_tensors(folder / OPTIMIZER_FILE), groups),
                   "state": saved})
        truncate_metrics(self.run_dir / METRICS_FILE, self.state.step, self.state.validated_step)
        return folder

    def snapshot(self) -> dict:
        """What load() takes: the weights, Adam's state and the trainer's, on the CPU (rank 0
        gives it to the other ranks)."""
        return {"model": {name: t.detach().cpu() for name, t in self.model.state_dict().items()},
                "optimizer": flatten_optimizer_state(self.optimizer), "state": asdict(self.state)}

    def load(self, saved: dict) -> None:
        self.model.load_state_dict({name: t.to(self.device) for name, t in saved["model"].items()})
        restore_optimizer_state(self.optimizer, *saved["optimizer"])
        state = dict(saved["state"])
        state.setdefault("validated_step", state["step"])  # written by 0.1.0, which saved after validating
        self.state = TrainerState(**state)
        self.set_lr(self.state.lr)
        if self.state.torch_rng_state:
            torch.set_rng_state(torch.tensor(bytearray(base64.b64decode(self.state.torch_rng_state)), dtype=torch.uint8))
        if self.scaler is not None and self.state.grad_scaler:
            self.scaler.load_state_dict(self.state.grad_scaler)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- the loop ---------------------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_split) / self.config.train.batch_size)

    @property
    def total_steps(self) -> int:
        return planned_updates(self.config.train, len(self.train_split))

    def run(self) -> TrainResult:
        """Train to total_steps. Validation comes at each epoch's end and at the last update; a
        checkpoint taken before a due validation (by time, by step count or on a stop request)
        leaves it due, so a resumed run validates exactly where an uninterrupted one did."""
        state, cfg = self.state, self.config.train
        if self.group is not None:
            # An update uses every parameter but the auxiliary heads' when their weight is 0.
            self.training_step = self.group.wrap(self.training_step, find_unused=aux_weight_reaches_zero(cfg) or not cfg.bwd_weight)
        if self.on_device and cfg.kl_anneal:
            self.good_updates = torch.tensor(float(state.step - state.skipped_steps), dtype=torch.float64, device=self.device)
        finished = state.step >= self.total_steps and not self.validation_due()
        self.emit("start", {"parameters": count_parameters(self.model), "finished": finished})
        # tf32: the run's float32 products (validation's too) on the GPU's TensorFloat-32 tensor cores.
        with tensor_float32(cfg.precision == "tf32"):
            try:
                while True:
                    if self.validation_due():
                        self.validate()
                        self.save_training_checkpoint()
                    if state.step >= self.total_steps:
                        break
                    self.train_until_validation()
            except _StopNow:
                folder = self.save_training_checkpoint()
                if self.group is not None:
                    self.group.barrier()  # no rank ends (and has torchrun end the others) before rank 0 wrote it
                raise TrainingStopped(self.stopping() or "request", state.step, folder) from None
        self.resolve()
        self.model.train(False)
        if self.is_main:
            write_training_curves(self.run_dir / METRICS_FILE, self.run_dir / CURVES_STEM, bound_unit(self.dataset.meta.modality))
        self.emit("end", {"best_valid_elbo": state.best_seen, "skipped_steps": state.skipped_steps})
        return TrainResult(self.run_dir, state, newest_checkpoint(self.run_dir, "best"), newest_checkpoint(self.run_dir, "step"))

    def validation_due(self) -> bool:
        state = self.state
        at_boundary = state.batch_in_epoch == self.batches_per_epoch or state.step >= self.total_steps
        return at_boundary and state.validated_step != state.step and state.step > 0

    def train_until_validation(self) -> None:
        cfg, state = self.config.train, self.state
        order = epoch_order(cfg.seed, state.epoch, len(self.train_split))
        while state.batch_in_epoch < self.batches_per_epoch and state.step < self.total_steps:
            start = state.batch_in_epoch * cfg.batch_size
            self.take_step(order[start : start + cfg.batch_size])
            if state.step % self.resolve_every == 0:
                self.resolve()
                self.agree()
            else:
                self.emit("progress", {})
            self.check_stop()
            if self.checkpoint_due():
                self.save_training_checkpoint()

    def stopping(self) -> str | None:
        """Why training stops now: the stop request; distributed, the one all ranks agreed on."""
        return self.stop.reason if self.group is None else self.agreed_stop

    def check_stop(self, *_progress) -> None:
        if self.stopping() is not None:
            raise _StopNow

    def checkpoint_due(self) -> bool:
        cfg = self.config.train
        by_steps = cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0
        by_time = self.checkpoint_clock_due() if self.group is None else self.agreed_checkpoint
        return bool(by_steps or by_time)

    def checkpoint_clock_due(self) -> bool:
        minutes = self.config.train.checkpoint_minutes
        return bool(minutes) and time.monotonic() - self.last_checkpoint_time >= minutes * 60

    def agree(self) -> None:
        """Distributed: whether any rank was asked to stop (torchrun passes a signal to all of
        them, which may notice it at different updates), and whether rank 0's clock calls for
        a checkpoint, settled by one all-reduce, so that every rank does the same next."""
        if self.group is None:
            return
        reason = self.stop.reason
        code = 0 if reason is None else 1 + (STOP_REASONS.index(reason) if reason in STOP_REASONS else 0)
        clock = self.group.is_main and self.checkpoint_clock_due()
        flags = torch.tensor([code, int(clock)], device=self.device)
        code, clock = self.group.all_reduce(flags, torch.distributed.ReduceOp.MAX).tolist()
        if code:
            self.agreed_stop = STOP_REASONS[code - 1]
        self.agreed_checkpoint = bool(clock)

    def take_step(self, indices: np.ndarray) -> None:
        """Take the update on the global batch `indices` (this rank's rows of it, distributed);
        its metrics are read by resolve()."""
        cfg, state = self.config.train, self.state
        began = time.perf_counter()
        self.window_start = self.window_start or began
        self.model.train(True)
        if self.group is not None:
            torch.manual_seed(rank_seed(cfg.seed, state.step, self.group.rank))  # dropout: its own on each rank
        batch, noise, share = self.step_inputs(indices)
        aux_weight = annealed_aux_weight(cfg, state.step)
        if self.on_device:
            kl_weight = state.kl_weight if self.good_updates is None else annealed_kl_weight_on_device(cfg, self.good_updates)
            record = device_update(self.training_step, self.optimizer, batch, noise, kl_weight, cfg, self.scaler, self.group, share,
                                   aux_weight)
            if self.good_updates is not None:
                self.good_updates += 1 - record[-1]
        else:
            record = checked_update(self.training_step, self.optimizer, batch, noise, state.kl_weight, cfg, aux_weight)
        state.step += 1
        state.batch_in_epoch += 1
        self.pending.append(PendingUpdate(state.step, state.epoch, state.lr, record))

    def step_inputs(self, indices: np.ndarray) -> tuple[Batch, Tensor, float]:
        """This process's rows of the global batch on the device, their noise and their share
        of the batch. The noise is the whole batch's (B, T, Z) draw for this update, as one
        process draws it, cut to the rows: N ranks take the update one process would. A rank
        left without rows (a last batch smaller than the ranks) takes the batch's last one
        with a share of 0, so that it still takes part in the update."""
        rows, share = slice(0, len(indices)), 1.0
        if self.group is not None:
            rows = self.group.rows(len(indices))
            share = (rows.stop - rows.start) / len(indices)
            if not share:
                rows = slice(len(indices) - 1, len(indices))
        batch = self.train_split.batch(indices[rows]).to(self.device)
        steps = batch.targets.shape[1]
        full_steps = steps if self.group is None else self.train_split.steps(indices)
        generator = step_generator(self.config.train.seed, self.state.step, self.device)
        noise = torch.randn(len(indices), full_steps, self.model.config.latent_size, generator=generator, device=self.device,
                            dtype=next(self.model.parameters()).dtype)
        return batch, noise[rows, :steps], share

    def resolve(self) -> None:
        """Read the metrics of the updates not read yet (one wait for the device) and act on
        them in order: count the skipped ones, log and report, stop on divergence."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        records = torch.stack([update.record for update in pending]).tolist()
        now = time.perf_counter()
        seconds = (now - self.window_start) / len(pending)  # each update's, averaged over the window
        self.state.elapsed += now - self.window_start
        self.window_start = None
        skipped = [bool(record[-1]) for record in records]
        broken = None
        if any(skipped) and not self.weights_finite():
            # Weights that are not finite stay so and make every later update non-finite: the
            # update before the last run of skipped ones broke them.
            broken = max(i for i, skip in enumerate(skipped) if skip and (i == 0 or not skipped[i - 1]))
        for index, (update, record) in enumerate(zip(pending, records)):
            if skipped[index]:
                self.record_skip(update, index == broken)
            else:
                self.record_update(update, dict(zip(METRICS, record)), seconds)

    def weights_finite(self) -> bool:
        return bool(torch.stack([torch.isfinite(parameter).all() for parameter in self.model.parameters()]).all())

    def record_update(self, update: PendingUpdate, metrics: dict, seconds: float) -> None:
        cfg, state = self.config.train, self.state
        state.consecutive_skips = 0
        state.kl_weight = annealed_kl_weight(cfg, update.step - state.skipped_steps)
        metrics.update(kl_weight=state.kl_weight, aux_weight=annealed_aux_weight(cfg, update.step - 1), lr=update.lr, seconds=seconds)
        if update.step % cfg.log_every == 0 or update.step == self.total_steps:
            self.log({"type": "train", "step": update.step, "epoch": update.epoch, **metrics})
        self.emit("step", metrics, update)

    def record_skip(self, update: PendingUpdate, broke_weights: bool) -> None:
        """A non-finite loss or gradient: the update was skipped. Weights that are no longer
        finite cannot recover, so that stops at once; otherwise after too many in a row."""
        state = self.state
        state.skipped_steps += 1
        state.consecutive_skips += 1
        self.emit("skip", {"skipped_steps": state.skipped_steps}, update)
        lower_lr = f"Start a new run with a lower --lr (this one used {self.config.train.lr:g})."
        if broke_weights:
            raise TrainingError(
                f"Training diverged: the update at step {update.step - state.consecutive_skips:,} made the weights "
                f"non-finite (NaN or infinity), so step {update.step:,} could not be taken.",
                lower_lr,
            )
        if state.consecutive_skips >= self.skips_before_divergence():
            raise TrainingError(
                f"Training diverged: {state.consecutive_skips} updates in a row had a non-finite loss "
                f"(steps {update.step - state.consecutive_skips + 1:,} to {update.step:,}); the weights were not touched by them.",
                lower_lr,
            )

    def skips_before_divergence(self) -> int:
        """Non-finite updates in a row that stop the run: max_consecutive_skips, and with fp16
        also one per halving the gradient scaler may need to find its scale."""
        return self.config.train.max_consecutive_skips + (FP16_BACKOFFS if self.scaler is not None else 0)

    def validate(self) -> None:
        self.resolve()
        cfg, state = self.config.train, self.state
        result = evaluate_split(
            self.model, self.valid_split, batch_size=cfg.eval_batch_size, device=self.device,
            seed=cfg.seed, limit=cfg.valid_limit or None, progress=self.check_stop, group=self.group,
        )
        finite = math.isfinite(result.elbo)
        # A stop mid-epoch (--max-steps) validates too; only epoch ends feed the plateau rule, so
        # that a run stopped and resumed keeps the schedule of one never stopped.
        epoch_done = state.batch_in_epoch == self.batches_per_epoch
        improved = finite and (state.best_seen is None or result.elbo > state.best_seen)
        if improved:
            state.best_seen = result.elbo
        halved = plateau_update(state, result.elbo, cfg) if epoch_done else False
        if halved:
            self.set_lr(state.lr)
        metrics = {"elbo": result.elbo, "kl": result.kl, "nll_bound": -result.elbo, "lr": state.lr, "lr_halved": halved, "improved": improved}
        self.log({"type": "valid", "step": state.step, "epoch": state.epoch, **metrics})
        if self.tensorboard is not None:
            self.tensorboard.samples(self.model, state.step)
        self.emit("validation", metrics)
        warning = None if self.warned_collapse else collapse_warning(result.kl, bound_unit(self.dataset.meta.modality))
        if warning is not None:
            self.warned_collapse = True
            self.emit("warning", {"message": warning})
        state.validated_step = state.step
        if epoch_done:
            state.epoch += 1
            state.batch_in_epoch = 0
        if improved:
            self.save_best_checkpoint()

    # -- outputs (rank 0's) -----------------------------------------------------------------

    def save_training_checkpoint(self) -> Path:
        self.resolve()
        folder = self.run_dir / CHECKPOINTS_DIR / f"step-{self.state.step:08d}"
        if self.is_main:
            self.state.torch_rng_state = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
            self.state.grad_scaler = {} if self.scaler is None else self.scaler.state_dict()
            save_checkpoint(folder, self.model, self.config.to_dict(), asdict(self.state), self.optimizer)
            prune_checkpoints(self.run_dir, "step", self.config.train.keep_checkpoints)
        self.last_checkpoint_time = time.monotonic()
        self.agreed_checkpoint = False
        self.emit("checkpoint", {"path": str(folder)})
        return folder

    def save_best_checkpoint(self) -> None:
        if self.is_main:
            save_checkpoint(self.run_dir / CHECKPOINTS_DIR / f"best-{self.state.step:08d}", self.model, self.config.to_dict(),
                            asdict(self.state))
            prune_checkpoints(self.run_dir, "best", 1)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(json_record(record), allow_nan=False) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.record(record)

    def emit(self, kind: str, metrics: dict, update: PendingUpdate | None = None) -> None:
        step, epoch = (self.state.step, self.state.epoch) if update is None else (update.step, update.epoch)
        self.callback(TrainEvent(kind, step, self.total_steps, epoch, metrics))


class _StopNow(Exception):
    """Unwinds the loop from wherever a stop request is noticed."""


def planned_updates(config: TrainConfig, train_size: int) -> int:
    """Updates a run takes: its epochs, or fewer when max_steps is set."""
    total = config.epochs * math.ceil(train_size / config.batch_size)
    return min(total, config.max_steps) if config.max_steps is not None else total


def truncate_metrics(path: Path, step: int, validated_step: int) -> None:
    """Drop records a resumed run will write again: updates after `step` and validations after
    `validated_step`. A line cut short by a kill is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        limit = validated_step if record.get("type") == "valid" else step
        if record.get("step", 0) <= limit:
            kept.append(line)
    write_bytes(path, "".join(line + "\n" for line in kept).encode())


def load_run_config(run_dir: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(read_config(run_dir))
    except (KeyError, TypeError) as error:
        raise TrainingError(f"{run_dir / CONFIG_FILE} is not a zforcing run config ({error}).", "Pass a run folder written by `zforcing train`.") from None


def train(
    run_dir: Path,
    run_config: RunConfig,
    dataset: PreparedDataset,
    device: torch.device,
    callback: ProgressCallback | None = None,
    resume: bool = False,
    force: bool = False,
    stop: StopRequest | None = None,
    latest_link: Path | None = None,
    tensorboard: bool = False,
    group: Group | None = None,
) -> TrainResult:
    """Train a new run in run_dir, or (resume=True) continue its newest complete checkpoint.

    The run folder is locked for the whole call: a second process gets RunLockedError. With
    latest_link (a runs folder), its `latest` names this run once the run's config is written.
    tensorboard=True also logs the metrics and samples for TensorBoard (tensorboard.py).
    With a group, every rank calls this: rank 0 sets up the run folder (and restores the
    checkpoint), then gives the other ranks the trainer's state; a run may resume on another
    number of ranks than it started with.
    """
    if tensorboard:
        require_tensorboard()
    trainer = Trainer(run_dir, run_config, dataset, device, callback, stop, group)
    lock = RunLock(trainer.run_dir) if trainer.is_main else None
    try:
        saved = from_main(group, lambda: set_up(trainer, lock, resume, force, latest_link, tensorboard))
        if not trainer.is_main:
            trainer.load(saved)
        return trainer.run()
    finally:
        if trainer.tensorboard is not None:
            trainer.tensorboard.close()
        if lock is not None:
            lock.release()


def set_up(trainer: Trainer, lock: RunLock, resume: bool, force: bool, latest_link: Path | None, tensorboard: bool) -> dict | None:
    """Rank 0's part of starting: the run folder made (or the checkpoint restored), locked, its
    config written. Returns the trainer's state for the other ranks, distributed."""
    made = not resume and not trainer.run_dir.exists()
    if not resume:
        trainer.create_run_folder(force)
    try:
        lock.acquire()
    except BaseException:
        if made:
            shutil.rmtree(trainer.run_dir, ignore_errors=True)
        raise
    if lock.stale_owner:
        trainer.emit("stale_lock", lock.stale_owner)
    if resume:
        folder = trainer.restore()
        trainer.emit("resume", {"checkpoint": None if folder is None else str(folder)})
    trainer.write_config()
    if latest_link is not None:
        link_latest(trainer, latest_link)
    if tensorboard:
        trainer.tensorboard = TensorBoardLog(trainer.run_dir, trainer.config.data, trainer.config.train.seed,
                                             resumed_at=trainer.state.step if resume else None)
    return trainer.snapshot() if trainer.group is not None else None


def link_latest(trainer: Trainer, runs_root: Path) -> None:
    """Point runs_root/latest at the run; a runs folder that cannot be written only warns."""
    try:
        point_latest(runs_root, trainer.run_dir)
    except OSError as error:
        trainer.emit("warning", {"message": f"{runs_root / 'latest'} was not updated ({error.strerror}); pass the run folder to evaluate and sample."})


def data_description(dataset: PreparedDataset) -> dict:
    """What a checkpoint records about its data, so evaluate and sample need no flags, and a
    resumed run can recognise its dataset in a new place."""
    meta = dataset.meta
    return {
        "location": dataset.location,
        "kind": meta.kind,
        "protocol": meta.protocol,
        "modality": meta.modality,
        "sequence_length": meta.sequence_length,
        "image_shape": meta.image_shape,
        "counts": meta.counts,
        "fingerprint": meta.fingerprint,
        "audio": meta.audio,  # sample rate, frame size and the normalisation, to write audio back
        "text": text_description(meta.text),  # the vocabulary and tokenizer settings, to read and write text
    }


def text_description(text: dict | None) -> dict | None:
    """What a checkpoint needs of a text dataset: its vocabulary and how its words were made."""
    if text is None:
        return None
    return {name: text[name] for name in ("vocabulary", "specials", "lowercase", "min_tokens", "max_tokens")}


def dataset_differences(recorded: dict, dataset: PreparedDataset) -> list[str]:
    """How a dataset differs from the one a run recorded (kind, protocol, counts, content);
    empty when it is the same data, wherever it now lies."""
    current = data_description(dataset)
    return [
        f"{name} {current[name]} instead of {recorded[name]}"
        for name in ("kind", "protocol", "counts", "fingerprint")
        if recorded.get(name) and current.get(name) and recorded[name] != current[name]
    ]


__all__ = [
    "RunConfig", "TrainConfig", "TrainEvent", "TrainResult", "Trainer", "StopRequest", "TrainingStopped",
    "train", "data_description", "dataset_differences", "planned_updates",
]
