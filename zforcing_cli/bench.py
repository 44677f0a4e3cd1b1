"""Benchmarks anyone can run: python -m zforcing_cli.bench [--device cpu] [--json]

Measures, on this machine, with the default (small) MNIST preset unless told otherwise:
- a random batch from a memory-mapped prepared dataset (the embedded set written to a
  temporary folder), in microseconds;
- training updates per second and milliseconds per update;
- evaluation (ELBO) sequences per second;
- free-running sampling, sequences per second.
Results go to stdout as a table or JSON; docs/performance.md records them with the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
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
from .train import TrainConfig, step_generator, train_step


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


def run(device_spec: str, preset: str, updates: int, batch_size: int | None) -> dict:
    device = resolve_device(device_spec)
    dataset = open_dataset(EMBEDDED)
    model_config, train_config = preset_configs(preset, dataset.meta)
    if batch_size:
        train_config.batch_size = batch_size
    torch.manual_seed(0)
    model = ZForcing(model_config).to(device)
    indices = np.arange(train_config.batch_size)
    batch = tuple(t.to(device) for t in dataset.split("train").batch(indices))
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
    args = parser.parse_args()
    result = run(args.device, args.preset, args.updates, args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        print(f"{key:24} {value:,.2f}" if isinstance(value, float) else f"{key:24} {value}")


if __name__ == "__main__":
    main()
