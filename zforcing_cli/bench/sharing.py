"""Sharing the machine (`zforcing bench --processes N`, bench_shared): training speed of one
process alone, then of N processes training at once (each under the thread policy of
threads.py, or a fixed --threads), and each one's share of the solo speed. The workers are
processes of `python -m zforcing_cli.bench WORKER_FLAG SPEC` (__main__.py)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..threads import TORCH_DEFAULT_THREADS, TRAINING_SETTLE_SECONDS, ThreadPolicy, available_cores
from ..update import make_optimizer, step_generator
from ..version import __version__
from .measure import cpu_model_name
from .synthetic import bench_dataset
from .workload import check_preset, training_setup, update

WORKER_FLAG = "--worker"  # bench_shared's worker processes: python -m zforcing_cli.bench --worker SPEC
READY, GO = "ready", "go"  # the start barrier between bench_shared and its workers


def shared_worker(seconds: float, threads: int | None, preset: str, size: str, folder: str | None) -> None:
    """One process of bench_shared: set up, wait for GO on stdin, train for `seconds`, print one
    JSON line. Every worker trains through the same window, so their timings overlap fully.

    Its thread count is the policy's at its start (waiting for the others as a training waits),
    kept for the window, as a training keeps it.
    """
    device = torch.device("cpu")
    with ThreadPolicy(threads, TRAINING_SETTLE_SECONDS) as policy, tempfile.TemporaryDirectory(prefix="zforcing-bench-", dir=folder) as temporary:
        model, train_config, batch = training_setup(bench_dataset(preset, Path(temporary)), size, device)
        optimizer = make_optimizer(model, train_config, fused=False)
        model.train(True)
        steps = itertools.count()
        update(model, optimizer, batch, train_config, step_generator(0, next(steps), device))  # warm-up
        print(READY, flush=True)
        sys.stdin.readline()  # GO: every worker is set up
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            update(model, optimizer, batch, train_config, step_generator(0, next(steps), device))
        elapsed, updates = time.perf_counter() - began, next(steps) - 1
        result = {
            "ms_per_update": elapsed / updates * 1e3,
            "updates": updates,
            "batch_size": train_config.batch_size,
            "threads": policy.threads,
        }
    print(json.dumps(result), flush=True)


def run_workers(count: int, seconds: float, threads: int | None, preset: str, size: str, folder: Path | None) -> list[dict]:
    """Start `count` shared_worker processes, release them together, return their results."""
    spec = json.dumps({"seconds": seconds, "threads": threads, "preset": preset, "size": size,
                       "folder": None if folder is None else str(folder)})
    command = [sys.executable, "-m", "zforcing_cli.bench", WORKER_FLAG, spec]
    workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    try:
        for worker in workers:
            if worker.stdout.readline().strip() != READY:
                raise RuntimeError(f"benchmark worker exited early (status {worker.wait()})")
        for worker in workers:
            worker.stdin.write(GO + "\n")
            worker.stdin.close()
        return [worker_result(worker) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:  # only after a failure: do not leave the others training
                worker.kill()
                worker.wait()


def worker_result(worker: subprocess.Popen) -> dict:
    output = worker.stdout.read()
    if worker.wait() != 0:
        raise RuntimeError(f"benchmark worker failed (status {worker.returncode})")
    return json.loads(output.splitlines()[-1])


def bench_shared(processes: int, seconds: float, threads: int | None, preset: str = "mnist", size: str | None = None,
                 folder: Path | None = None) -> dict:
    """CPU training speed alone and shared, each measured over the same `seconds` window.

    - policy_cost_alone: how much slower one training is under the thread policy than with
      torch's own thread count (TORCH_DEFAULT_THREADS, as without the policy);
    - share_of_solo_speed: for each of `processes` trainings started together, solo ms per
      update / its ms per update (0.5: half the speed it has alone).
    """
    size = check_preset(preset, size)
    unmanaged = run_workers(1, seconds, TORCH_DEFAULT_THREADS, preset, size, folder)[0]
    solo = run_workers(1, seconds, threads, preset, size, folder)[0]
    concurrent = run_workers(processes, seconds, threads, preset, size, folder)
    shares = [solo["ms_per_update"] / result["ms_per_update"] for result in concurrent]
    return {
        "zforcing": __version__,
        "torch": torch.__version__,
        "machine": f"{cpu_model_name()}, {available_cores()} cores",
        "preset": preset,
        "size": size,
        "batch_size": solo["batch_size"],
        "processes": processes,
        "seconds": seconds,
        "thread_policy": "automatic" if threads is None else f"--threads {threads}",
        "torch_default_ms_per_update": unmanaged["ms_per_update"],
        "solo_ms_per_update": solo["ms_per_update"],
        "solo_threads": solo["threads"],
        "policy_cost_alone": solo["ms_per_update"] / unmanaged["ms_per_update"] - 1.0,
        "concurrent_ms_per_update": [result["ms_per_update"] for result in concurrent],
        "concurrent_threads": [result["threads"] for result in concurrent],
        "share_of_solo_speed": shares,
        "min_share_of_solo_speed": min(shares),
    }
