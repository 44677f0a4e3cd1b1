"""The sweep report's picture: curves with a band over seeds, or, when every run validated once,
each configuration's seeds and mean ± SD side by side (sweep/plot.py)."""

import json

import numpy as np
import pytest

from zforcing_cli.sweep.plot import band, curves_figure, seed_curves, write_sweep_curves
from zforcing_cli.sweep.report import Configuration

KEY = "nll_bound"


def configuration(folder, trial, params, runs):
    """A configuration whose seed-<s> run folders hold the given {step: value} validations."""
    for seed, validations in runs.items():
        run = folder / f"seed-{seed}"
        run.mkdir(parents=True)
        lines = [{"type": "train", "step": 1, "loss": 9.0}] + [{"type": "valid", "step": step, KEY: value} for step, value in validations.items()]
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    values = {seed: min(validations.values()) for seed, validations in runs.items()}
    return Configuration(params=params, values=values, state="complete", trial=trial, runs=folder)


def test_band_is_the_mean_and_sample_sd_at_the_validations_every_seed_made():
    steps, mean, spread = band({0: {10: 1.0, 20: 4.0}, 1: {10: 3.0, 20: 8.0, 30: 1.0}})
    assert steps.tolist() == [10, 20]
    assert mean.tolist() == [2.0, 6.0]
    assert spread == pytest.approx([np.sqrt(2.0), np.sqrt(8.0)])


def test_several_validations_draw_one_curve_per_configuration_over_updates(tmp_path):
    configs = [configuration(tmp_path / "a", 0, {"aux_weight": 0.0}, {0: {10: 5.0, 20: 4.0}, 1: {10: 7.0, 20: 6.0}}),
               configuration(tmp_path / "b", 1, {"aux_weight": 0.001}, {0: {10: 6.0, 20: 5.5}, 1: {10: 6.0, 20: 4.5}})]
    axes = curves_figure(configs, [seed_curves(config, KEY) for config in configs], "bound", ["aux_weight"]).axes[0]
    lines = [line for line in axes.get_lines() if line.get_label() and not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["aux_weight = 0 (2 seeds)", "aux_weight = 0.001 (2 seeds)"]
    assert lines[0].get_xdata().tolist() == [10, 20] and lines[0].get_ydata().tolist() == [6.0, 5.0]
    assert axes.get_xlabel() == "updates"


def test_one_validation_each_draws_the_configurations_side_by_side(tmp_path):
    configs = [configuration(tmp_path / "a", 0, {"variant": "aux_weight = 0, bwd_weight = 0"}, {0: {1000: 110.0}, 1: {1000: 108.0}, 2: {1000: 106.0}}),
               configuration(tmp_path / "b", 1, {"variant": "base settings"}, {0: {1000: 109.0}, 1: {1000: 109.5}})]
    axes = curves_figure(configs, [seed_curves(config, KEY) for config in configs], "bound", ["variant"]).axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["aux_weight = 0,\nbwd_weight = 0 (3 seeds)", "base settings (2 seeds)"]
    assert "after 1,000 updates" in axes.get_title()
    dots = [line for line in axes.get_lines() if line.get_linestyle() == "None" and line.get_marker() == "o"]
    assert sorted(dots[0].get_ydata().tolist()) == [106.0, 108.0, 110.0]  # every seed is shown
    means = [line for line in axes.get_lines() if line.get_marker() == "s"]
    assert [line.get_ydata()[0] for line in means] == [108.0, 109.25]
    assert means[0].get_xdata()[0] < 1 < means[1].get_xdata()[0]  # one column each, not stacked at one update


def test_no_run_folders_here_write_no_picture(tmp_path):
    config = Configuration(params={"aux_weight": 0.0}, values={0: 1.0}, state="complete", trial=0, runs=None)
    assert write_sweep_curves([config], KEY, "bound", tmp_path / "curves") == []
    assert not list(tmp_path.iterdir())
