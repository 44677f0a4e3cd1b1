"""Settings by name: the one place where a flat table of settings, named as `zforcing train`'s
options with underscores (`max_steps`, `aux_weight`, `hidden_size`, ...), becomes the
(ZForcingConfig, TrainConfig) a run trains with.

Precedence: the settings given > the preset's > the data kind's defaults (presets.py). Every
field of TrainConfig and of ZForcingConfig is a setting, except those the data fixes (modality,
input_size, start_index); so are `data`, `preset` and `threads`, which say what a run trains on
and how the process runs, and the train options' own names `dropout` (= embed_dropout) and
`aux_condition` (`z` or `hz`, = aux_on_hidden). A sweep's spec (sweep/spec.py) and a TOML file
of settings (`read_settings_file`) are checked here, so that an unknown name or a wrong type is
one error naming it, whoever wrote it.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError, file_system_error
from .humanize import plural
from .modelconfig import ZForcingConfig
from .presets import PRESETS, preset_configs
from .runconfig import PRECISION_NAMES, TrainConfig, latent_free_training

if TYPE_CHECKING:  # the data types bring torch; `zforcing train --config` reads a file before torch loads
    from .data import DatasetMeta

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML through tomli (a dependency there)
    import tomli as tomllib

FIXED_BY_DATA = ("modality", "input_size", "start_index")
# not config fields: what and how a run trains; loops (which loops ran the recurrence) is a
# record a replayed config.json carries, so that a replay on other loops says its numbers may differ
RUN_SETTINGS = {"data": str, "preset": str, "threads": int, "loops": str}
ALIASES = {"dropout": "embed_dropout"}  # the train option's name -> the config field it sets
AUX_CONDITIONS = {"z": False, "hz": True}  # aux_condition -> aux_on_hidden

# Ranges, by setting. Every float must also be finite.
POSITIVE = {"epochs", "max_steps", "batch_size", "eval_batch_size", "embed_size", "hidden_size", "latent_size",
            "mlp_size", "log_every", "keep_checkpoints", "max_consecutive_skips", "threads", "lr", "adam_eps",
            "clip_norm", "latent_clamp"}
NON_NEGATIVE = {"seed", "valid_limit", "checkpoint_every", "checkpoint_minutes", "weight_decay", "aux_weight", "aux_start",
                "aux_increment", "bwd_weight", "kl_increment", "lr_patience"}
FRACTIONS = {"embed_dropout": (0.0, 1.0), "adam_beta2": (0.0, 1.0)}  # low <= value < high
UNIT_INTERVAL = {"kl_start", "lr_decay"}  # 0 <= value <= 1
CHOICES = {"precision": PRECISION_NAMES, "preset": PRESETS, "aux_condition": tuple(AUX_CONDITIONS)}


def config_fields(config_class: type, skip: tuple[str, ...] = ()) -> dict[str, type]:
    """A config dataclass's settings and their types (int | None counts as int)."""
    hints = typing.get_type_hints(config_class)
    types = {}
    for field in fields(config_class):
        if field.name in skip:
            continue
        kinds = [kind for kind in typing.get_args(hints[field.name]) if kind is not type(None)] or [hints[field.name]]
        types[field.name] = kinds[0]
    return types


MODEL_SETTINGS = config_fields(ZForcingConfig, FIXED_BY_DATA)
TRAIN_SETTINGS = config_fields(TrainConfig)
SETTINGS: dict[str, type] = {**RUN_SETTINGS, **MODEL_SETTINGS, **TRAIN_SETTINGS, "dropout": float, "aux_condition": str}


def unknown_setting(name: str, where: str = "") -> UsageError:
    """The error for a name that is no setting, with the closest names as a hint."""
    close = difflib.get_close_matches(name, SETTINGS, n=3, cutoff=0.6)
    choices = ", ".join(close[:-1]) + " or " + close[-1] if len(close) > 1 else "".join(close)
    hint = f"Did you mean {choices}? " if close else ""
    return UsageError(f"Unknown setting {name!r}{where}.",
                      hint + "Settings are named as `zforcing train`'s options, with underscores (docs/sweeps.md lists them).")


