"""Training: Adam on the Eq. 10 objective, with validation, checkpoints and exact resume.

The core never prints: it reports through a progress callback that receives TrainEvents.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
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
from .errors import TrainingError
from .evaluate import bound_unit, evaluate_split
from .fileio import check_can_write, json_record, write_bytes, write_json
from .model import ZForcing, ZForcingConfig, count_parameters
from .plots import write_training_curves
from .runlock import RunLock, RunLockedError
from .tensorboard import TensorBoardLog, require_tensorboard
from .runlock import holder as lock_holder

METRICS_FILE = "metrics.jsonl"
CURVES_STEM = "training_curves"  # .png and .svg


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # stop after this many updates, even mid-epoch
    batch_size: int = 32
    lr: float = 1e-3
    adam_eps: float = 1e-5
    adam_beta2: float = 0.999
    weight_decay: float = 0.0  # L2 penalty added to the gradient by Adam (the authors' IMDB setting: 1e-6)
    aux_weight: float = 0.0  # α of Eq. 10
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


@dataclass
class TrainEvent:
    """What the trainer reports.

    kind: resume (metrics: checkpoint, None when restarting from step 0) | stale_lock (metrics:
    the dead holder) | warning (metrics: message) | start (metrics: parameters, finished: True
    when nothing is left to do) | step | skip | validation | checkpoint | end.
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


def objective(out, kl_weight: float, config: TrainConfig) -> torch.Tensor:
    """Eq. 10 per sequence, averaged over the batch: -log p(y|h) + w·KL + α·aux + β·bwd."""
    per_sequence = out.nll + kl_weight * out.kl
    if config.aux_weight:
        per_sequence = per_sequence + config.aux_weight * out.aux
    if config.bwd_weight:
        per_sequence = per_sequence + config.bwd_weight * out.bwd
    return per_sequence.mean()


def train_step(
    model: ZForcing,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    kl_weight: float,
    config: TrainConfig,
    generator: torch.Generator,
) -> dict | None:
    """One Adam update; returns its metrics, or None when the loss or gradient was not finite."""
    out = model(batch.targets, batch.mask, generator=generator, first_input=batch.first_input)
    loss = objective(out, kl_weight, config)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return None
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return {
        "loss": loss.item(),
        "nll": out.nll.mean().item(),
        "kl": out.kl.mean().item(),
        "aux": out.aux.mean().item(),
        "bwd": out.bwd.mean().item(),
        "elbo": out.elbo.mean().item(),
        "grad_norm": grad_norm.item(),
    }


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The noise of update `step` depends only on (seed, step): resuming needs no RNG stream."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    return generator


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


