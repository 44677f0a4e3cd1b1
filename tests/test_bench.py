"""The benchmark reports the model it timed and positive rates."""

import pytest

from zforcing_cli.bench import run
from zforcing_cli.data import open_dataset
from zforcing_cli.model import ZForcing, count_parameters
from zforcing_cli.presets import preset_configs


def test_bench_reports_the_small_preset_it_timed():
    result = run("cpu", "small", updates=1, batch_size=2)
    model_config, _ = preset_configs("small", open_dataset("embedded").meta)
    assert result["parameters"] == count_parameters(ZForcing(model_config))
    assert result["batch_size"] == 2 and result["device"] == "cpu"
    assert result["train_updates_per_s"] * result["train_ms_per_update"] / 1000 == pytest.approx(1.0)
    for key in ("batch_fetch_us", "train_sequences_per_s", "eval_sequences_per_s", "sample_sequences_per_s"):
        assert result[key] > 0, key
