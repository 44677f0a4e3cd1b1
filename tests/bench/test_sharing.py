"""CPU trainings sharing the machine (bench/sharing.py), and `python -m zforcing_cli.bench`
(bench/__main__.py), which also starts the sharing benchmark's workers."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import invoke, plain


def bench_json(*args) -> dict:
    result = invoke("bench", *args, "--json")
    assert result.exit_code == 0, plain(result.output)
    return json.loads(result.stdout)


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


def test_python_m_bench_loads_no_module_twice():
    """`python -m` runs bench/__main__.py as __main__; were it imported again under its own name
    (as bench.py once was, by the command line it started), its code would run twice and make
    every class it defines twice."""
    command = [sys.executable, "-X", "importtime", "-m", "zforcing_cli.bench", "--help"]
    stderr = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]
    assert "zforcing_cli.cli.bench" in imported  # the command line was loaded: the check looked
    assert "zforcing_cli.bench.__main__" not in imported
