"""A run folder as training writes it (checkpoint.py draws its layout): made and locked, its
config, `runs/latest`, the metrics log (and TensorBoard's), training and best checkpoints, the
training curves; and for a resumed run, the newest complete training checkpoint read back with
the metrics it has not seen dropped.

RunFolder only writes what it is given: the trainer decides what and when, and in a distributed
run only rank 0 calls its writing methods.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path

from torch import nn

from .checkpoint import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    is_run_folder,
    newest_checkpoint,
    point_latest,
    prune_checkpoints,
    read_training_checkpoint,
    remove_unfinished,
    save_checkpoint,
    write_checkpoint,
)
from .fileio import check_can_write, json_record, make_parents, naming, write_bytes, write_json
from .plots import write_training_curves
from .runconfig import RunConfig, TrainerState
from .runlock import RunLock, RunLockedError
from .runlock import holder as lock_holder
from .tensorboard import TensorBoardLog

CURVES_STEM = "training_curves"  # .png and .svg


class RunFolder:
    """One run's folder. open() takes its lock, which close() releases."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metrics_file = self.path / METRICS_FILE
        self.lock: RunLock | None = None
        self.tensorboard: TensorBoardLog | None = None

    def open(self, resume: bool, force: bool = False) -> str | None:
        """A new run's folder made empty (force: replacing a finished or abandoned run), or a
        resumed run's as it is; then locked. Returns what to tell when the lock was taken over
        from a process that died holding it, else None."""
        made = not resume and not self.path.exists()
        if not resume:
            self.create(force)
        self.lock = RunLock(self.path)
        try:
            self.lock.acquire()
        except BaseException:
            self.lock = None
            if made:
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        owner = self.lock.stale_owner
        if not owner:
            return None
        return f"Took over the run's lock from process {owner.get('pid', '?')} on {owner.get('host', '?')}, which is no longer running."

    def create(self, force: bool = False) -> None:
        """An empty run folder; with force, replace a finished or abandoned run (never one that
        another process is training, nor a folder zforcing did not write)."""
        check_can_write(self.path, force, "run folder", is_run_folder)
        if self.path.is_dir() and any(self.path.iterdir()):
            owner = lock_holder(self.path)
            if owner is not None:
                raise RunLockedError(self.path, owner)
            shutil.rmtree(self.path)
        make_parents(self.path)

    def restore(self) -> tuple[Path, dict] | None:
        """The newest complete training checkpoint and what it holds (read_training_checkpoint),
        the metrics logged after it dropped; None when the run has none, its metrics dropped
        whole (it starts again from step 0)."""
        remove_unfinished(self.path)
        checkpoint = newest_checkpoint(self.path, "step")
        if checkpoint is None:
            self.metrics_file.unlink(missing_ok=True)
            return None
        saved = read_training_checkpoint(checkpoint)
        state = TrainerState.from_dict(saved["state"])
        truncate_metrics(self.metrics_file, state.step, state.validated_step)
        return checkpoint, saved

    def write_config(self, config: RunConfig) -> None:
        write_json(self.path / CONFIG_FILE, config.to_dict())

    def link_latest(self, runs_root: Path) -> str | None:
        """Point runs_root/latest at the run. A runs folder that cannot be written only warns:
        returns the warning, else None."""
        try:
            point_latest(runs_root, self.path)
        except OSError as error:
            return f"{runs_root / 'latest'} was not updated ({error.strerror}); pass the run folder to evaluate and sample."
        return None

    def open_tensorboard(self, data: dict, seed: int, resumed_at: int | None) -> None:
        self.tensorboard = TensorBoardLog(self.path, data, seed, resumed_at=resumed_at)

    def log(self, record: dict) -> None:
        """One record of metrics.jsonl (and TensorBoard's scalars); a record that cannot be
        written whole (a full disk) is taken back, and the error names the file."""
        line = memoryview((json.dumps(json_record(record), allow_nan=False) + "\n").encode())
        # Unbuffered: each write() reaches the file system here, where its error can be caught.
        with naming(self.metrics_file), open(self.metrics_file, "ab", buffering=0) as handle:
            start = handle.seek(0, os.SEEK_END)
            try:
                while line:
                    line = line[handle.write(line):]
            except OSError:
                with suppress(OSError):
                    handle.truncate(start)
                raise
        if self.tensorboard is not None:
            self.tensorboard.record(record)

    def log_samples(self, model: nn.Module, step: int) -> None:
        """What the model generates, for TensorBoard (nothing without it)."""
        if self.tensorboard is not None:
            self.tensorboard.samples(model, step)

    def checkpoint(self, kind: str, step: int) -> Path:
        """Where the checkpoint of `kind` (step or best) at `step` goes."""
        return self.path / CHECKPOINTS_DIR / f"{kind}-{step:08d}"

    def save_training_checkpoint(self, step: int, config: RunConfig, saved: dict, keep: int) -> Path:
        """A training checkpoint of what the trainer's state_dict() gave, keeping the `keep`
        newest."""
        folder = write_checkpoint(self.checkpoint("step", step), config.to_dict(), saved["model"], saved["state"],
                                  saved["optimizer"])
        prune_checkpoints(self.path, "step", keep)
        return folder

    def save_best_checkpoint(self, step: int, config: RunConfig, model: nn.Module, state: TrainerState) -> Path:
        """The best checkpoint (the model and the trainer's state, no optimizer), replacing the last."""
        folder = save_checkpoint(self.checkpoint("best", step), model, config.to_dict(), asdict(state))
        prune_checkpoints(self.path, "best", 1)
        return folder

    def checkpoint_space(self, weight_bytes: int, keep: int) -> tuple[int, int]:
        """(the bytes of one training checkpoint, the bytes the run's checkpoints may take beyond
        what its folder holds now) for a model of weight_bytes keeping `keep` training
        checkpoints. At the peak the disk holds keep + 1 training checkpoints (the oldest goes
        once the new one is complete) and two best ones (likewise); what the folder holds now
        is replaced by them (resumed) or removed (--force)."""
        one = 3 * weight_bytes  # the weights and Adam's two moments of each
        peak = (keep + 1) * one + 2 * weight_bytes
        return one, max(0, peak - self.checkpoints_bytes())

    def checkpoints_bytes(self) -> int:
        root = self.path / CHECKPOINTS_DIR
        return sum(file.stat().st_size for file in root.rglob("*") if file.is_file()) if root.is_dir() else 0

    def newest(self, kind: str) -> Path | None:
        return newest_checkpoint(self.path, kind)

    def write_curves(self, unit: str) -> None:
        write_training_curves(self.metrics_file, self.path / CURVES_STEM, unit)

    def close(self) -> None:
        """TensorBoard's log closed and the lock released (what open() took; safe to repeat)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


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