def check_value(name: str, value, where: str = ""):
    """The value as the setting takes it (an integer where a float is expected becomes a float);
    a UsageError naming the setting when its type or range is wrong."""
    kind = SETTINGS[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        example = {bool: "true or false", int: "a whole number such as 32", float: "a number such as 0.001",
                   str: 'a string in quotes such as "small"'}[kind]
        raise UsageError(f"{name}{where} must be {kind.__name__}, not {value!r}.", f"Write {example}.")
    check_range(name, value, where)
    return value


def check_range(name: str, value, where: str) -> None:
    field_name, problem = ALIASES.get(name, name), None
    if isinstance(value, float) and not math.isfinite(value):
        problem = "a finite number"
    elif name in POSITIVE and value <= 0:
        problem = "above 0"
    elif name in NON_NEGATIVE and value < 0:
        problem = "0 or more"
    elif field_name in FRACTIONS and not FRACTIONS[field_name][0] <= value < FRACTIONS[field_name][1]:
        problem = f"in [{FRACTIONS[field_name][0]:g}, {FRACTIONS[field_name][1]:g})"
    elif name in UNIT_INTERVAL and not 0.0 <= value <= 1.0:
        problem = "in [0, 1]"
    elif name in CHOICES and value not in CHOICES[name]:
        problem = "one of " + ", ".join(CHOICES[name])
    if problem is not None:
        raise UsageError(f"{name}{where} must be {problem}, not {value!r}.", f"Give {name} a value {problem}.")


def canonical(name: str, value):
    """(the config field's name, its value) for a setting given under a train option's name."""
    if name == "aux_condition":
        return "aux_on_hidden", AUX_CONDITIONS[value]
    return ALIASES.get(name, name), value


def check_settings(values: dict, where: str = "") -> dict:
    """Settings by their canonical names (dropout -> embed_dropout, aux_condition ->
    aux_on_hidden), each checked; `where` (" in FILE [base]") tells the errors where to look."""
    checked = {}
    for name, value in values.items():
        if name not in SETTINGS:
            raise unknown_setting(name, where)
        name, value = canonical(name, check_value(name, value, where))
        if name in checked:
            raise UsageError(f"{name}{where} is given twice, under two names.", "Keep one of them.")
        checked[name] = value
    return checked


def read_settings_file(path: Path) -> dict:
    """A TOML file of settings (key = value lines, no tables), or a run's config.json (the
    settings that train the run again: run_settings), checked."""
    if Path(path).suffix == ".json":
        return check_settings(run_settings(read_run_config(path)), f" in {path}")
    tables = read_toml(path)
    nested = [name for name, value in tables.items() if isinstance(value, dict)]
    if nested:
        raise UsageError(f"{path}: [{nested[0]}] is a table; a settings file holds key = value lines only.",
                         "Write the settings at the top of the file, without a [section] header.")
    return check_settings(tables, f" in {path}")


def run_settings(config: dict) -> dict:
    """The settings that train a run again, from its config.json (RunConfig.to_dict()): its
    model's and training's fields, its data's location, its preset and its thread count; the
    fields the data fixes and those the run left unset (null) are left out."""
    model = {name: value for name, value in config["model"].items() if name not in FIXED_BY_DATA}
    values = {**model, **config["train"], "data": (config.get("data") or {}).get("location"),
              "preset": config.get("preset"), "threads": config.get("threads"), "loops": config.get("loops")}
    return {name: value for name, value in values.items() if value is not None and value != ""}


def read_run_config(path: Path) -> dict:
    """A run's config.json, as a dict with its model and train tables."""
    try:
        config = json.loads(read_text(path, "a run's config.json"))
    except ValueError as error:
        raise UsageError(f"{path} is not valid JSON ({error}).", "Give a run's config.json, as `zforcing train` writes it.") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not isinstance(config.get("train"), dict):
        raise UsageError(f"{path} is not a run's config.json: it has no model and train settings.",
                         "Give the config.json of a run folder, or a TOML file of settings.")
    return config


def read_text(path: Path, what: str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist.", f"Check the path: it should name {what}.") from None
    except OSError as error:
        raise file_system_error(error) from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a text file.", f"Give {what}.") from None


def read_toml(path: Path) -> dict:
    text = read_text(path, "a TOML file of settings")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{path} is not valid TOML: {error}.", "Check the line it names (https://toml.io).") from None


@dataclass
class ResolvedSettings:
    """What a run trains with, and what to tell about how the settings were taken."""

    model: ZForcingConfig
    train: TrainConfig
    preset: str
    notes: list[str]


def resolve(settings: dict, meta: DatasetMeta, train_size: int) -> ResolvedSettings:
    """The configs of a run on data described by meta (train_size training sequences), from
    checked settings (check_settings): the preset's for this data, with the settings on top.

    As `zforcing train` takes its options: aux_weight alone makes α constant; cond_ln alone takes
    the one LSTM bias it has, whatever the preset's; and the batch and the run's length as
    fit_to_split says."""
    preset = settings.get("preset", "small")
    model, training = preset_configs(preset, meta)
    if settings.get("cond_ln") and "lstm_biases" not in settings:
        settings = {**settings, "lstm_biases": "one"}  # its gates take the layer norms' biases
    try:  # the configs refuse settings that contradict each other (cond_ln with two biases, ...)
        model = replace(model, **{name: value for name, value in settings.items() if name in MODEL_SETTINGS})
        if "aux_weight" in settings and "aux_start" not in settings:
            training = replace(training, aux_start=None)  # a constant α (the paper's form)
        training = replace(training, **{name: value for name, value in settings.items() if name in TRAIN_SETTINGS})
    except ValueError as error:
        raise UsageError(f"These settings contradict each other: {error}.",
                         "docs/protocols.md (\"Departures\") says which options go together.") from None
    if not model.latent:
        training = latent_free_training(training, settings)
    training, notes = fit_to_split(training, settings, train_size)
    return ResolvedSettings(model, training, preset, notes)


def fit_to_split(training: TrainConfig, settings: dict, train_size: int) -> tuple[TrainConfig, list[str]]:
    """The training config (with the settings applied) fitted to a training split of train_size
    sequences, and notes saying what was taken otherwise than given. A batch larger than the
    split takes the whole split, and the run records that batch; epochs alone lifts the update
    limit; max_steps alone takes as many epochs as it needs; both: the shorter wins."""
    notes = []
    if training.batch_size > train_size:
        notes.append(f"a batch of {training.batch_size:,} is more than the {plural(train_size, 'training sequence')}: each update "
                     f"takes all of them, and the run records a batch of {train_size:,}.")
        training = replace(training, batch_size=train_size)
    batches = math.ceil(train_size / training.batch_size)
    epochs, max_steps = settings.get("epochs"), settings.get("max_steps")
    if epochs is not None and max_steps is None:
        training = replace(training, max_steps=None)
    elif max_steps is not None and epochs is None:
        training = replace(training, epochs=max(training.epochs, math.ceil(max_steps / batches)))
    elif epochs is not None and epochs * batches < max_steps:
        notes.append(f"--epochs {epochs} ends the run after {plural(epochs * batches, 'update')}, before --max-steps {max_steps:,}.")
    return training, notes
