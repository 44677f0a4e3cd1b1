"""`zforcing train --precision`: its values, fp16's need of a GPU, and a resumed run keeping it."""

from __future__ import annotations

import json

import pytest

from conftest import assert_clean_error, invoke, plain

TRAIN = ("train", "--batch-size", 4, "--device", "cpu", "--max-steps", 1)


def test_an_unknown_precision_is_a_usage_error(cwd, tiny_data):
    line = assert_clean_error(invoke(*TRAIN, "--data", tiny_data, "--precision", "fp8"), 2)
    assert "--precision must be fp32, tf32, bf16 or fp16, not 'fp8'" in line
    assert not (cwd / "runs").exists()


def test_fp16_on_the_cpu_says_it_needs_a_gpu(cwd, tiny_data):
    result = invoke(*TRAIN, "--data", tiny_data, "--precision", "fp16", "--out", "run")
    assert "--precision fp16 needs a CUDA device" in assert_clean_error(result, 2)
    assert "--device cuda" in plain(result.stderr) and "bf16" in plain(result.stderr)
    assert not (cwd / "run").exists()


@pytest.mark.parametrize("given", [None, "bf16"], ids=["omitted", "repeated"])
def test_a_resumed_run_keeps_its_precision(cwd, tiny_data, given):
    assert invoke(*TRAIN, "--data", tiny_data, "--precision", "bf16", "--out", "run").exit_code == 0
    repeated = ("--precision", given) if given else ()
    result = invoke("train", "--out", "run", "--resume", "--max-steps", 2, "--device", "cpu", *repeated)
    assert result.exit_code == 0, plain(result.output)
    assert json.loads((cwd / "run" / "config.json").read_text())["train"]["precision"] == "bf16"
    line = assert_clean_error(invoke("train", "--out", "run", "--resume", "--precision", "fp32", "--device", "cpu"), 2)
    assert "--precision fp32 differs from the run's bf16" in line
