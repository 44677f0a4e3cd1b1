"""Training: Adam on the Eq. 10 objective, with validation, checkpoints and exact resume.

The core never prints: it reports through a progress callback that receives TrainEvents.

A run's life: Trainer.open() sets up its folder (runfolder.py: a new run, or the checkpoint it
resumes), run() trains to the end, and save() writes a training checkpoint (at each validation,
on the clock and when stopped). Each update is update.py's; what the run records, runconfig.py's.

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
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .checkpoint import flatten_optimizer_state, restore_optimizer_state
from .data import Batch, PreparedDataset
from .device import tensor_float32
from .diagnostics import collapse_warning
from .distributed import Group, from_main, rank_seed
from .errors import FileSystemError, TrainingError, free_bytes
from .evaluate import bound_unit, evaluate_split, perplexity
from .humanize import byte_size
from .model import ZForcing, build_model, count_parameters, recurrence_loops
from .runconfig import RunConfig, TrainConfig, TrainerState, planned_updates
from .runfolder import RunFolder
from .schedule import annealed_aux_weight, annealed_kl_weight, kl_anneal_updates
from .tensorboard import require_tensorboard
from .threads import fixed_threads
from .update import PendingUpdate, PendingUpdates, Updater, batch_inputs, epoch_order


@dataclass
class TrainEvent:
    """What the trainer reports.

    kind: stale_lock (message: whose lock was taken over) | resume (path: the checkpoint, None
    when restarting from step 0) | warning (message) | start (metrics: parameters, loops:
    which loops run the recurrence, finished: True when nothing is left to do) | step (an update's metrics) | skip (metrics:
    skipped_steps) | progress (an update taken whose metrics are not read yet, on a GPU: its
    step and skip events follow when they are, several at once) | validation (metrics) |
    checkpoint (path) | end (metrics: best_valid_elbo, skipped_steps). A run starts with
    stale_lock, resume and warning, where they apply, in this order, then start.
    """

    kind: str
    step: int
    total_steps: int
    epoch: int
    metrics: dict = field(default_factory=dict)
    path: Path | None = None
    message: str = ""


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


def record_validation(state: TrainerState, elbo: float, epoch_done: bool, config: TrainConfig) -> tuple[bool, bool]:
    """A validation's bound in the state: the best one seen, and at an epoch's end the plateau
    rule. Returns (improved: a new best, halved: the lr was halved)."""
    improved = math.isfinite(elbo) and (state.best_seen is None or elbo > state.best_seen)
    if improved:
        state.best_seen = elbo
    # A stop mid-epoch (--max-steps) validates too; only epoch ends feed the plateau rule, so
    # that a run stopped and resumed keeps the schedule of one never stopped.
    return improved, plateau_update(state, elbo, config) if epoch_done else False


def divergence(state: TrainerState, step: int, broke_weights: bool, limit: int, lr: float) -> TrainingError | None:
    """The error that stops a run once update `step` was skipped (state counts it already):
    weights that are no longer finite cannot recover, so that stops at once; otherwise `limit`
    skips in a row do. None while training can go on."""
    lower_lr = f"Start a new run with a lower --lr (this one used {lr:g})."
    in_a_row = state.consecutive_skips
    if broke_weights:
        return TrainingError(
            f"Training diverged: the update at step {step - in_a_row:,} made the weights "
            f"non-finite (NaN or infinity), so step {step:,} could not be taken.",
            lower_lr,
        )
    if in_a_row >= limit:
        return TrainingError(
            f"Training diverged: {in_a_row} updates in a row had a non-finite loss "
            f"(steps {step - in_a_row + 1:,} to {step:,}); the weights were not touched by them.",
            lower_lr,
        )
    return None


def rng_text(state: Tensor) -> str:
    """A random generator's state as trainer_state.json keeps it (base64)."""
    return base64.b64encode(state.numpy().tobytes()).decode()


