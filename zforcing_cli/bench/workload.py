"""What the benchmark measures: its presets and sizes, the models and training configs they
give, and the training update it times (the same for the model and the fused LSTM pair)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from ..data import Batch, PreparedDataset
from ..data.prepared import DatasetMeta
from ..errors import UsageError
from ..model import ZForcing, ZForcingConfig
from ..presets import preset_configs
from ..runconfig import TrainConfig
from ..update import objective
from .defaults import SIZES

BENCH_PRESETS = ("mnist", "timit", "blizzard", "imdb")
AUDIO_PRESETS = ("timit", "blizzard")
# The size measured unless --size says otherwise: the paper's for speech and text, where the
# speed targets are set (TIMIT: within 1.25x of the fused LSTM pair); for MNIST the small
# preset, what a bare `zforcing train` runs (at the paper's 1024 units, 784 steps take minutes
# per update on a CPU).
DEFAULT_SIZES = {"mnist": "small", "timit": "paper", "blizzard": "paper", "imdb": "paper"}
# tiny: a smoke test of the benchmark itself (the tests use it); its figures mean nothing.
TINY_MODEL = {"embed_size": 8, "hidden_size": 16, "latent_size": 4, "mlp_size": 16}
TINY_BATCH = 4
# α and β where the preset leaves them at 0 (the speech presets): every head then trains, so
# that each side runs the whole of Eq. 10 backward.
AUX_WEIGHT = 0.0025


def check_preset(preset: str, size: str | None) -> str:
    """The size to measure (the preset's default when None); UsageError for unknown names."""
    if preset not in BENCH_PRESETS:
        raise UsageError(f"Unknown benchmark preset {preset!r}.", f"Choose one of: {', '.join(BENCH_PRESETS)}.")
    size = size or DEFAULT_SIZES[preset]
    if size not in SIZES:
        raise UsageError(f"Unknown size {size!r}.", f"Choose one of: {', '.join(SIZES)}.")
    return size


@dataclass(frozen=True)
class Resize:
    """Widths and batch in place of the size's, where given (None: the size's own)."""

    hidden_size: int | None = None  # units of both LSTMs
    mlp_size: int | None = None  # hidden units of every MLP head
    batch_size: int | None = None  # sequences per update, at most SYNTHETIC_SEQUENCES


def bench_configs(size: str, meta: DatasetMeta, resize: Resize = Resize()) -> tuple[ZForcingConfig, TrainConfig]:
    """The preset's model and training configs at `size` for the dataset, as measured: α and β
    at least AUX_WEIGHT; tiny: TINY_MODEL widths and a batch of TINY_BATCH; then `resize`."""
    model_config, train_config = preset_configs("small" if size == "tiny" else size, meta)
    if size == "tiny":
        model_config = replace(model_config, **TINY_MODEL)
        train_config.batch_size = TINY_BATCH
    model_config = replace(model_config, hidden_size=resize.hidden_size or model_config.hidden_size,
                           mlp_size=resize.mlp_size or model_config.mlp_size)
    train_config.batch_size = resize.batch_size or train_config.batch_size
    train_config.aux_weight = train_config.aux_weight or AUX_WEIGHT
    train_config.bwd_weight = train_config.bwd_weight or AUX_WEIGHT
    return model_config, train_config


def training_setup(dataset: PreparedDataset, size: str, device: torch.device, resize: Resize = Resize()):
    """(model, train config, the first training batch on device) for a dataset."""
    model_config, train_config = bench_configs(size, dataset.meta, resize)
    torch.manual_seed(0)
    model = ZForcing(model_config).to(device)
    batch = dataset.split("train").batch(np.arange(train_config.batch_size)).to(device)
    return model, train_config, batch


def update(module: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, config: TrainConfig,
           generator: torch.Generator) -> Tensor:
    """One training update of a ZForcing or a FusedLSTMPair, the same for both: fresh noise,
    forward, the objective, backward, clipping, Adam. Training's checks that the loss and the
    gradient are finite are left out: they wait for the device. Returns the loss."""
    targets = batch.targets
    noise = torch.randn(*targets.shape[:2], module.config.latent_size, generator=generator, device=targets.device)
    loss = objective(module(targets, batch.mask, noise=noise, first_input=batch.first_input), 1.0, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), config.clip_norm)
    optimizer.step()
    return loss
