"""Checkpoint folders and run folders. No pickle: JSON and safetensors only.

    runs/<name>/                       a run folder (`runs/latest` names the newest)
      config.json                      what was trained: model, data and training config
      metrics.jsonl                    one JSON record per logged step and per validation
      training_curves.png, .svg        ELBO, KL, auxiliary cost and learning rate over training (paper Fig. 2)
      checkpoints/
        step-00001200/                 training checkpoint (the newest complete one resumes)
          config.json  model.safetensors  optimizer.safetensors  trainer_state.json
        best-00001000/                 the best validation bound so far
          config.json  model.safetensors  trainer_state.json

Every checkpoint folder is written under a temporary name and renamed when complete, so a
folder named step-* or best-* is always whole.

`runs/latest`, in the folder where `zforcing train` was started, names the newest run started
there, wherever its --out put it (a relative link inside runs/, an absolute one elsewhere), so
bare `evaluate`, `sample` and `train --resume` find it.

torch, safetensors and the model are imported by the functions that read or write tensors:
finding a checkpoint (resolve_checkpoint, resolve_latest) and reading its config do without
them, so that the command line says a path is wrong before loading torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError
from .fileio import atomic_directory, holds_json_object, write_json
from .version import __version__

if TYPE_CHECKING:
    import torch

    from .model import ZForcing

CHECKPOINT_FORMAT = 1
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"  # in a run folder
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"
SWEEP_FILE = "sweep.json"  # a sweep folder's record (sweep/study.py writes it; compare tells sweep folders by it)
LATEST = "latest"
STEP_PATTERN = re.compile(r"^(step|best)-(\d+)$")
UNFINISHED_PATTERN = re.compile(r"^\.(step|best)-\d+\.(tmp|old)-")


# -- writing ------------------------------------------------------------------------------------


def save_checkpoint(
    folder: Path,
    model: ZForcing,
    config: dict,
    trainer_state: dict,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write one checkpoint folder atomically; optimizer state is included for resuming."""
    optimizer_state = None if optimizer is None else flatten_optimizer_state(optimizer)
    return write_checkpoint(folder, config, model.state_dict(), trainer_state, optimizer_state)


def write_checkpoint(
    folder: Path,
    config: dict,
    weights: dict[str, torch.Tensor],
    trainer_state: dict,
    optimizer_state: tuple[dict[str, torch.Tensor], list[dict]] | None = None,
) -> Path:
    """save_checkpoint from the model's weights and, for a training checkpoint, the optimizer's
    state as flatten_optimizer_state gives it (read_training_checkpoint reads both back)."""
    with atomic_directory(folder, force=True, what="checkpoint folder", is_ours=is_checkpoint_folder) as staging:
        write_json(staging / CONFIG_FILE, {**config, "format_version": CHECKPOINT_FORMAT, "zforcing_version": __version__})
        save_file({name: t.detach().cpu().contiguous() for name, t in weights.items()}, staging / MODEL_FILE)
        if optimizer_state is not None:
            tensors, groups = optimizer_state
            save_file(tensors, staging / OPTIMIZER_FILE)
            trainer_state = {**trainer_state, "optimizer_param_groups": groups}
        write_json(staging / STATE_FILE, trainer_state)
    return folder


def save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, imported when first used (it loads torch)."""
    from safetensors.torch import save_file as save

    save(tensors, path)


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """safetensors' load_file, imported when first used (it loads torch)."""
    from safetensors.torch import load_file as load

    return load(path)


def flatten_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state as flat named tensors plus JSON-able parameter groups."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, values in state["state"].items()
        for name, value in values.items()
    }
    return tensors, state["param_groups"]


# How the optimizer computes, not what it learnt: a run resumed on another device keeps the
# implementation chosen there (the fused kernel on a GPU, the plain loop on a CPU).
IMPLEMENTATION_SETTINGS = ("fused", "foreach", "capturable", "differentiable")


