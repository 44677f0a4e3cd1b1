"""The memory benchmark (bench/memory.py): a small sparse dataset, and its errors."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
from conftest import assert_clean_error, invoke, plain

from zforcing_cli.bench import memory


def bench_json(*args) -> dict:
    result = invoke("bench", *args, "--json")
    assert result.exit_code == 0, plain(result.output)
    return json.loads(result.stdout)


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
        memory.run_memory("timit", "tiny", "cpu", hours=0.2, batches=5, folder=tmp_path, progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_the_memory_benchmark_needs_sparse_files(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "allocated_bytes", lambda path: memory.PROBE_BYTES)
    result = invoke("bench", "--memory", "--size", "tiny", "--device", "cpu", "--dir", tmp_path)
    assert_clean_error(result, 1, "does not support sparse files")
    assert list(tmp_path.iterdir()) == []


def test_the_memory_benchmark_needs_some_free_space(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(memory.shutil, "disk_usage", lambda path: usage(10 << 20, 9 << 20, 1 << 20))
    assert_clean_error(invoke("bench", "--memory", "--size", "tiny", "--dir", tmp_path), 1, "1 MiB free")
