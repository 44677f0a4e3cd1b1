"""sweep/worker.py's rules without training (train() replaced by seeded numbers): pruning only
across seeds, and a configuration that cannot train counted as done while the sweep goes on."""

from __future__ import annotations

import pytest
import torch
from optuna.trial import TrialState

from sweep_helpers import write_spec  # noqa: F401 - a fixture

from zforcing_cli.data import open_dataset
from zforcing_cli.errors import TrainingError
from zforcing_cli.sweep import SweepWorker, open_study, read_spec
from zforcing_cli.sweep import worker as worker_module

SEEDS = "seeds = [0, 1, 2, 3, 4, 5]"


def run_sweep(spec_path, tmp_path, tiny_data):
    spec = read_spec(spec_path)
    study = open_study(spec, tmp_path / "sweep", None)
    counts = SweepWorker(spec, study, tmp_path / "sweep", open_dataset(tiny_data), torch.device("cpu")).run()
    return counts, study.get_trials()


def test_a_configuration_worse_on_every_seed_is_pruned_once_four_seeds_say_so(write_spec, tmp_path, tiny_data, monkeypatch):
    # the first trial is the best so far; the second is worse by 10 on every seed
    monkeypatch.setattr(SweepWorker, "train_seed", lambda self, trial, settings, seed: 10.0 * (1 + trial.number) + seed)
    counts, (first, second) = run_sweep(write_spec(sweep=SEEDS), tmp_path, tiny_data)
    assert first.state == TrialState.COMPLETE and len(first.intermediate_values) == 6
    # 3 seeds all one way leave a one-sided p of 1/8 (over 0.1); 4 seeds give 1/16
    assert second.state == TrialState.PRUNED and sorted(second.intermediate_values) == [0, 1, 2, 3]
    assert (counts.complete, counts.pruned, counts.done) == (1, 1, 2)


def test_a_configuration_that_differs_by_seed_noise_is_never_pruned(write_spec, tmp_path, tiny_data, monkeypatch):
    noise = [1.0, -1.0, 1.5, -1.5, 0.5, -0.5]  # worse on some seeds, better on others
    monkeypatch.setattr(SweepWorker, "train_seed", lambda self, trial, settings, seed: 10.0 + seed + trial.number * noise[seed])
    counts, trials = run_sweep(write_spec(sweep=SEEDS), tmp_path, tiny_data)
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * 2 and counts.pruned == 0


def test_a_configuration_that_cannot_train_fails_and_the_sweep_goes_on(write_spec, tmp_path, tiny_data, monkeypatch):
    def diverging_train(run_dir, run_config, *args, **kwargs):
        if run_config.train.aux_weight > 0:
            raise TrainingError("Training diverged: 20 non-finite updates in a row.", "Lower the lr.")
        return original(run_dir, run_config, *args, **kwargs)

    original = worker_module.train
    monkeypatch.setattr(worker_module, "train", diverging_train)
    counts, trials = run_sweep(write_spec(sweep="seeds = [0]"), tmp_path, tiny_data)
    by_alpha = {trial.params["aux_weight"]: trial for trial in trials}
    assert by_alpha[0.001].state == TrialState.FAIL
    assert by_alpha[0.001].user_attrs["error"] == "seed 0: Training diverged: 20 non-finite updates in a row."
    assert by_alpha[0.0].state == TrialState.COMPLETE
    assert (counts.failed, counts.complete, counts.done, len(trials)) == (1, 1, 2, 2)  # counted, not repeated
