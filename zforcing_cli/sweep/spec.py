"""A sweep's spec: a TOML file with a base config, a search space, the seeds, the metric and the
number of configurations, read and checked whole before anything is written.

    [base]                 # any train setting (settings.py); [space] overrides it
    data = "embedded"
    max_steps = 200
    [space]                # a list is a grid axis; a table a distribution
    aux_weight = [0.0, 0.001]
    lr = { low = 1e-4, high = 1e-2, log = true }
    [sweep]
    seeds = [0, 1, 2, 3, 4]
    trials = 2             # configurations in all, each run with every seed
    sampler = "grid"       # or "tpe"
    reference = { aux_weight = 0.0 }

A `variant` axis is a list of tables, each a set of settings that go together (a preset's
schedule against one setting changed): variant = [{}, { aux_weight = 0.0 }]. The study sees each
by its label ("base settings", "aux_weight = 0"), the runs by its settings.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..settings import SETTINGS, canonical, check_settings, check_value, read_toml, unknown_setting

TABLES = ("base", "space", "sweep")
SAMPLERS = ("grid", "tpe")
RANGE_KEYS = ("low", "high", "log", "step")
SWEEP_KEYS = ("name", "seeds", "trials", "sampler", "reference", "metric", "prune", "prune_p")
VARIANT = "variant"  # the axis whose values are tables of settings
BASE_LABEL = "base settings"  # the label of the variant that changes nothing
NOT_IN_SPACE = {"seed": "the seeds come from [sweep] seeds", "data": "a sweep trains on one dataset, set in [base]",
                "threads": "threads change how a run computes, not what it learns",
                "loops": "loops is what a run records of the loops that ran it, not a setting"}


@dataclass(frozen=True)
class Metric:
    """What a configuration is judged by, read from each run's validations (metrics.jsonl)."""

    name: str
    phrase: str  # what the report's sentences call it
    key: str  # the validation record's field
    best: bool  # the best value over the run's validations (else the last one)
    direction: str  # minimize | maximize


METRICS = {
    "valid_bound": Metric("valid_bound", "the validation bound", "nll_bound", True, "minimize"),
    "last_valid_bound": Metric("last_valid_bound", "the last validation bound", "nll_bound", False, "minimize"),
    "valid_kl": Metric("valid_kl", "the validation KL", "kl", False, "maximize"),
}


@dataclass(frozen=True)
class Axis:
    """One setting of the search space: a list of values (a grid axis), or a range."""

    name: str
    values: tuple = ()  # a grid axis
    low: float | int | None = None  # a range
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    settings: tuple = ()  # a variant axis: each value's settings (dicts), in the order of values

    @property
    def is_grid(self) -> bool:
        return bool(self.values)

    def to_dict(self) -> dict:
        if self.settings:
            return {"values": list(self.values), "settings": list(self.settings)}
        if self.is_grid:
            return {"values": list(self.values)}
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step}


@dataclass
class SweepSpec:
    name: str
    path: Path
    base: dict  # checked settings (canonical names)
    space: dict[str, Axis]
    seeds: list[int]
    trials: int
    sampler: str
    metric: Metric
    reference: dict = field(default_factory=dict)  # a configuration's values of space settings
    prune: bool = True
    prune_p: float = 0.1

    def digest(self) -> str:
        """What makes two specs the same sweep: its base, space, seeds and metric (the trial
        count may grow, the reference and the pruning change; the measurements stay valid)."""
        what = {"base": self.base, "space": {name: axis.to_dict() for name, axis in sorted(self.space.items())},
                "seeds": self.seeds, "metric": self.metric.name}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def grid(self) -> dict[str, list]:
        return {name: list(axis.values) for name, axis in self.space.items()}

    def settings_of(self, params: dict) -> dict:
        """A configuration's settings: its parameters, a variant's label replaced by its settings."""
        settings = {name: value for name, value in params.items() if name != VARIANT}
        if VARIANT in params:
            axis = self.space[VARIANT]
            settings.update(axis.settings[axis.values.index(params[VARIANT])])
        return settings

    def grid_size(self) -> int:
        return math.prod(len(axis.values) for axis in self.space.values())


