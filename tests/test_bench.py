"""`zforcing bench`: every preset at the tiny size, the fused LSTM pair it measures against, the
memory benchmark on a small sparse dataset, and its errors. Nothing here judges a speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from conftest import assert_clean_error, invoke, plain

from zforcing_cli import membench
from zforcing_cli.bench import (
    DEFAULT_SIZES,
    FusedLSTMPair,
    bench_configs,
    bench_dataset,
    update,
)
from zforcing_cli.data import Batch
from zforcing_cli.model import ZForcingConfig
from zforcing_cli.train import TrainConfig, make_optimizer, objective

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


def test_presets_measure_the_papers_shapes(tmp_path):
    sizes = {}
    for preset in DEFAULT_SIZES:
        model, train = bench_configs(DEFAULT_SIZES[preset], bench_dataset(preset, tmp_path).meta)
        sizes[preset] = (model.modality, model.input_size, model.embed_size, model.hidden_size, model.latent_size,
                         model.mlp_size, train.batch_size)
        assert train.aux_weight > 0 and train.bwd_weight > 0  # every head trains
    assert sizes == {
        "mnist": ("binary", 2, 16, 64, 16, 64, 32),  # the small preset
        "timit": ("frames", 200, 512, 1024, 256, 512, 32),
        "blizzard": ("frames", 200, 1024, 2048, 256, 1024, 128),
        "imdb": ("tokens", 16004, 300, 500, 64, 500, 32),
    }


# -- the fused LSTM pair ---------------------------------------------------------------------------


@pytest.mark.parametrize("modality, input_size, aux_on_hidden", [
    ("binary", 2, False), ("tokens", 11, False), ("frames", 3, False), ("frames", 3, True),
])
def test_the_fused_lstm_pair_trains_every_parameter(modality, input_size, aux_on_hidden):
    config = ZForcingConfig(modality=modality, input_size=input_size, start_index=2 if modality == "binary" else 1,
                            embed_size=4, hidden_size=6, latent_size=3, mlp_size=5, aux_on_hidden=aux_on_hidden)
    torch.manual_seed(0)
    pair = FusedLSTMPair(config)
    batch_size, steps = 3, 7
    if modality == "frames":
        targets = torch.randn(batch_size, steps, input_size)
    else:
        targets = torch.randint(0, input_size, (batch_size, steps)).float()
    mask = torch.ones(batch_size, steps)
    mask[1, 5:] = 0.0  # a shorter sequence
    train = TrainConfig(aux_weight=0.5, bwd_weight=0.5)
    first = torch.randn(batch_size, input_size) if modality == "frames" else None
    loss = objective(pair(targets, mask, torch.randn(batch_size, steps, 3), first), 1.0, train)
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in pair.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    before = [parameter.detach().clone() for parameter in pair.parameters()]
    step_loss = update(pair, make_optimizer(pair, train, fused=False), Batch(targets, mask, first), train, torch.Generator().manual_seed(0))
    assert torch.isfinite(step_loss)
    assert all(not torch.equal(old, new) for old, new in zip(before, pair.parameters()))


# -- the memory benchmark --------------------------------------------------------------------------


def test_the_memory_benchmark_reads_a_small_sparse_dataset(tmp_path):
    result = bench_json("--memory", "--hours", "0.5", "--batches", "10", "--size", "tiny", "--device", "cpu", "--dir", tmp_path)
    assert (result["preset"], result["hours"], result["location"]) == ("blizzard", 0.5, str(tmp_path))
    assert result["dataset_bytes"] > 0.5 * 3600 * 16000 * 2 * 0.99
    assert result["dataset_allocated_bytes"] < result["dataset_bytes"] / 100  # sparse: nothing but the header
    assert [reading["batches"] for reading in result["readings"]] == list(range(11))
    for reading in result["readings"]:
        assert reading["rss_anon_bytes"] > 0 and reading["rss_file_bytes"] > 0 and reading["rss_shmem_bytes"] >= 0
    assert result["rss_anon_growth_bytes"] == result["rss_anon_end_bytes"] - result["rss_anon_start_bytes"]
    assert result["bytes_read"] == 10 * 4 * 41 * 200 * 2 and result["updates"] == 11
    assert list(tmp_path.iterdir()) == []


def test_the_memory_benchmark_removes_its_dataset_when_interrupted(tmp_path):
    def interrupt(message):
        if "batches" in message:  # the first reading: the dataset is open, training has started
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        membench.run_memory("timit", "tiny", "cpu", hours=0.2, batches=5, folder=tmp_path, progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_the_memory_benchmark_needs_sparse_files(tmp_path, monkeypatch):
    monkeypatch.setattr(membench, "allocated_bytes", lambda path: membench.PROBE_BYTES)
    result = invoke("bench", "--memory", "--size", "tiny", "--device", "cpu", "--dir", tmp_path)
    assert_clean_error(result, 1, "does not support sparse files")
    assert list(tmp_path.iterdir()) == []


def test_the_memory_benchmark_needs_some_free_space(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(membench.shutil, "disk_usage", lambda path: usage(10 << 20, 9 << 20, 1 << 20))
    assert_clean_error(invoke("bench", "--memory", "--size", "tiny", "--dir", tmp_path), 1, "1 MiB free")


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["--preset", "cifar"], "Unknown benchmark preset"),
    (["--size", "huge"], "Unknown size"),
    (["--updates", "0"], "--updates"),
    (["--hours", "5"], "--hours applies only with --memory"),
    (["--batches", "5"], "--batches applies only with --memory"),
    (["--seconds", "5"], "--seconds applies only with --processes"),
    (["--memory", "--updates", "3"], "--updates"),
    (["--memory", "--preset", "mnist"], "audio dataset"),
    (["--memory", "--hours", "0"], "--hours"),
    (["--memory", "--hours", "nan"], "--hours"),
    (["--memory", "--processes", "2"], "two different benchmarks"),
    (["--processes", "2", "--device", "cuda"], "CPU"),
    (["--tf32", "--device", "cpu"], "--tf32 needs a CUDA device"),
    (["--memory", "--tf32"], "--tf32 sets the speed benchmark's GPU products"),
    (["--processes", "2", "--hidden-size", "8"], "--hidden-size resizes the speed benchmark's model"),
    (["--memory", "--batch-size", "8"], "--batch-size resizes"),
    (["--batch-size", "1025"], "--batch-size"),
    (["--mlp-size", "0"], "--mlp-size"),
    (["--memory", "--size", "tiny", "--hours", "0.0005"], "fewer than a batch"),
])
def test_bad_options_give_one_error_line(args, fragment, tmp_path):
    result = invoke("bench", *args, "--dir", tmp_path)
    assert_clean_error(result, 2, fragment)
    assert list(tmp_path.iterdir()) == []


def test_a_dir_that_is_not_a_folder_is_refused(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    assert_clean_error(invoke("bench", "--memory", "--dir", file), 2, "not a folder")


# -- sharing, and python -m zforcing_cli.bench -----------------------------------------------------


def test_processes_measure_trainings_sharing_the_cpu(tmp_path):
    result = bench_json("--processes", "2", "--seconds", "0.2", "--preset", "timit", "--size", "tiny", "--threads", "1",
                        "--dir", tmp_path)
    assert (result["processes"], result["size"], result["thread_policy"]) == (2, "tiny", "--threads 1")
    assert len(result["share_of_solo_speed"]) == 2 and min(result["share_of_solo_speed"]) > 0
    assert list(tmp_path.iterdir()) == []


def test_python_m_bench_is_zforcing_bench():
    command = [sys.executable, "-m", "zforcing_cli.bench", "--help"]
    help_text = plain(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert "zforcing bench" in help_text and "--memory" in help_text and "Example" in help_text
