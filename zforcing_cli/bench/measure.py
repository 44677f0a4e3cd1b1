"""Measuring: timing calls (a GPU synchronised around each), interleaving the implementations,
batch fetches, the process's memory and the machine's description."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

Progress = Callable[[str], None]  # what a benchmark says it is doing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Times calls, synchronising a GPU before and after, and on CUDA records the allocator's
    peaks: `peak` over every measured call, and per call the most memory it allocated above
    what was held before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __call__(self, function: Callable[[], object]) -> tuple[float, int | None]:
        cuda = self.device.type == "cuda"
        synchronize(self.device)
        if cuda:
            held = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        began = time.perf_counter()
        function()
        synchronize(self.device)
        seconds = time.perf_counter() - began
        if not cuda:
            return seconds, None
        peak = torch.cuda.max_memory_allocated(self.device)
        self.peak = max(self.peak, peak)
        return seconds, peak - held


def interleaved_updates(updates: dict[str, Callable[[], object]], rounds: int, meter: Meter,
                        counted: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """Each update once as a warm-up, then `rounds` rounds of one update each, the order rotated
    every round. Per name: the median seconds and, on CUDA, the largest memory above the held.
    counted(done, total) hears of every update taken, the warm-up ones included."""
    names = list(updates)
    total = len(names) * (rounds + 1)
    count = counted or (lambda done, total: None)
    for done, name in enumerate(names, 1):
        meter(updates[name])
        count(done, total)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    extra: dict[str, list[int]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for turn, name in enumerate(names[shift:] + names[:shift], 1):
            elapsed, memory = meter(updates[name])
            seconds[name].append(elapsed)
            if memory is not None:
                extra[name].append(memory)
            count(len(names) * (round_index + 1) + turn, total)
    return {name: {"seconds": statistics.median(seconds[name]), "memory": max(extra[name], default=None)} for name in names}


def median_fetch_seconds(split, batch_size: int, budget: float) -> float:
    """Median seconds to fetch one random batch, fetching for about `budget` seconds (5 to 2000 times)."""
    rng = np.random.default_rng(0)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < 5 or (len(times) < 2000 and time.perf_counter() - began < budget):
        start = time.perf_counter()
        split.batch(rng.integers(0, len(split), batch_size))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def process_memory() -> dict[str, int]:
    """This process's memory figures from /proc/self/status ("VmHWM", "RssAnon", ...), in
    bytes; empty where the system has no such file."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {name: int(value.split()[0]) * 1024 for name, _, value in (line.partition(":") for line in lines)
            if value.strip().endswith("kB")}


def peak_rss_bytes() -> int:
    """The process's peak resident memory: VmHWM where /proc tells, else getrusage."""
    if "VmHWM" in (status := process_memory()):
        return status["VmHWM"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def machine_description(device: torch.device) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model_name(),
        "cores": cores,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def cpu_model_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
