"""The report's picture: each configuration's validation curve (the mean over its seeds at each
validation) with a band of ± one standard deviation over the seeds, drawn as plots.py draws
(Agg, no pyplot), as PNG and SVG. When no configuration validated more than once (a run that
validates only at its end), there are no curves to draw, and the picture is each configuration's
value side by side instead: every seed as a dot, the mean with a bar of ± one SD."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import write_bytes
from ..humanize import plural
from ..plots import CURVE_FORMATS, figure_bytes, metric_points, new_figure, read_metrics
from ..runfolder import METRICS_FILE
from .report import Configuration, describe_params

CURVES_STEM = "curves"  # <sweep>/curves.png and .svg


def seed_curves(config: Configuration, key: str) -> dict[int, dict[int, float]]:
    """{seed: {update: validation value}} of a configuration's run folders that are here."""
    curves = {}
    for seed in config.values:
        records = read_metrics(config.runs / f"seed-{seed}" / METRICS_FILE) if config.runs else []
        steps, values = metric_points(records, "valid", key)
        if steps:
            curves[seed] = dict(zip(steps, values))
    return curves


def band(curves: dict[int, dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(updates, mean, SD) at the validations every seed made (SD 0 with one seed)."""
    steps = sorted(set.intersection(*(set(curve) for curve in curves.values())))
    values = np.array([[curve[step] for step in steps] for curve in curves.values()])  # (seeds, validations)
    spread = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
    return np.array(steps), values.mean(axis=0), spread


def curves_figure(configs: list[Configuration], all_curves: list[dict[int, dict[int, float]]], ylabel: str, varying: list[str]):
    """all_curves: each configuration's seed_curves."""
    if max((len(curve) for curves in all_curves for curve in curves.values()), default=0) <= 1:
        return final_values_figure(configs, all_curves, ylabel, varying)
    figure = new_figure(9, 5.5)
    axes = figure.subplots()
    for index, (config, curves) in enumerate(zip(configs, all_curves)):
        if not curves:
            continue
        colour = f"C{index % 10}"
        steps, mean, spread = band(curves)
        axes.plot(steps, mean, "-o", color=colour, markersize=3, linewidth=1.4, label=config_label(config, curves, varying))
        axes.fill_between(steps, mean - spread, mean + spread, color=colour, alpha=0.2, linewidth=0)
        axes.errorbar(steps, mean, yerr=spread, fmt="none", ecolor=colour, alpha=0.6, capsize=3)
    axes.set(xlabel="updates", ylabel=ylabel, title="validation curves: mean over seeds, band ± 1 SD")
    axes.grid(True, alpha=0.3)
    if axes.has_data():
        axes.legend(loc="best", fontsize=8)
    return figure


def final_values_figure(configs: list[Configuration], all_curves: list[dict[int, dict[int, float]]], ylabel: str, varying: list[str]):
    """One column per configuration that has a validation: its seeds as dots, mean ± SD as a bar."""
    figure = new_figure(9, 5.5)
    axes = figure.subplots()
    columns = [(index, config, curves) for index, (config, curves) in enumerate(zip(configs, all_curves)) if curves]
    for column, (index, config, curves) in enumerate(columns):
        colour = f"C{index % 10}"
        values = np.array([value for curve in curves.values() for value in curve.values()])
        spread = values.std(ddof=1) if len(values) > 1 else 0.0
        axes.plot(np.full(len(values), column - 0.12), values, "o", color=colour, alpha=0.5, markersize=4)
        axes.errorbar([column + 0.12], [values.mean()], yerr=[spread], fmt="s", color=colour, capsize=5, markersize=6)
    steps = sorted({step for _, _, curves in columns for curve in curves.values() for step in curve})
    at = f" after {', '.join(f'{step:,}' for step in steps)} updates" if steps else ""
    axes.set_xticks(range(len(columns)), [config_label(config, curves, varying).replace(", ", ",\n") for _, config, curves in columns], fontsize=8)
    axes.set(ylabel=ylabel, xlim=(-0.6, len(columns) - 0.4),
             title=f"the one validation{at}: seeds as dots, mean ± 1 SD")
    axes.grid(True, axis="y", alpha=0.3)
    return figure


def config_label(config: Configuration, curves: dict[int, dict[int, float]], varying: list[str]) -> str:
    return f"{describe_params(config.params, varying)} ({plural(len(curves), 'seed')})"


def write_sweep_curves(configs: list[Configuration], key: str, ylabel: str, out_stem: Path) -> list[Path]:
    """out_stem.png and .svg; returns their paths (none when no run folder of the sweep is here)."""
    varying = [name for name in configs[0].params if len({repr(config.params.get(name)) for config in configs}) > 1] if configs else []
    all_curves = [seed_curves(config, key) for config in configs]  # each run's metrics.jsonl, read once
    if not any(all_curves):
        return []
    figure = curves_figure(configs, all_curves, ylabel, varying or None)
    paths = [Path(f"{out_stem}.{fmt}") for fmt in CURVE_FORMATS]
    for path, fmt in zip(paths, CURVE_FORMATS):
        write_bytes(path, figure_bytes(figure, fmt))
    return paths