def read_spec(path: Path) -> SweepSpec:
    """The spec at path, checked whole: a UsageError names the first thing wrong."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such spec file.", "Give the path of a sweep spec (TOML; docs/sweeps.md shows one).")
    tables = read_toml(path)
    for name in tables:
        if name not in TABLES:
            raise UsageError(f"{path}: unknown table [{name}].", f"A spec has the tables {', '.join(f'[{t}]' for t in TABLES)}.")
    for name in TABLES:
        if name in tables and not isinstance(tables[name], dict):
            raise UsageError(f"{path}: {name} must be a table ([{name}]), not a value.", "Write it as a [section] of key = value lines.")
    base = check_settings(tables.get("base", {}), f" in {path} [base]")
    space = read_space(tables.get("space", {}), path)
    if "seed" in base:
        raise UsageError(f"seed in {path} [base]: {NOT_IN_SPACE['seed']}.", "List them in [sweep], e.g. seeds = [0, 1, 2].")
    return read_sweep_table(tables.get("sweep", {}), path, base, space)


def read_space(table: dict, path: Path) -> dict[str, Axis]:
    where = f" in {path} [space]"
    if not table:
        raise UsageError(f"{path} has an empty search space.",
                         "Add a setting under [space]: a list of values (a grid axis) or a table { low = ..., high = ... }.")
    space = {}
    for name, value in table.items():
        if name == VARIANT:
            space[VARIANT] = read_variants(value, where)
            continue
        if name not in SETTINGS:
            raise unknown_setting(name, where)
        if name in NOT_IN_SPACE:
            raise UsageError(f"{name}{where}: {NOT_IN_SPACE[name]}.", f"Move {name} to [base]." if name != "seed" else "List them in [sweep] seeds.")
        axis = read_axis(name, value, where)
        field_name = canonical(name, axis.values[0] if axis.is_grid else axis.low)[0]
        values = tuple(canonical(name, value)[1] for value in axis.values)
        space[field_name] = Axis(field_name, values, axis.low, axis.high, axis.log, axis.step)
    check_variants(space, where)
    return space


def read_variants(value, where: str) -> Axis:
    """variant = [{...}, {...}]: each table a checked set of settings, labelled by them."""
    if not isinstance(value, list) or not value or not all(isinstance(item, dict) for item in value):
        raise UsageError(f"{VARIANT}{where} must be a list of tables of settings, not {value!r}.",
                         f"For example {VARIANT} = [{{}}, {{ aux_weight = 0.0 }}].")
    settings = tuple(check_settings(item, f" in a {VARIANT}{where}") for item in value)
    for item in settings:
        for name in item:
            if name in NOT_IN_SPACE:
                raise UsageError(f"{name} in a {VARIANT}{where}: {NOT_IN_SPACE[name]}.", f"Move {name} to [base].")
    labels = tuple(variant_label(item) for item in settings)
    if len(set(labels)) < len(labels):
        raise UsageError(f"{VARIANT}{where} lists the same settings twice.", "List each variant once.")
    return Axis(VARIANT, labels, settings=settings)


def variant_label(settings: dict) -> str:
    """'aux_weight = 0, bwd_weight = 0' (sorted), or BASE_LABEL for no settings."""
    if not settings:
        return BASE_LABEL
    return ", ".join(f"{name} = {toml_value(value)}" for name, value in sorted(settings.items()))


def toml_value(value) -> str:
    """A setting's value as the spec writes it: 0.001, true, "linear"."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, str) else str(value)


def check_variants(space: dict[str, Axis], where: str) -> None:
    """A variant may not set what another axis of the space sets: which would win is not clear."""
    if VARIANT not in space:
        return
    both = sorted({name for settings in space[VARIANT].settings for name in settings} & set(space))
    if both:
        raise UsageError(f"{both[0]}{where} is both an axis and set by a {VARIANT}.", f"Set {both[0]} in one of them.")


def read_axis(name: str, value, where: str) -> Axis:
    if isinstance(value, list):
        if not value:
            raise UsageError(f"{name}{where} is an empty list.", "Give it the values to try, e.g. [0.0, 0.001].")
        values = tuple(check_value(name, item, where) for item in value)
        if len(set(values)) < len(values):
            raise UsageError(f"{name}{where} lists a value twice.", "List each value once.")
        return Axis(name, values)
    if isinstance(value, dict):
        return read_range(name, value, where)
    raise UsageError(f"{name}{where} must be a list of values or a table {{ low, high }}, not {value!r}.",
                     f"For example {name} = [a, b] (a grid axis) or {name} = {{ low = a, high = b }}.")


def read_range(name: str, table: dict, where: str) -> Axis:
    kind = SETTINGS[name]
    if kind not in (int, float):
        raise UsageError(f"{name}{where} takes a list of values, not a range.", f"Write {name} = [a, b].")
    for key in table:
        if key not in RANGE_KEYS:
            raise UsageError(f"{name}{where}: unknown key {key!r} in its range.", f"A range has {', '.join(RANGE_KEYS)}.")
    if "low" not in table or "high" not in table:
        raise UsageError(f"{name}{where}: a range needs both low and high.", f"For example {name} = {{ low = 1e-4, high = 1e-2 }}.")
    low, high = check_value(name, table["low"], where), check_value(name, table["high"], where)
    if low > high:
        raise UsageError(f"{name}{where}: the range's low end {low:g} is above its high end {high:g}.", "Swap them.")
    log = table.get("log", False)
    if not isinstance(log, bool):
        raise UsageError(f"{name}{where}: log must be true or false, not {log!r}.", "Write log = true for a log-uniform range.")
    if log and low <= 0:
        raise UsageError(f"{name}{where}: a log range needs a low end above 0, not {low:g}.", "Raise low, or drop log = true.")
    step = table.get("step")
    if step is not None:
        step = check_value(name, step, where)
        if step <= 0 or log:
            raise UsageError(f"{name}{where}: step must be above 0, and cannot go with log = true.", "Drop step, or log.")
    return Axis(name, low=low, high=high, log=log, step=step)


