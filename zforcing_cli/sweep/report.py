"""A sweep's report: each configuration's metric over its seeds (mean ± SD, 95% CI), and its
paired differences against the spec's reference configuration, in numbers and in words
(stats.py computes them), read from the study; and the run folders of each configuration, for
the plot of its validation curves (sweep/plot.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..stats import Difference, Summary, difference_sentence, paired_difference, summarize
from .spec import VARIANT, SweepSpec
from .worker import RUNS_ATTR


@dataclass
class Configuration:
    """A configuration's results: its seeds' metric (by seed), its state and its run folders."""

    params: dict
    values: dict[int, float]  # seed -> metric
    state: str  # complete | pruned
    trial: int
    runs: Path | None  # the folder of its seed-<s> run folders

    @property
    def summary(self) -> Summary:
        return summarize(list(self.values.values()))


def configurations(study: optuna.Study, folder: Path) -> list[Configuration]:
    """The configurations that finished (complete, or pruned with some seeds), in trial order; a
    configuration that ran twice (a race between workers) counts once, by its first trial."""
    found: dict[tuple, Configuration] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        key = tuple(sorted(trial.params.items()))
        if key in found or not trial.intermediate_values:
            continue
        runs = trial.user_attrs.get(RUNS_ATTR)
        found[key] = Configuration(dict(trial.params), {int(seed): value for seed, value in sorted(trial.intermediate_values.items())},
                                   trial.state.name.lower(), trial.number, folder / runs if runs else None)
    return list(found.values())


def describe_params(params: dict, only: list[str] | None = None) -> str:
    """'aux_weight = 0.001, lr = 0.0003' (the settings named in only, when given); a variant by
    its label ('aux_weight = 0', 'base settings')."""
    return ", ".join(str(value) if name == VARIANT else f"{name} = {value:g}" if isinstance(value, float) else f"{name} = {value}"
                     for name, value in params.items() if only is None or name in only)


def find_reference(configs: list[Configuration], reference: dict) -> Configuration | None:
    """The configuration that has the reference's values (the first, if several do)."""
    return next((config for config in configs if all(config.params.get(name) == value for name, value in reference.items())), None)


def paired(config: Configuration, reference: Configuration) -> Difference:
    seeds = sorted(set(config.values) & set(reference.values))
    return paired_difference([config.values[seed] for seed in seeds], [reference.values[seed] for seed in seeds])


def build_report(spec: SweepSpec, study: optuna.Study, folder: Path, unit: str) -> dict:
    """The report as a JSON-ready dict: configurations (params, seeds' values, summary, state)
    and, where the reference ran, differences (params, the paired statistics, a sentence)."""
    configs = configurations(study, folder)
    reference = find_reference(configs, spec.reference) if spec.reference else None
    report = {
        "sweep": spec.name, "metric": spec.metric.name, "direction": spec.metric.direction, "unit": unit,
        "seeds": spec.seeds, "reference": spec.reference, "reference_found": reference is not None,
        "configurations": [
            {"trial": config.trial, "params": config.params, "state": config.state,
             "values": {str(seed): value for seed, value in config.values.items()}, **config.summary.to_dict()}
            for config in configs
        ],
        "differences": [],
    }
    if reference is None:
        return report
    for config in configs:
        if config is reference:
            continue
        difference = paired(config, reference)
        differing = [name for name in config.params if config.params[name] != reference.params.get(name)]
        sentence = difference_sentence(describe_params(config.params, differing), spec.metric.phrase, unit.split(" per ")[0], difference)
        report["differences"].append({"trial": config.trial, "params": config.params, "against": reference.params,
                                      **difference.to_dict(), "sentence": sentence})
    return report