def rng_from_text(text: str) -> Tensor:
    return torch.tensor(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class _StopNow(Exception):
    """Unwinds the loop from wherever a stop request is noticed."""


# -- the run --------------------------------------------------------------------------------------


class Trainer:
    """One run's training: open() the run, run() it (which save()s a training checkpoint at
    each validation, on the clock and when stopped), close() it; train() does all four.

    With a group (distributed training), every rank makes one, and only rank 0 (is_main) writes
    the run folder; all ranks take part in every update, validation and decision, so they stay
    in step.

    read_every: the updates between two readings of the metrics; by default 1 on a CPU and
    log_every on a GPU. Above 1, or on a GPU, or distributed, non-finite updates are skipped on
    the device (update.device_update) instead of by the host (update.checked_update).
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
        read_every: int | None = None,
    ):
        self.folder = RunFolder(run_dir)
        self.run_config = run_config
        self.dataset = dataset
        self.device = device
        self.callback = callback or (lambda event: None)
        self.stop = stop or StopRequest()
        self.group = group
        train_config = run_config.train
        torch.manual_seed(train_config.seed)
        self.model = build_model(run_config.model).to(device)
        self.read_every = read_every or (max(1, train_config.log_every) if device.type == "cuda" else 1)
        on_device = device.type == "cuda" or group is not None or self.read_every > 1
        self.updater = Updater(self.model, train_config, device, on_device, group)
        self.state = TrainerState(kl_weight=annealed_kl_weight(train_config, 0), lr=train_config.lr)
        self.train_split = dataset.split("train")
        self.valid_split = dataset.split("valid")
        self.last_checkpoint_time = time.monotonic()
        self.pending = PendingUpdates()
        self.agreed_stop: str | None = None  # distributed: the stop all ranks agreed on
        self.agreed_checkpoint = False  # distributed: rank 0's clock asked for a checkpoint
        self.warned_collapse = False  # the latents' collapse is told once

    @property
    def is_main(self) -> bool:
        return self.group is None or self.group.is_main

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_split) / self.run_config.train.batch_size)

    @property
    def total_steps(self) -> int:
        return planned_updates(self.run_config.train, len(self.train_split))

    # -- the life cycle ---------------------------------------------------------------------

    def open(self, resume: bool = False, force: bool = False, latest_link: Path | None = None, tensorboard: bool = False) -> None:
        """Set up the run: rank 0 makes its folder (or restores its newest training checkpoint),
        locks it and writes its config; with latest_link (a runs folder), its `latest` names the
        run; tensorboard: also log for TensorBoard. The other ranks then take rank 0's state."""
        saved = from_main(self.group, lambda: self.open_folder(resume, force, latest_link, tensorboard))
        if not self.is_main:
            self.load_state_dict(saved)

    def open_folder(self, resume: bool, force: bool, latest_link: Path | None, tensorboard: bool) -> dict | None:
        """Rank 0's part of open(); returns the state the other ranks take (distributed)."""
        space_warning = check_disk_space(self.folder, self.model, self.run_config.train.keep_checkpoints)
        took_over = self.folder.open(resume, force)
        if took_over is not None:
            self.emit("stale_lock", message=took_over)
        if resume:
            restored = self.folder.restore()
            if restored is not None:
                self.load_state_dict(restored[1])
            self.emit("resume", path=None if restored is None else restored[0])
        self.run_config, loops_warning = with_loops(self.run_config, recurrence_loops(self.model))
        self.folder.write_config(self.run_config)
        warning = None if latest_link is None else self.folder.link_latest(latest_link)
        for message in (space_warning, loops_warning, warning):
            if message is not None:
                self.emit("warning", message=message)
        if tensorboard:
            self.folder.open_tensorboard(self.run_config.data, self.run_config.train.seed, self.state.step if resume else None)
        return self.state_dict() if self.group is not None else None

    def run(self) -> TrainResult:
        """Train to total_steps. Validation comes at each epoch's end and at the last update; a
        checkpoint taken before a due validation (by time, by step count or on a stop request)
        leaves it due, so a resumed run validates exactly where an uninterrupted one did."""
        state, train_config = self.state, self.run_config.train
        self.updater.start(kl_anneal_updates(train_config, state.step, state.skipped_steps))  # distributed: DDP, once every rank has its state
        finished = state.step >= self.total_steps and not self.validation_due()
        self.emit("start", {"parameters": count_parameters(self.model), "finished": finished,
                            "loops": recurrence_loops(self.model)})
        # tf32: the run's float32 products (validation's too) on the GPU's TensorFloat-32 tensor cores.
        with tensor_float32(train_config.precision == "tf32"):
            try:
                while True:
                    if self.validation_due():
                        self.validate()
                        self.save()
                    if state.step >= self.total_steps:
                        break
                    self.train_until_validation()
            except _StopNow:
                checkpoint = self.save()
                if self.group is not None:
                    self.group.barrier()  # no rank ends (and has torchrun end the others) before rank 0 wrote it
                raise TrainingStopped(self.stopping() or "request", state.step, checkpoint) from None
        self.read_metrics()
        self.model.train(False)
        if self.is_main:
            self.folder.write_curves(bound_unit(self.dataset.meta.modality))
        self.emit("end", {"best_valid_elbo": state.best_seen, "skipped_steps": state.skipped_steps})
        return TrainResult(self.folder.path, state, self.folder.newest("best"), self.folder.newest("step"))

    def save(self) -> Path:
        """A training checkpoint (rank 0 writes it), once the pending metrics are read; its folder."""
        self.read_metrics()
        if self.is_main:
            self.folder.save_training_checkpoint(self.state.step, self.run_config, self.state_dict(),
                                                 self.run_config.train.keep_checkpoints)
        self.last_checkpoint_time = time.monotonic()
        self.agreed_checkpoint = False
        checkpoint = self.folder.checkpoint("step", self.state.step)
        self.emit("checkpoint", path=checkpoint)
        return checkpoint

    def close(self) -> None:
        self.folder.close()

    def state_dict(self) -> dict:
        """What a training checkpoint holds and load_state_dict() takes, on the CPU: the weights,
        Adam's state and the trainer's, into which torch's RNG (dropout's) and fp16's gradient
        scaler are captured now."""
        scaler = self.updater.scaler
        self.state.torch_rng_state = rng_text(torch.get_rng_state())
        self.state.grad_scaler = {} if scaler is None else scaler.state_dict()
        return {"model": {name: t.detach().cpu() for name, t in self.model.state_dict().items()},
                "optimizer": flatten_optimizer_state(self.updater.optimizer), "state": asdict(self.state)}

    def load_state_dict(self, saved: dict) -> None:
        scaler = self.updater.scaler
        self.model.load_state_dict({name: t.to(self.device) for name, t in saved["model"].items()})
        restore_optimizer_state(self.updater.optimizer, *saved["optimizer"])
        self.state = TrainerState.from_dict(saved["state"])
        self.updater.set_lr(self.state.lr)
        if self.state.torch_rng_state:
            torch.set_rng_state(rng_from_text(self.state.torch_rng_state))
        if scaler is not None and self.state.grad_scaler:
            scaler.load_state_dict(self.state.grad_scaler)

    # -- the loop ---------------------------------------------------------------------------

    def validation_due(self) -> bool:
        state = self.state
        at_boundary = state.batch_in_epoch == self.batches_per_epoch or state.step >= self.total_steps
        return at_boundary and state.validated_step != state.step and state.step > 0

    def train_until_validation(self) -> None:
        train_config, state = self.run_config.train, self.state
        order = epoch_order(train_config.seed, state.epoch, len(self.train_split))
        while state.batch_in_epoch < self.batches_per_epoch and state.step < self.total_steps:
            start = state.batch_in_epoch * train_config.batch_size
            self.take_step(order[start : start + train_config.batch_size])
            if state.step % self.read_every == 0:
                self.read_metrics()
                self.agree()
            else:
                self.emit("progress")
            self.check_stop()
            if self.checkpoint_due():
                self.save()

    def stopping(self) -> str | None:
        """Why training stops now: the stop request; distributed, the one all ranks agreed on."""
        return self.stop.reason if self.group is None else self.agreed_stop

    def check_stop(self) -> None:
        if self.stopping() is not None:
            raise _StopNow

    def checkpoint_due(self) -> bool:
        train_config = self.run_config.train
        by_steps = train_config.checkpoint_every and self.state.step % train_config.checkpoint_every == 0
        by_time = self.checkpoint_clock_due() if self.group is None else self.agreed_checkpoint
        return bool(by_steps or by_time)

    def checkpoint_clock_due(self) -> bool:
        minutes = self.run_config.train.checkpoint_minutes
        return bool(minutes) and time.monotonic() - self.last_checkpoint_time >= minutes * 60

    def agree(self) -> None:
        """Distributed: whether to stop and whether to checkpoint, the same on every rank."""
        if self.group is not None:
            self.agreed_stop, self.agreed_checkpoint = self.group.agree(self.stop.reason, self.checkpoint_clock_due())

    def take_step(self, indices: np.ndarray) -> None:
        """Take the update on the global batch `indices` (this rank's rows of it, distributed);
        its metrics are read by read_metrics()."""
        state = self.state
        self.pending.begin()
        self.model.train(True)
        if self.group is not None:
            torch.manual_seed(rank_seed(self.run_config.train.seed, state.step, self.group.rank))  # dropout: its own on each rank
        batch, noise, share = self.step_inputs(indices)
        record = self.updater(batch, noise, share, state.step, state.kl_weight)
        state.step += 1
        state.batch_in_epoch += 1
        self.pending.add(PendingUpdate(state.step, state.epoch, state.lr, record))

    def step_inputs(self, indices: np.ndarray) -> tuple[Batch, Tensor, float]:
        """This process's rows of the global batch `indices`, their noise and their share (update.batch_inputs)."""
        return batch_inputs(self.train_split, indices, self.model, self.run_config.train.seed, self.state.step, self.device,
                            self.group)

    def read_metrics(self) -> None:
        """Read the metrics of the updates not read yet (one wait for the device) and act on
        them in order: count the skipped ones, log and report, stop on divergence."""
        read, seconds, elapsed = self.pending.read(self.model)
        self.state.elapsed += elapsed
        for update, metrics, broke_weights in read:
            if metrics is None:
                self.record_skip(update, broke_weights)
            else:
                self.record_update(update, metrics, seconds)

    def record_update(self, update: PendingUpdate, metrics: dict, seconds: float) -> None:
        train_config, state = self.run_config.train, self.state
        state.consecutive_skips = 0
        state.kl_weight = annealed_kl_weight(train_config, kl_anneal_updates(train_config, update.step, state.skipped_steps))
        metrics.update(kl_weight=state.kl_weight, aux_weight=annealed_aux_weight(train_config, update.step - 1), lr=update.lr,
                       seconds=seconds)
        if update.step % train_config.log_every == 0 or update.step == self.total_steps:
            self.log({"type": "train", "step": update.step, "epoch": update.epoch, **metrics})
        self.emit("step", metrics, update)

    def record_skip(self, update: PendingUpdate, broke_weights: bool) -> None:
        """A non-finite loss or gradient: the update was skipped (divergence() says when that
        stops the run)."""
        state, train_config = self.state, self.run_config.train
        state.skipped_steps += 1
        state.consecutive_skips += 1
        state.kl_weight = annealed_kl_weight(train_config, kl_anneal_updates(train_config, update.step, state.skipped_steps))
        self.emit("skip", {"skipped_steps": state.skipped_steps}, update, message=skip_reasons(train_config))
        error = divergence(state, update.step, broke_weights, self.updater.skips_before_divergence(), train_config.lr)
        if error is not None:
            raise error

    def validate(self) -> None:
        self.read_metrics()
        train_config, state = self.run_config.train, self.state
        result = evaluate_split(
            self.model, self.valid_split, batch_size=train_config.eval_batch_size, device=self.device, seed=train_config.seed,
            limit=train_config.valid_limit or None, progress=lambda done, total: self.check_stop(), group=self.group,
        )
        epoch_done = state.batch_in_epoch == self.batches_per_epoch
        improved, halved = record_validation(state, result.elbo, epoch_done, train_config)
        if halved:
            self.updater.set_lr(state.lr)
        metrics = {"elbo": result.elbo, "kl": result.kl, "nll_bound": -result.elbo, "lr": state.lr, "lr_halved": halved, "improved": improved}
        if self.dataset.meta.modality == "tokens":  # text's figure in the paper (Table 2)
            metrics["perplexity"] = perplexity(result.elbo, result.sequences, result.steps)
        self.log({"type": "valid", "step": state.step, "epoch": state.epoch, **metrics})
        if self.is_main:
            self.folder.log_samples(self.model, state.step)
        self.emit("validation", metrics)
        steps = result.steps / max(result.sequences, 1)  # per sequence, on average
        told = self.warned_collapse or not self.run_config.model.latent  # a model without latent has none to collapse
        warning = None if told else collapse_warning(result.kl, steps, bound_unit(self.dataset.meta.modality))
        if warning is not None:
            self.warned_collapse = True
            self.emit("warning", message=warning)
        state.validated_step = state.step
        if epoch_done:
            state.epoch += 1
            state.batch_in_epoch = 0
        if improved and self.is_main:
            self.folder.save_best_checkpoint(state.step, self.run_config, self.model, state)

    def log(self, record: dict) -> None:
        if self.is_main:
            self.folder.log(record)

    def emit(self, kind: str, metrics: dict | None = None, update: PendingUpdate | None = None, *, path: Path | None = None,
             message: str = "") -> None:
        step, epoch = (self.state.step, self.state.epoch) if update is None else (update.step, update.epoch)
        self.callback(TrainEvent(kind, step, self.total_steps, epoch, metrics or {}, path, message))


def skip_reasons(config: TrainConfig) -> str:
    """What makes the run's skip rule skip an update, in words: 'non-finite loss or gradient',
    and ', or a KL of 10,000 or more' with skip_kl_above."""
    reasons = "non-finite loss" + (" or gradient" if config.skip_rule == "loss-and-grad" else "")
    if config.skip_kl_above is not None:
        reasons += f", or a KL of {config.skip_kl_above:,g} or more"
    return reasons


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

    The run trains on run_config.threads CPU threads, or on torch's count when that is None,
    and records the count in its config.json: a run replayed or resumed on the same count sums
    in the same order.
    """
    if tensorboard:
        require_tensorboard()
    run_config = replace(run_config, threads=run_config.threads or torch.get_num_threads())
    with fixed_threads(run_config.threads):  # the count the run records, kept to its end
        trainer = Trainer(run_dir, run_config, dataset, device, callback, stop, group)
        try:
            trainer.open(resume, force, latest_link, tensorboard)
            return trainer.run()
        finally:
            trainer.close()


def with_loops(run_config: RunConfig, in_use: str) -> tuple[RunConfig, str | None]:
    """The run config with the loops it trains on recorded (their words, without the why), and a
    warning when a resumed or replayed run recorded others: they round differently."""
    loops = in_use.split(" (")[0]
    if run_config.loops is None:
        return replace(run_config, loops=loops), None
    if run_config.loops == loops:
        return run_config, None
    return run_config, (f"The run was trained on the {run_config.loops}; this process runs the {loops}: its numbers may "
                        "differ from those of the run (ZFORCING_COMPILED_LOOPS and a build of the compiled loops decide which run).")


def check_disk_space(folder: RunFolder, model: ZForcing, keep: int) -> str | None:
    """A checkpoint that cannot be written, found before the updates are spent: refused when
    the run folder's disk cannot take one training checkpoint; a warning (returned) when it
    cannot take all that the run keeps."""
    weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    one, needed = folder.checkpoint_space(weight_bytes, keep)
    free = free_bytes(folder.path)
    if free is None or free >= needed:
        return None
    where = f"{folder.path} has {byte_size(free)} free"
    if free < one:
        raise FileSystemError(f"{where}; one training checkpoint of this model takes about {byte_size(one)} "
                              "(its weights and Adam's two moments of each).",
                              "Free some space on that disk, or write the run to another disk (--out elsewhere).")
    return (f"{where}; the run's checkpoints may need about {byte_size(needed)} ({keep + 1} training checkpoints of "
            f"{byte_size(one)} while the newest is written, and the best model twice while it is replaced). A checkpoint "
            "that does not fit ends the run at its last complete one; free some space, or use --out on another disk.")


__all__ = ["TrainEvent", "TrainResult", "Trainer", "StopRequest", "TrainingStopped", "train"]
