"""scripts/gpu_check.sh, the one check of the GPU paths: its plumbing, run on the CPU (the
real check needs a GPU, which CI never has)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def gpu_check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "ZFORCING_ACTIVE_DIR": str(cwd / "active")}
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_gpu_check_prints_one_line_per_check_and_passes_on_the_cpu(tmp_path):
    done = gpu_check("--device", "cpu", "--only", "text", "--work", str(tmp_path / "work"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    checks = [line.split()[1:3] for line in lines if line.startswith(("PASS", "FAIL"))]
    assert checks == [["prepare", "text"]] + [[step, "text"] for _ in ("fp32", "bf16") for step in ("train", "evaluate", "sample")]
    assert all(line.startswith("PASS") for line in lines[1:-1])
    assert "nats per sentence" in done.stdout and "updates/s" in done.stdout
    assert lines[-1].startswith("gpu_check: 7 of 7 checks passed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_fails_where_there_is_no_gpu(tmp_path):
    done = gpu_check(cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout.startswith("FAIL  cuda available") and "--device cpu" in done.stdout


def test_a_failed_check_says_why_and_makes_the_exit_status_nonzero(tmp_path):
    (tmp_path / "work" / "text.txt").mkdir(parents=True)  # where the corpus must be written: a folder
    done = gpu_check("--device", "cpu", "--only", "prepare text", "--work", str(tmp_path / "work"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout.splitlines()[1].startswith("FAIL  prepare text")
    assert "failed: prepare text" in done.stdout and "kept in" in done.stdout
