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
    newest_checkpoint,
    point_latest,
    prune_checkpoints,
    read_config,
    read_tensors,
    read_trainer_state,
    restore_optimizer_state,
    save_checkpoint,
)
from .data import PreparedDataset
from .errors import TrainingError
from .evaluate import evaluate_split
from .fileio import check_can_write, write_json
from .model import ZForcing, ZForcingConfig, count_parameters
from .plots import write_training_curves

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.svg"


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # stop after this many updates, even mid-epoch
    batch_size: int = 32
    lr: float = 1e-3
    adam_eps: float = 1e-5
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
    keep_checkpoints: int = 2
    log_every: int = 10


@dataclass
class RunConfig:
    model: ZForcingConfig
    train: TrainConfig
    data: dict  # location, kind, modality, sequence_length, image_shape

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": asdict(self.train), "data": self.data}

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        return cls(ZForcingConfig.from_dict(values["model"]), TrainConfig(**values["train"]), values["data"])


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


@dataclass
class TrainEvent:
    """What the trainer reports. kind: start | step | skip | validation | checkpoint | end."""

    kind: str
    step: int
    total_steps: int
    epoch: int
    metrics: dict = field(default_factory=dict)


ProgressCallback = Callable[[TrainEvent], None]


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
    batch: tuple[torch.Tensor, torch.Tensor],
    kl_weight: float,
    config: TrainConfig,
    generator: torch.Generator,
) -> dict | None:
    """One Adam update; returns its metrics, or None when the loss or gradient was not finite."""
    targets, mask = batch
    out = model(targets, mask, generator=generator)
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
    without improvement. Returns True when the lr was halved."""
    if state.best_valid is None or valid_elbo > state.best_valid:
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
    ):
        self.run_dir = Path(run_dir)
        self.config = run_config
        self.dataset = dataset
        self.device = device
        self.callback = callback or (lambda event: None)
        cfg = run_config.train
        torch.manual_seed(cfg.seed)
        self.model = ZForcing(run_config.model).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        self.state = TrainerState(kl_weight=annealed_kl_weight(cfg, 0), lr=cfg.lr)
        self.train_split = dataset.split("train")
        self.valid_split = dataset.split("valid")

    # -- set-up -----------------------------------------------------------------------------

    def start_new(self, force: bool = False) -> None:
        check_can_write(self.run_dir, force)
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True)
        write_json(self.run_dir / CONFIG_FILE, self.config.to_dict())
        point_latest(self.run_dir)

    def restore(self) -> Path:
        """Load the newest complete training checkpoint of the run."""
        folder = newest_checkpoint(self.run_dir, "step")
        if folder is None:
            raise TrainingError(
                f"{self.run_dir} has no complete training checkpoint to resume from.",
                "Start a new run without --resume.",
            )
        tensors = read_tensors(folder / MODEL_FILE)
        self.model.load_state_dict({name: t.to(self.device) for name, t in tensors.items()})
        saved = read_trainer_state(folder)
        groups = saved.pop("optimizer_param_groups")
        restore_optimizer_state(self.optimizer, read_tensors(folder / OPTIMIZER_FILE), groups)
        self.state = TrainerState(**saved)
        self.set_lr(self.state.lr)
        if self.state.torch_rng_state:
            torch.set_rng_state(torch.tensor(bytearray(base64.b64decode(self.state.torch_rng_state)), dtype=torch.uint8))
        truncate_metrics(self.run_dir / METRICS_FILE, self.state.step)
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
        cfg = self.config.train
        total = cfg.epochs * self.batches_per_epoch
        return min(total, cfg.max_steps) if cfg.max_steps is not None else total

    def run(self) -> TrainResult:
        cfg, state = self.config.train, self.state
        self.emit("start", {"parameters": count_parameters(self.model)})
        while state.step < self.total_steps:
            order = epoch_order(cfg.seed, state.epoch, len(self.train_split))
            while state.batch_in_epoch < self.batches_per_epoch and state.step < self.total_steps:
                start = state.batch_in_epoch * cfg.batch_size
                self.take_step(order[start : start + cfg.batch_size])
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    self.save_training_checkpoint()
            epoch_done = state.batch_in_epoch == self.batches_per_epoch
            self.validate(epoch_done)
            if epoch_done:
                state.epoch += 1
                state.batch_in_epoch = 0
            self.save_training_checkpoint()
        self.model.train(False)
        write_training_curves(self.run_dir / METRICS_FILE, self.run_dir / CURVES_FILE)
        self.emit("end", {"best_valid_elbo": state.best_seen, "skipped_steps": state.skipped_steps})
        return TrainResult(self.run_dir, state, newest_checkpoint(self.run_dir, "best"), newest_checkpoint(self.run_dir, "step"))

    def take_step(self, indices: np.ndarray) -> None:
        cfg, state = self.config.train, self.state
        began = time.perf_counter()
        self.model.train(True)
        targets, mask = self.train_split.batch(indices)
        batch = (targets.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True))
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
        state = self.state
        state.skipped_steps += 1
        state.consecutive_skips += 1
        self.emit("skip", {"skipped_steps": state.skipped_steps})
        if state.consecutive_skips >= self.config.train.max_consecutive_skips:
            raise TrainingError(
                f"Training diverged: {state.consecutive_skips} updates in a row had a non-finite loss "
                f"(step {state.step}); the weights were not touched by them.",
                "Lower --lr, or resume from the last checkpoint with --resume and a lower --lr.",
            )

    def validate(self, epoch_done: bool) -> None:
        cfg, state = self.config.train, self.state
        result = evaluate_split(
            self.model, self.valid_split, batch_size=cfg.eval_batch_size, device=self.device,
            seed=cfg.seed, limit=cfg.valid_limit or None,
        )
        # A stop mid-epoch (--max-steps) validates too; only epoch ends feed the plateau rule, so
        # that a run stopped and resumed keeps the schedule of one never stopped.
        improved = state.best_seen is None or result.elbo > state.best_seen
        if improved:
            state.best_seen = result.elbo
        halved = plateau_update(state, result.elbo, cfg) if epoch_done else False
        if halved:
            self.set_lr(state.lr)
        metrics = {"elbo": result.elbo, "kl": result.kl, "nll_bound": -result.elbo, "lr": state.lr, "lr_halved": halved, "improved": improved}
        self.log({"type": "valid", "step": state.step, "epoch": state.epoch, **metrics})
        self.emit("validation", metrics)
        if improved:
            self.save_best_checkpoint()

    # -- outputs ----------------------------------------------------------------------------

    def save_training_checkpoint(self) -> Path:
        self.state.torch_rng_state = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        folder = self.run_dir / CHECKPOINTS_DIR / f"step-{self.state.step:08d}"
        save_checkpoint(folder, self.model, self.config.to_dict(), asdict(self.state), self.optimizer)
        prune_checkpoints(self.run_dir, "step", self.config.train.keep_checkpoints)
        self.emit("checkpoint", {"path": str(folder)})
        return folder

    def save_best_checkpoint(self) -> Path:
        folder = self.run_dir / CHECKPOINTS_DIR / f"best-{self.state.step:08d}"
        save_checkpoint(folder, self.model, self.config.to_dict(), asdict(self.state))
        prune_checkpoints(self.run_dir, "best", 1)
        return folder

    def log(self, record: dict) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def emit(self, kind: str, metrics: dict) -> None:
        self.callback(TrainEvent(kind, self.state.step, self.total_steps, self.state.epoch, metrics))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step`: a resumed run re-does those updates."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


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
) -> TrainResult:
    """Train a new run in run_dir, or (resume=True) continue its newest complete checkpoint."""
    trainer = Trainer(run_dir, run_config, dataset, device, callback)
    if resume:
        trainer.restore()
        write_json(trainer.run_dir / CONFIG_FILE, run_config.to_dict())
        point_latest(trainer.run_dir)
    else:
        trainer.start_new(force)
    return trainer.run()


def data_description(dataset: PreparedDataset) -> dict:
    """What a checkpoint records about its data, so evaluate and sample need no flags."""
    meta = dataset.meta
    return {
        "location": dataset.location,
        "kind": meta.kind,
        "protocol": meta.protocol,
        "modality": meta.modality,
        "sequence_length": meta.sequence_length,
        "image_shape": meta.image_shape,
    }


__all__ = ["RunConfig", "TrainConfig", "TrainEvent", "TrainResult", "Trainer", "train", "data_description"]
