"""What a run records about itself, in its folder: its configuration (config.json: a RunConfig,
the model's and the training's configs and data_description()) and, in each checkpoint, the
trainer's state (trainer_state.json: a TrainerState). Both are file formats: their field names
stay as they are."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import CONFIG_FILE, read_config
from .errors import TrainingError, UsageError
from .modelconfig import ZForcingConfig

if TYPE_CHECKING:
    from .data import PreparedDataset


@dataclass
class TrainConfig:
    """How a run trains: its length, Adam, the weights of Eq. 10 and their schedules, validation,
    checkpoints and precision."""

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
    kl_anneal_on_skip: str = "freeze"  # freeze: w_kl counts the updates taken; advance: skipped ones too (authors)
    skip_rule: str = "loss-and-grad"  # skip an update whose loss or gradient norm is not finite; "loss": the loss only (authors)
    skip_kl_above: float | None = None  # also skip an update whose KL per sequence reaches this (authors' Blizzard: 10,000)
    clip_norm: float = 100.0
    seed: int = 0
    eval_batch_size: int = 500
    valid_limit: int = 0  # validate on the first N valid sequences (0: all)
    # Validations at an epoch's end without a better bound before the lr is halved: a bound
    # measured on a few thousand sequences moves by noise, and one worse figure is no plateau
    # (a run recorded its patience: one written when the default was 1 resumes with 1).
    lr_patience: int = 3
    lr_decay: float = 0.5
    max_consecutive_skips: int = 20  # non-finite steps in a row before giving up
    checkpoint_every: int = 0  # also checkpoint every N updates (0: at the end of each epoch)
    checkpoint_minutes: float = 10.0  # and when this long has passed since the last one (0: never)
    keep_checkpoints: int = 2
    log_every: int = 10
    precision: str = "fp32"  # fp32 | tf32 | bf16 | fp16: the arithmetic of the forward pass (device.autocast_dtype)


# The TrainConfig fields of the terms a model without latent lacks (the KL, the auxiliary and the
# backward costs), at their values that leave them out.
LATENT_TERMS = {"kl_anneal": False, "aux_weight": 0.0, "aux_start": None, "bwd_weight": 0.0}


def latent_free_training(config: TrainConfig, given: dict) -> TrainConfig:
    """How a model without latent (ZForcingConfig.latent False) trains: on its NLL alone, with
    LATENT_TERMS set; given (settings by name, None where not given) may repeat those values,
    and any other is a UsageError: a weight of a term the model has not would mean nothing."""
    for name, off in LATENT_TERMS.items():
        value = given.get(name)
        if value is not None and value != off:
            option = "--" + name.replace("_", "-")
            raise UsageError(f"{option} {'' if isinstance(value, bool) else value}".rstrip() + " weighs a term that a model "
                             "without latent (--no-latent) has not: it has no KL, auxiliary or backward cost, and trains on its NLL alone.",
                             f"Drop {option}, or drop --no-latent.")
    return replace(config, **LATENT_TERMS)


KL_ANNEAL_ON_SKIP = ("freeze", "advance")  # each field's first choice is what runs written before it did
SKIP_RULES = ("loss-and-grad", "loss")
PRECISION_NAMES = ("fp32", "tf32", "bf16", "fp16")  # --precision's choices (device.py maps them to dtypes)


@dataclass
class RunConfig:
    """A run's config.json (and every checkpoint's): what was trained, on what, and how."""

    model: ZForcingConfig
    train: TrainConfig
    data: dict  # data_description(): location, kind, protocol, counts, fingerprint, ...
    preset: str = ""  # the preset the sizes came from ("" in runs written by 0.1.0)
    # The CPU threads torch ran the run on, fixed for the run: another count may sum in another
    # order. None: not decided yet (train() records torch's count then), or a run written before
    # runs recorded it.
    threads: int | None = None
    # Which loops ran the recurrence ("compiled loops", "Python loops", ...: the start line's words
    # without the why): the compiled and the Python loops round differently. None: not decided yet
    # (train() records them), or a run written before runs recorded them.
    loops: str | None = None

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": asdict(self.train), "data": self.data, "preset": self.preset,
                "threads": self.threads, "loops": self.loops}

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        return cls(ZForcingConfig.from_dict(values["model"]), TrainConfig(**values["train"]), values["data"],
                   values.get("preset", ""), values.get("threads"), values.get("loops"))


@dataclass
class TrainerState:
    """Where a run's training stands: a training checkpoint's trainer_state.json."""

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

    @classmethod
    def from_dict(cls, values: dict) -> "TrainerState":
        """A saved state; one written by 0.1.0, which saved after validating, has no validated_step."""
        return cls(**{"validated_step": values["step"], **values})


def planned_updates(config: TrainConfig, train_size: int) -> int:
    """Updates a run takes: its epochs, or fewer when max_steps is set."""
    total = config.epochs * math.ceil(train_size / config.batch_size)
    return min(total, config.max_steps) if config.max_steps is not None else total


def load_run_config(run_dir: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(read_config(run_dir))
    except (KeyError, TypeError) as error:
        raise TrainingError(f"{run_dir / CONFIG_FILE} is not a zforcing run config ({error}).",
                            "Pass a run folder written by `zforcing train`.") from None


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


def audio_format_differences(recorded: dict, dataset: PreparedDataset) -> list[str]:
    """How a dataset's audio framing differs from the one a model was trained on (its sample
    rate and frame size): a model reads nothing meaningful from other frames. Empty when they
    agree, or for data that is not audio."""
    model_audio, data_audio = recorded.get("audio") or {}, dataset.meta.audio or {}
    if not model_audio or not data_audio:
        return []
    return [
        f"{name} {data_audio[key]:,} {unit} instead of the model's {model_audio[key]:,} {unit}"
        for key, name, unit in (("sample_rate", "sample rate", "Hz"), ("frame_size", "frame size", "samples"))
        if data_audio.get(key) != model_audio.get(key)
    ]
