"""The command line answers --help, --version and errors about paths and options before it
loads torch (seconds on a busy machine): what each command line imports, read from
`python -X importtime` in a subprocess. No timing is asserted, only what was imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zforcing_cli.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "matplotlib", "datasets", "nltk", "safetensors", "soundfile")


def run(arguments: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """The command's result and the top-level packages it imported."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("ZFORCING_DEBUG", None)
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "zforcing_cli", *arguments], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    return result, imported


def messages(result: subprocess.CompletedProcess) -> str:
    return "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))


@pytest.mark.parametrize("arguments", [["--help"], ["--version"], *([name, "--help"] for name in COMMANDS)],
                         ids=lambda arguments: " ".join(arguments))
def test_help_and_version_load_no_torch(arguments, tmp_path):
    result, imported = run(arguments, tmp_path)
    assert result.returncode == 0, messages(result)
    assert result.stdout.strip()
    assert not set(HEAVY) & imported


@pytest.mark.parametrize("arguments, error", [
    (["evaluate", "missing-run"], "Error: missing-run does not exist."),
    (["sample", "missing-run", "--num", "2"], "Error: missing-run does not exist."),
    (["interpolate", "missing-run", "a", "b"], "Error: missing-run does not exist."),
    (["evaluate"], "Error: No checkpoint given and runs/latest does not exist."),
    (["train", "--data", "missing-data"], "Error: No prepared dataset at missing-data."),
    (["train", "--resume", "--out", "missing-run"], "Error: missing-run is not a checkpoint"),
    (["train", "--preset", "huge"], "Error: Unknown preset 'huge'."),
    (["train", "--lr", "nan"], "Error: --lr must be a finite number above 0, not nan."),
    (["train", "--batch-size", "0"], "Error: Invalid value for '--batch-size'"),
    (["train", "--config", "missing.toml"], "Error: missing.toml"),
    (["train", "--hidden-size", "0"], "Error: Invalid value for '--hidden-size'"),
    (["evaluate", "--split", "train"], "Error: --split must be test or valid, not 'train'."),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_errors_about_paths_and_options_load_no_torch(arguments, error, tmp_path):
    result, imported = run(arguments, tmp_path)
    assert result.returncode in (1, 2)
    assert messages(result).startswith(error), messages(result)
    assert "Traceback" not in result.stderr
    assert not set(HEAVY) & imported


def test_a_command_that_runs_loads_torch(tmp_path):
    """The checks above would pass vacuously were the import list never read: a command past
    its checks does load torch."""
    result, imported = run(["evaluate", str(tmp_path), "--device", "cpu"], tmp_path)
    assert result.returncode == 1 and "is not a checkpoint or a run folder" in messages(result)
    assert "torch" not in imported  # still a path error
    (tmp_path / "data").mkdir()
    result, imported = run(["prepare", "mnist", "embedded", "--out", str(tmp_path / "data" / "mnist")], tmp_path)
    assert result.returncode == 0, messages(result)
    assert "torch" in imported