def read_sweep_table(table: dict, path: Path, base: dict, space: dict[str, Axis]) -> SweepSpec:
    where = f"{path} [sweep]"
    for key in table:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(key, SWEEP_KEYS, n=1)
            raise UsageError(f"Unknown key {key!r} in {where}.",
                             (f"Did you mean {close[0]}? " if close else "") + f"[sweep] takes {', '.join(SWEEP_KEYS)}.")
    seeds = read_seeds(table.get("seeds"), where)
    grid_only = all(axis.is_grid for axis in space.values())
    sampler = table.get("sampler", "grid" if grid_only else "tpe")
    if sampler not in SAMPLERS:
        raise UsageError(f"sampler in {where} must be grid or tpe, not {sampler!r}.", 'Write sampler = "grid" or "tpe".')
    if sampler == "grid" and not grid_only:
        ranged = next(name for name, axis in space.items() if not axis.is_grid)
        raise UsageError(f"{ranged} in {path} [space] is a range, which a grid cannot take.",
                         f'List its values ({ranged} = [a, b, c]), or use sampler = "tpe".')
    metric = table.get("metric", "valid_bound")
    if metric not in METRICS:
        raise UsageError(f"metric in {where} must be one of {', '.join(METRICS)}, not {metric!r}.", 'The default is "valid_bound".')
    spec = SweepSpec(
        name=read_name(table.get("name", path.stem), where), path=path, base=base, space=space, seeds=seeds,
        trials=0, sampler=sampler, metric=METRICS[metric], prune=table.get("prune", True), prune_p=table.get("prune_p", 0.1),
    )
    spec.trials = read_trials(table.get("trials"), spec, where)
    spec.reference = read_reference(table.get("reference", {}), spec, where)
    if not isinstance(spec.prune, bool) or not (isinstance(spec.prune_p, float) and 0 < spec.prune_p < 1):
        raise UsageError(f"In {where}, prune must be true or false and prune_p a number in (0, 1).", "For example prune_p = 0.1.")
    return spec


def read_seeds(seeds, where: str) -> list[int]:
    if not seeds:
        raise UsageError(f"No seeds in {where}.", "List the seeds every configuration runs with, e.g. seeds = [0, 1, 2, 3, 4].")
    if not isinstance(seeds, list) or not all(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 for seed in seeds):
        raise UsageError(f"seeds in {where} must be a list of whole numbers, 0 or more, not {seeds!r}.", "For example seeds = [0, 1, 2].")
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"seeds in {where} lists a seed twice.", "List each seed once.")
    return seeds


def read_name(name, where: str) -> str:
    if not isinstance(name, str) or not name or any(char in name for char in '/\\\0') or name.startswith("."):
        raise UsageError(f"name in {where} must be a plain name, not {name!r}.", 'For example name = "aux-weight".')
    return name


def read_trials(trials, spec: SweepSpec, where: str) -> int:
    if trials is None:
        if spec.sampler == "grid":
            return spec.grid_size()
        raise UsageError(f"{where} has no trials: TPE needs to know how many configurations to try.", "For example trials = 20.")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise UsageError(f"trials in {where} must be a whole number, 1 or more, not {trials!r}.", "For example trials = 20.")
    return min(trials, spec.grid_size()) if spec.sampler == "grid" else trials


def read_reference(table, spec: SweepSpec, where: str) -> dict:
    """The configuration the report's paired differences compare against: values of settings of
    the search space (each on its grid axis or in its range)."""
    if not isinstance(table, dict):
        raise UsageError(f"reference in {where} must be a table, not {table!r}.", "For example reference = { aux_weight = 0.0 }.")
    reference = {}
    if VARIANT in table:
        table = dict(table)
        reference[VARIANT] = read_reference_variant(table.pop(VARIANT), spec, where)
    for name, value in check_settings(table, f" in {where} reference").items():
        axis = spec.space.get(name)
        if axis is None:
            raise UsageError(f"reference in {where} sets {name}, which is not in [space].",
                             f"Name settings of the search space: {', '.join(spec.space)}.")
        outside = value not in axis.values if axis.is_grid else not axis.low <= value <= axis.high
        if outside:
            raise UsageError(f"reference in {where}: {name} = {value!r} is not in the search space.",
                             f"Choose a value of [space] {name}.")
        reference[name] = value
    return reference


def read_reference_variant(value, spec: SweepSpec, where: str) -> str:
    """The reference's variant, given as its table of settings (or its label): the label."""
    axis = spec.space.get(VARIANT)
    if axis is None:
        raise UsageError(f"reference in {where} sets {VARIANT}, which is not in [space].",
                         f"Name settings of the search space: {', '.join(spec.space)}.")
    label = variant_label(check_settings(value, f" in {where} reference")) if isinstance(value, dict) else value
    if label not in axis.values:
        raise UsageError(f"reference in {where}: {VARIANT} {value!r} is not one of [space] {VARIANT}.",
                         f"Copy one of its tables, e.g. {VARIANT} = {{ {axis.values[-1]} }}." if axis.values[-1] != BASE_LABEL
                         else f"Copy one of its tables, e.g. {VARIANT} = {{}}.")
    return label
