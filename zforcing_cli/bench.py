"""Benchmarks anyone can run: python -m zforcing_cli.bench [--device cpu] [--json]

Measures, on this machine, with the default (small) MNIST preset unless told otherwise:
- a random batch from a memory-mapped prepared dataset (the embedded set written to a
  temporary folder), in microseconds;
- training updates per second and milliseconds per update;
- evaluation (ELBO) sequences per second;
- free-running sampling, sequences per second.
Results go to stdout as a table or JSON; docs/performance.md records them with the machine.

With --processes N it measures sharing instead: training speed of one process alone, then of N
processes training at once (each under the thread policy of zforcing_cli/threads.py, or
--threads), and each one's share of the solo speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import EMBEDDED, open_dataset, prepare
from .device import resolve_device
from .evaluate import evaluate_split
from .model import ZForcing, count_parameters
from .presets import preset_configs
from .threads import TORCH_DEFAULT_THREADS, ThreadPolicy, available_cores
from .train import TrainConfig, step_generator, train_step

READY, GO = "ready", "go"  # the start barrier between bench_shared and its workers


def time_calls(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return times


def bench_batches(batch_size: int, repeats: int = 2000) -> float:
    """Median seconds to fetch one random batch from a memory-mapped prepared dataset."""
    with tempfile.TemporaryDirectory() as folder:
        split = prepare("mnist", EMBEDDED, Path(folder) / "mnist").split("train")
        rng = np.random.default_rng(0)
        return statistics.median(time_calls(lambda: split.batch(rng.integers(0, len(split), batch_size)), repeats))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_training(model: ZForcing, config: TrainConfig, batch: tuple, device: torch.device, updates: int) -> float:
    """Median seconds per update (forward, backward, clipping, Adam)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train(True)

    steps = itertools.count()

    def one_update() -> None:
        train_step(model, optimizer, batch, 1.0, config, step_generator(0, next(steps), device))
        synchronize(device)

    one_update()  # warm-up
    return statistics.median(time_calls(one_update, updates))


def training_setup(device: torch.device, preset: str, batch_size: int | None):
    """(embedded dataset, model, train config, first training batch) for a preset."""
    dataset = open_dataset(EMBEDDED)
    model_config, train_config = preset_configs(preset, dataset.meta)
    if batch_size:
        train_config.batch_size = batch_size
    torch.manual_seed(0)
    model = ZForcing(model_config).to(device)
    indices = np.arange(train_config.batch_size)
    batch = dataset.split("train").batch(indices).to(device)
    return dataset, model, train_config, batch


def run(device_spec: str, preset: str, updates: int, batch_size: int | None) -> dict:
    device = resolve_device(device_spec)
    dataset, model, train_config, batch = training_setup(device, preset, batch_size)
    update = bench_training(model, train_config, batch, device, updates)

    eval_count = 500
    began = time.perf_counter()
    evaluate_split(model, dataset.split("test"), batch_size=train_config.eval_batch_size, device=device, limit=eval_count)
    synchronize(device)
    eval_seconds = time.perf_counter() - began

    sample_count = 64
    began = time.perf_counter()
    model.generate(sample_count, 784, generator=torch.Generator(device=device).manual_seed(0))
    synchronize(device)
    sample_seconds = time.perf_counter() - began

    return {
        "zforcing": __version__,
        "torch": torch.__version__,
        "device": str(device),
        "machine": machine_description(device),
        "preset": preset,
        "batch_size": train_config.batch_size,
        "parameters": count_parameters(model),
        "batch_fetch_us": bench_batches(train_config.batch_size) * 1e6,
        "train_ms_per_update": update * 1e3,
        "train_updates_per_s": 1.0 / update,
        "train_sequences_per_s": train_config.batch_size / update,
        "eval_sequences_per_s": eval_count / eval_seconds,
        "sample_sequences_per_s": sample_count / sample_seconds,
    }