def restore_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [
        {**saved, **{name: current[name] for name in IMPLEMENTATION_SETTINGS if name in current}}
        for saved, current in zip(groups, optimizer.param_groups)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def remove_unfinished(run_dir: Path) -> None:
    """Remove the temporary folders of checkpoint writes that a kill cut short (only the run's
    lock holder calls this, so no write is in progress)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for folder in root.glob(".*-*"):
            if UNFINISHED_PATTERN.match(folder.name):
                shutil.rmtree(folder, ignore_errors=True)


def prune_checkpoints(run_dir: Path, prefix: str, keep: int) -> None:
    """Remove all but the `keep` newest complete checkpoints named prefix-*."""
    folders = sorted(list_checkpoints(run_dir, prefix), key=checkpoint_step)
    for old in folders[:-keep] if keep > 0 else folders:
        shutil.rmtree(old)


# -- finding -------------------------------------------------------------------------------------


def checkpoint_step(folder: Path) -> int:
    match = STEP_PATTERN.match(folder.name)
    return int(match.group(2)) if match else -1


def list_checkpoints(run_dir: Path, prefix: str) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return [
        folder for folder in root.iterdir()
        if folder.is_dir() and STEP_PATTERN.match(folder.name) and folder.name.startswith(prefix + "-")
    ]


def newest_checkpoint(run_dir: Path, prefix: str) -> Path | None:
    folders = list_checkpoints(run_dir, prefix)
    return max(folders, key=checkpoint_step) if folders else None


def is_checkpoint_folder(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file() and (Path(folder) / MODEL_FILE).is_file()


def is_sweep_folder(folder: Path) -> bool:
    """Whether folder is a sweep folder written by `zforcing sweep` (it holds its sweep.json)."""
    return (Path(folder) / SWEEP_FILE).is_file()


def is_run_folder(folder: Path) -> bool:
    """Whether folder is a run folder written by `zforcing train` (for --force)."""
    return holds_json_object(Path(folder) / CONFIG_FILE, {"model", "train", "data"})


def resolve_latest(runs_root: Path) -> Path:
    """The run folder that runs/latest names (a symlink, or a text file where links fail)."""
    latest = Path(runs_root) / LATEST
    if latest.is_symlink() and not latest.exists():
        raise CheckpointError(
            f"{latest} names {os.readlink(latest)}, which no longer exists.",
            "Pass a run folder, or train again to point runs/latest at a new run.",
        )
    if latest.is_symlink() or latest.is_dir():
        return latest.resolve()
    if latest.is_file():
        return (Path(runs_root) / latest.read_text().strip()).resolve()
    raise CheckpointError(
        f"No checkpoint given and {latest} does not exist.",
        "Train a model first (`zforcing train`), or pass a run or checkpoint folder.",
    )


def point_latest(runs_root: Path, run_dir: Path) -> None:
    """Make runs_root/latest name run_dir, atomically: a relative link when run_dir lies in
    runs_root (the pair can move together), an absolute one elsewhere."""
    runs_root = Path(runs_root)
    runs_root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(run_dir).absolute()
    target = run_dir.name if run_dir.parent == runs_root.absolute() else str(run_dir)
    latest, tmp = runs_root / LATEST, runs_root / f".{LATEST}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        os.symlink(target, tmp, target_is_directory=True)
    except OSError:  # no symlinks on this filesystem: a text file naming the run
        tmp.write_text(target + "\n")
    os.replace(tmp, latest)


def resolve_checkpoint(path: Path | None, runs_root: Path = Path("runs")) -> Path:
    """A checkpoint folder from a checkpoint folder, a run folder, or runs/latest (path None).

    A run folder resolves to its best checkpoint, or its newest training checkpoint.
    """
    if path is None:
        path = resolve_latest(runs_root)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist.", "Pass a run folder (runs/NAME) or a checkpoint folder.")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder.", "Pass the folder that holds config.json and model.safetensors.")
    if (path / CONFIG_FILE).exists() and not (path / CHECKPOINTS_DIR).is_dir():
        return path
    found = newest_checkpoint(path, "best") or newest_checkpoint(path, "step")
    if found is None:
        raise CheckpointError(
            f"{path} is not a checkpoint or a run folder with checkpoints.",
            "Pass a run folder written by `zforcing train`, or one of its checkpoints/step-* folders.",
        )
    return found


# -- reading -------------------------------------------------------------------------------------


def read_config(folder: Path) -> dict:
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a checkpoint (no {CONFIG_FILE}).", "Pass a folder written by `zforcing train`.") from None
    except ValueError as error:
        raise CheckpointError(f"{folder / CONFIG_FILE} is corrupted ({error}).", "Use another checkpoint of the run.") from None
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{folder} is not a zforcing checkpoint ({CONFIG_FILE} has no model config).", "Pass a folder written by `zforcing train`.")
    if config.get("format_version", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{folder} was written by a newer zforcing ({config.get('zforcing_version')}).", "Upgrade zforcing to read it.")
    return config


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    folder = file.parent
    if not file.is_file():
        raise CheckpointError(f"{folder} is incomplete: {file.name} is missing.", "Use another checkpoint of the run, or train again.")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{file} is corrupted ({error}).", "Use another checkpoint of the run, or train again.") from None


def load_model(folder: Path, device: torch.device | str = "cpu") -> tuple[ZForcing, dict]:
    """The model of a checkpoint folder and the folder's config."""
    from .model import ZForcingConfig, build_model

    config = read_config(folder)
    try:
        model = build_model(ZForcingConfig.from_dict(config["model"]))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{folder / CONFIG_FILE} has an invalid model config ({error}).", "Use another checkpoint of the run.") from None
    tensors = read_tensors(Path(folder) / MODEL_FILE)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{folder} does not match its config.json ({first}).", "Use another checkpoint of the run.") from None
    check_finite_weights(folder, tensors)
    return model.to(device), config


def check_finite_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    import torch

    broken = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise CheckpointError(
            f"{folder} has non-finite weights (NaN or infinity in {', '.join(broken[:3])}"
            f"{' and more' if len(broken) > 3 else ''}): the run diverged before this checkpoint.",
            "Use an earlier checkpoint of the run, or train again with a lower --lr.",
        )


def read_trainer_state(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / STATE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is incomplete: {STATE_FILE} is missing.", "Use another checkpoint of the run.") from None
    except ValueError as error:
        raise CheckpointError(f"{folder / STATE_FILE} is corrupted ({error}).", "Use another checkpoint of the run.") from None


def read_training_checkpoint(folder: Path) -> dict:
    """What write_checkpoint wrote in a training checkpoint: {"model": the weights, "optimizer":
    (its tensors, its parameter groups), "state": the trainer's state}, on the CPU."""
    state = read_trainer_state(folder)
    groups = state.pop("optimizer_param_groups")
    return {"model": read_tensors(Path(folder) / MODEL_FILE), "optimizer": (read_tensors(Path(folder) / OPTIMIZER_FILE), groups),
            "state": state}