def annealed_kl_weight(config: TrainConfig, updates: int) -> float:
    if not config.kl_anneal:
        return 1.0
    return min(1.0, config.kl_start + config.kl_increment * updates)


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
    def __init__(
        self,
        run_dir: Path,
        run_config: RunConfig,
        dataset: PreparedDataset,
        device: torch.device,
        callback: ProgressCallback | None = None,
        stop: StopRequest | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.config = run_config
        self.dataset = dataset
        self.device = device
        self.callback = callback or (lambda event: None)
        self.stop = stop or StopRequest()
        cfg = run_config.train
        torch.manual_seed(cfg.seed)
        self.model = ZForcing(run_config.model).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=cfg.adam_eps,
                                          weight_decay=cfg.weight_decay)
        self.state = TrainerState(kl_weight=annealed_kl_weight(cfg, 0), lr=cfg.lr)
        self.train_split = dataset.split("train")
        self.valid_split = dataset.split("valid")
        self.last_checkpoint_time = time.monotonic()
        self.tensorboard: TensorBoardLog | None = None

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
        self.run_dir.mkdir(parents=True, exist_ok=True)

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
        tensors = read_tensors(folder / MODEL_FILE)
        self.model.load_state_dict({name: t.to(self.device) for name, t in tensors.items()})
        saved = read_trainer_state(folder)
        groups = saved.pop("optimizer_param_groups")
        restore_optimizer_state(self.optimizer, read_tensors(folder / OPTIMIZER_FILE), groups)
        saved.setdefault("validated_step", saved["step"])  # written by 0.1.0, which saved after validating
        self.state = TrainerState(**saved)
        self.set_lr(self.state.lr)
        if self.state.torch_rng_state:
            torch.set_rng_state(torch.tensor(bytearray(base64.b64decode(self.state.torch_rng_state)), dtype=torch.uint8))
        truncate_metrics(self.run_dir / METRICS_FILE, self.state.step, self.state.validated_step)
        return folder

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
        state = self.state
        finished = state.step >= self.total_steps and not self.validation_due()
        self.emit("start", {"parameters": count_parameters(self.model), "finished": finished})
        try:
            while True:
                if self.validation_due():
                    self.validate()
                    self.save_training_checkpoint()
                if state.step >= self.total_steps:
                    break
                self.train_until_validation()
        except _StopNow:
            raise TrainingStopped(self.stop.reason or "request", state.step, self.save_training_checkpoint()) from None
        self.model.train(False)
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
            self.check_stop()
            if self.checkpoint_due():
                self.save_training_checkpoint()

    def check_stop(self, *_progress) -> None:
        if self.stop.reason is not None:
            raise _StopNow

    def checkpoint_due(self) -> bool:
        cfg = self.config.train
        by_steps = cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0
        by_time = cfg.checkpoint_minutes and time.monotonic() - self.last_checkpoint_time >= cfg.checkpoint_minutes * 60
        return bool(by_steps or by_time)

    def take_step(self, indices: np.ndarray) -> None:
        cfg, state = self.config.train, self.state
        began = time.perf_counter()
        self.model.train(True)
        batch = self.train_split.batch(indices).to(self.device)
        metrics = train_step(
            self.model, self.optimizer, batch, state.kl_weight, cfg,
            step_generator(cfg.seed, state.step, self.device),
        )
        state.step += 1
        state.batch_in_epoch += 1
        state.elapsed += time.perf_counter() - began
        if metrics is None:
            self.record_skip()
            return
        state.consecutive_skips = 0
        state.kl_weight = annealed_kl_weight(cfg, state.step - state.skipped_steps)
        metrics.update(kl_weight=state.kl_weight, lr=state.lr, seconds=time.perf_counter() - began)
        if state.step % cfg.log_every == 0 or state.step == self.total_steps:
            self.log({"type": "train", "step": state.step, "epoch": state.epoch, **metrics})
        self.emit("step", metrics)

    def record_skip(self) -> None:
        """A non-finite loss or gradient: the update is skipped. Weights that are no longer
        finite cannot recover, so that stops at once; otherwise after too many in a row."""
        state = self.state
        state.skipped_steps += 1
        state.consecutive_skips += 1
        self.emit("skip", {"skipped_steps": state.skipped_steps})
        lower_lr = f"Start a new run with a lower --lr (this one used {self.config.train.lr:g})."
        if not all(torch.isfinite(parameter).all() for parameter in self.model.parameters()):
            raise TrainingError(
                f"Training diverged: the update at step {state.step - state.consecutive_skips:,} made the weights "
                f"non-finite (NaN or infinity), so step {state.step:,} could not be taken.",
                lower_lr,
            )
        if state.consecutive_skips >= self.config.train.max_consecutive_skips:
            raise TrainingError(
                f"Training diverged: {state.consecutive_skips} updates in a row had a non-finite loss "
                f"(steps {state.step - state.consecutive_skips + 1:,} to {state.step:,}); the weights were not touched by them.",
                lower_lr,
            )

    def validate(self) -> None:
        cfg, state = self.config.train, self.state
        result = evaluate_split(
            self.model, self.valid_split, batch_size=cfg.eval_batch_size, device=self.device,
            seed=cfg.seed, limit=cfg.valid_limit or None, progress=self.check_stop,
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
        state.validated_step = state.step
        if epoch_done:
            state.epoch += 1
            state.batch_in_epoch = 0
        if improved:
            self.save_best_checkpoint()

    # -- outputs ----------------------------------------------------------------------------

    def save_training_checkpoint(self) -> Path:
        self.state.torch_rng_state = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        folder = self.run_dir / CHECKPOINTS_DIR / f"step-{self.state.step:08d}"
        save_checkpoint(folder, self.model, self.config.to_dict(), asdict(self.state), self.optimizer)
        prune_checkpoints(self.run_dir, "step", self.config.train.keep_checkpoints)
        self.last_checkpoint_time = time.monotonic()
        self.emit("checkpoint", {"path": str(folder)})
        return folder

    def save_best_checkpoint(self) -> Path:
        folder = self.run_dir / CHECKPOINTS_DIR / f"best-{self.state.step:08d}"
        save_checkpoint(folder, self.model, self.config.to_dict(), asdict(self.state))
        prune_checkpoints(self.run_dir, "best", 1)
        return folder

    def log(self, record: dict) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(json_record(record), allow_nan=False) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.record(record)

    def emit(self, kind: str, metrics: dict) -> None:
        self.callback(TrainEvent(kind, self.state.step, self.total_steps, self.state.epoch, metrics))


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
) -> TrainResult:
    """Train a new run in run_dir, or (resume=True) continue its newest complete checkpoint.

    The run folder is locked for the whole call: a second process gets RunLockedError. With
    latest_link (a runs folder), its `latest` names this run once the run's config is written.
    tensorboard=True also logs the metrics and samples for TensorBoard (tensorboard.py).
    """
    if tensorboard:
        require_tensorboard()
    trainer = Trainer(run_dir, run_config, dataset, device, callback, stop)
    made = not resume and not trainer.run_dir.exists()
    if not resume:
        trainer.create_run_folder(force)
    lock = RunLock(trainer.run_dir)
    try:
        lock.acquire()
    except BaseException:
        if made:
            shutil.rmtree(trainer.run_dir, ignore_errors=True)
        raise
    try:
        if lock.stale_owner:
            trainer.emit("stale_lock", lock.stale_owner)
        if resume:
            folder = trainer.restore()
            trainer.emit("resume", {"checkpoint": None if folder is None else str(folder)})
        trainer.write_config()
        if latest_link is not None:
            link_latest(trainer, latest_link)
        if tensorboard:
            trainer.tensorboard = TensorBoardLog(trainer.run_dir, run_config.data, run_config.train.seed,
                                                 resumed_at=trainer.state.step if resume else None)
        return trainer.run()
    finally:
        if trainer.tensorboard is not None:
            trainer.tensorboard.close()
        lock.release()


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