def shared_worker(seconds: float, threads: int | None, preset: str, batch_size: int | None) -> None:
    """One process of bench_shared: set up, wait for GO on stdin, train for `seconds`, print one
    JSON line. Every worker trains through the same window, so their timings overlap fully.

    It calls policy.refresh() before each update, as the trainer does, so the timing includes
    the policy's cost and its reaction to the other processes.
    """
    device = torch.device("cpu")
    with ThreadPolicy(threads) as policy:
        _, model, train_config, batch = training_setup(device, preset, batch_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr)
        model.train(True)
        steps = itertools.count()
        train_step(model, optimizer, batch, 1.0, train_config, step_generator(0, next(steps), device))  # warm-up
        print(READY, flush=True)
        sys.stdin.readline()  # GO: every worker is set up
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            policy.refresh()
            train_step(model, optimizer, batch, 1.0, train_config, step_generator(0, next(steps), device))
        elapsed, updates = time.perf_counter() - began, next(steps) - 1
        result = {
            "ms_per_update": elapsed / updates * 1e3,
            "updates": updates,
            "batch_size": train_config.batch_size,
            "threads": policy.threads,
            "thread_changes": len(policy.changes),
        }
    print(json.dumps(result), flush=True)


def run_workers(count: int, seconds: float, threads: int | None, preset: str, batch_size: int | None) -> list[dict]:
    """Start `count` shared_worker processes, release them together, return their results."""
    command = [sys.executable, "-m", "zforcing_cli.bench", "--worker-seconds", str(seconds), "--preset", preset]
    command += ["--threads", str(threads)] if threads is not None else []
    command += ["--batch-size", str(batch_size)] if batch_size else []
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


def bench_shared(
    processes: int, seconds: float, threads: int | None, preset: str = "small", batch_size: int | None = None
) -> dict:
    """CPU training speed alone and shared, each measured over the same `seconds` window.

    - policy_cost_alone: how much slower one training is under the thread policy than with
      torch's own thread count (TORCH_DEFAULT_THREADS, as without the policy);
    - share_of_solo_speed: for each of `processes` trainings started together, solo ms per
      update / its ms per update (0.5: half the speed it has alone).
    """
    unmanaged = run_workers(1, seconds, TORCH_DEFAULT_THREADS, preset, batch_size)[0]
    solo = run_workers(1, seconds, threads, preset, batch_size)[0]
    concurrent = run_workers(processes, seconds, threads, preset, batch_size)
    shares = [solo["ms_per_update"] / result["ms_per_update"] for result in concurrent]
    return {
        "zforcing": __version__,
        "torch": torch.__version__,
        "machine": f"{cpu_model_name()}, {available_cores()} cores",
        "preset": preset,
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
        "concurrent_thread_changes": [result["thread_changes"] for result in concurrent],
        "share_of_solo_speed": shares,
        "min_share_of_solo_speed": min(shares),
    }


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()}, {os.cpu_count()} cores, torch on {torch.get_num_threads()} threads"


def cpu_model_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description="zforcing benchmarks (see docs/performance.md)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--processes", type=int, default=0, help="measure N concurrent CPU trainings against one alone")
    parser.add_argument("--threads", type=int, default=None, help="fixed torch thread count (default: automatic policy)")
    parser.add_argument("--seconds", type=float, default=30.0, help="with --processes: the window each measurement trains for")
    parser.add_argument("--worker-seconds", type=float, default=None, help=argparse.SUPPRESS)  # bench_shared's workers
    args = parser.parse_args()
    if args.worker_seconds is not None:
        shared_worker(args.worker_seconds, args.threads, args.preset, args.batch_size)
        return
    if args.processes:
        result = bench_shared(args.processes, args.seconds, args.threads, args.preset, args.batch_size)
    else:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        result = run(args.device, args.preset, args.updates, args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        print(f"{key:24} {formatted(value)}")


def formatted(value) -> str:
    if isinstance(value, list):
        return ", ".join(formatted(item) for item in value)
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
