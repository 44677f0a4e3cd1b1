"""The speed benchmark (bench/speed.py) through `zforcing bench`: every preset at the tiny size,
resized models, the table. Nothing here judges a speed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import invoke, plain

SPEED_KEYS = (
    "update_ms_fused", "update_ms_reference", "update_ms_fused_lstm_pair", "ratio_vs_fused_lstm_pair",
    "ratio_reference_vs_fused", "train_sequences_per_s", "sample_sequences_per_s", "batch_fetch_ms", "peak_memory_bytes",
)
SHAPES = {"mnist": (784, 2), "timit": (40, 200), "blizzard": (40, 200), "imdb": (16, 16004)}  # steps, input size


def bench_json(*args) -> dict:
    result = invoke("bench", *args, "--json")
    assert result.exit_code == 0, plain(result.output)
    return json.loads(result.stdout)


@pytest.mark.parametrize("preset", ["mnist", "timit", "blizzard", "imdb"])
def test_every_preset_runs_at_the_tiny_size(preset, tmp_path):
    result = bench_json("--preset", preset, "--size", "tiny", "--updates", "1", "--device", "cpu", "--dir", tmp_path)
    assert (result["preset"], result["size"], result["device"], result["status"]) == (preset, "tiny", "cpu", "ok")
    assert (result["steps"], result["input_size"]) == SHAPES[preset]
    for key in SPEED_KEYS:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["ratio_vs_fused_lstm_pair"] == pytest.approx(result["update_ms_fused"] / result["update_ms_fused_lstm_pair"])
    assert result["ratio_reference_vs_fused"] == pytest.approx(result["update_ms_reference"] / result["update_ms_fused"])
    assert (result["sample_x_real_time"] is not None) == (preset in ("timit", "blizzard"))
    assert result["machine"]["threads"] == torch.get_num_threads() and result["machine"]["cores"] >= 1
    assert list(tmp_path.iterdir()) == []  # the temporary dataset is gone


def test_widths_and_batch_can_replace_the_sizes(tmp_path):
    common = ("--size", "tiny", "--updates", "1", "--device", "cpu", "--dir", tmp_path)
    tiny = bench_json(*common)
    resized = bench_json(*common, "--hidden-size", "20", "--mlp-size", "18", "--batch-size", "3")
    assert (resized["hidden_size"], resized["mlp_size"], resized["batch_size"]) == (20, 18, 3)
    assert (tiny["hidden_size"], tiny["mlp_size"]) != (20, 18) and tiny["batch_size"] != 3
    assert resized["parameters"] > tiny["parameters"] and resized["fused_lstm_pair_parameters"] > tiny["fused_lstm_pair_parameters"]
    only_batch = bench_json(*common, "--batch-size", "5")
    assert (only_batch["hidden_size"], only_batch["mlp_size"], only_batch["batch_size"]) == (tiny["hidden_size"], tiny["mlp_size"], 5)


def test_the_table_puts_the_three_updates_side_by_side(tmp_path):
    result = invoke("bench", "--preset", "timit", "--size", "tiny", "--updates", "1", "--device", "cpu", "--dir", tmp_path)
    assert result.exit_code == 0, plain(result.output)
    text = plain(result.stdout)
    for row in ("fused recurrence", "autograd reference", "fused LSTM pair", "× real time", "memory-mapped", "peak memory"):
        assert row in text, row
    assert "the fused update's recurrence" in text


def test_the_bench_says_which_loops_ran_and_why_python(tmp_path, monkeypatch):
    common = ("--size", "tiny", "--updates", "1", "--device", "cpu", "--dir", tmp_path)
    compiled = bench_json(*common)["loops"]
    assert compiled == "compiled loops" or compiled.startswith("Python loops (no C++ compiler")
    monkeypatch.setenv("ZFORCING_COMPILED_LOOPS", "0")
    assert bench_json(*common)["loops"] == "Python loops (ZFORCING_COMPILED_LOOPS=0)"
