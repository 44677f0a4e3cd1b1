"""Host memory while training on a Blizzard-sized dataset: `zforcing bench --memory` (run_memory).

A prepared audio dataset of `hours` of 16 kHz int16 audio (300 h by default, the Blizzard 2013
audiobooks the paper trained on: 34.6 GB of samples) is written as a sparse file: only the .npy
header is stored and the samples read as zeros, so it takes no disk space. It is opened with
open_dataset, memory-mapped as training opens it, and random training batches are fetched from
it; every K-th batch also trains the preset's model for one update. The process's resident
memory is read from /proc/self/status at the start (after opening the dataset, building the
model and one warm-up update) and after every K batches, in three parts:
- RssAnon: anonymous memory, what the process itself holds (model, optimizer, batches);
- RssFile: pages of files mapped into the process, the dataset's among them: page cache, which
  the kernel drops under memory pressure and reads again when needed;
- RssShmem: shared memory.
The temporary dataset is removed when the benchmark ends, fails or is interrupted (Ctrl-C).
"""

from __future__ import annotations

import itertools
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..data.audio import Framing
from ..device import resolve_device
from ..errors import UsageError, ZForcingError
from ..model import ZForcing, ZForcingConfig
from ..runconfig import TrainConfig
from ..update import make_optimizer, step_generator
from ..version import __version__
from .defaults import DEFAULT_BATCHES, DEFAULT_HOURS
from .measure import Progress, machine_description, peak_rss_bytes, process_memory
from .synthetic import write_synthetic_audio
from .workload import AUDIO_PRESETS, bench_configs, check_preset, update

READINGS = 20  # readings after the start one: K = batches / READINGS
STATUS_FIELDS = {"RssAnon": "rss_anon_bytes", "RssFile": "rss_file_bytes", "RssShmem": "rss_shmem_bytes"}
MIN_FREE_BYTES = 64 << 20  # for the headers, meta.json and the sparse-file probe
PROBE_BYTES = 64 << 20  # a sparse file this long must take (almost) no blocks
MEMORY_FILE_SYSTEMS = ("tmpfs", "ramfs")  # their file pages are memory, not droppable cache
LOCATION_HINT = "Choose a folder on a disk (ext4, xfs, btrfs) with --dir."


def read_memory() -> dict[str, int]:
    """RssAnon, RssFile and RssShmem of this process, in bytes (STATUS_FIELDS' names)."""
    status = process_memory()
    found = {key: status[name] for name, key in STATUS_FIELDS.items() if name in status}
    if len(found) != len(STATUS_FIELDS):
        raise ZForcingError("The memory benchmark reads RssAnon and RssFile from /proc/self/status, which this system "
                            "does not provide.", "Run it on Linux 4.5 or later.")
    return found


def file_system_type(folder: Path) -> str | None:
    """The type of the file system holding folder, from /proc/mounts (None where unknown)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    path, best, kind = str(folder.resolve()), "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def check_location(folder: Path) -> None:
    """A folder that can hold a large sparse dataset whose pages are droppable cache."""
    if not folder.is_dir():
        raise UsageError(f"--dir {folder} is not a folder.", "Give an existing folder on a disk.")
    kind = file_system_type(folder)
    if kind in MEMORY_FILE_SYSTEMS:
        raise ZForcingError(f"{folder} is on {kind}, whose file pages are memory: the dataset's pages would count as "
                            "shared memory that the kernel cannot drop.", LOCATION_HINT)
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise ZForcingError(f"{folder} has {free / 2**20:.0f} MiB free; the sparse dataset needs {MIN_FREE_BYTES >> 20} MiB.",
                            "Free some space, or choose a folder on another disk with --dir.")


def allocated_bytes(path: Path) -> int:
    """Bytes of disk a file takes (less than its length where it has holes)."""
    return path.stat().st_blocks * 512


def check_sparse(folder: Path) -> None:
    """Files with holes take no disk space in folder: a PROBE_BYTES hole must take under half."""
    probe = folder / "sparse-probe"
    try:
        with open(probe, "wb") as handle:
            handle.truncate(PROBE_BYTES)
        allocated = allocated_bytes(probe)
    finally:
        probe.unlink(missing_ok=True)
    if allocated >= PROBE_BYTES // 2:
        raise ZForcingError(f"The file system of {folder.parent} does not support sparse files: the dataset would "
                            "take its full size on disk.", LOCATION_HINT)


def run_memory(preset: str = "blizzard", size: str | None = None, device_spec: str = "auto",
               hours: float = DEFAULT_HOURS, batches: int = DEFAULT_BATCHES, folder: Path | None = None,
               progress: Progress | None = None) -> dict:
    """The memory benchmark (see the module's docstring); a record of numbers. size defaults to
    small: the model is there to train, the dataset is what is measured."""
    size = memory_size(preset, size, hours)
    device = resolve_device(device_spec)
    framing = Framing()
    sequences = framing.stream_sequences(round(hours * 3600 * framing.sample_rate))
    read_memory()
    folder = Path(folder or tempfile.gettempdir())
    check_location(folder)
    say = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="zforcing-membench-", dir=folder) as temporary:
        check_sparse(Path(temporary))
        say(f"Writing a sparse {hours:g}-hour {preset} dataset in {temporary}")
        try:
            dataset = write_synthetic_audio(Path(temporary) / preset, preset, sequences, rng=None)
        except OSError as error:
            raise ZForcingError(f"Cannot create a {hours:g}-hour sparse dataset in {folder}: {error.strerror}.",
                                LOCATION_HINT + " Or ask for fewer --hours.") from None
        samples_file = Path(temporary) / preset / dataset.meta.files["train"]["samples"]
        split = dataset.split("train")
        model_config, train_config = bench_configs(size, dataset.meta)
        if len(split) < train_config.batch_size:
            raise UsageError(f"--hours {hours:g} holds {len(split)} sequences, fewer than a batch of {train_config.batch_size}.",
                             "Ask for more --hours.")
        readings, every, updates = readings_while_training(split, model_config, train_config, device, batches, say)
        dataset_bytes, dataset_allocated = samples_file.stat().st_size, allocated_bytes(samples_file)
    return memory_record(readings, {
        "zforcing": __version__,
        "device": str(device),
        "machine": machine_description(device),
        "preset": preset,
        "size": size,
        "location": str(folder),
        "hours": hours,
        "dataset_bytes": dataset_bytes,
        "dataset_allocated_bytes": dataset_allocated,
        "sequences": len(split),
        "batch_size": train_config.batch_size,
        "batches": batches,
        "batches_per_reading": every,
        "updates": updates,
        "bytes_read": batches * train_config.batch_size * framing.sequence_samples * 2,
    })


def memory_size(preset: str, size: str | None, hours: float) -> str:
    """The size to measure (small by default); UsageError for a preset that is not audio, an
    unknown size or hours that are not a positive number."""
    if preset not in AUDIO_PRESETS:
        raise UsageError(f"The memory benchmark measures an audio dataset; --preset {preset} is not one.",
                         f"Use --preset {' or '.join(AUDIO_PRESETS)}.")
    size = check_preset(preset, size or "small")
    if not (math.isfinite(hours) and hours > 0):
        raise UsageError(f"--hours must be a positive number, not {hours}.", "For example --hours 300 (Blizzard's size).")
    return size


def readings_while_training(split, model_config: ZForcingConfig, train_config: TrainConfig, device: torch.device,
                            batches: int, say: Progress) -> tuple[list[dict], int, int]:
    """Fetch `batches` random batches from split, training the model on every K-th one. The
    memory is read at the start (after a warm-up update) and after every K batches. Returns the
    readings, K and the updates taken."""
    torch.manual_seed(0)
    model = ZForcing(model_config).to(device)
    optimizer = make_optimizer(model, train_config, fused=device.type == "cuda")
    model.train(True)
    rng, steps = np.random.default_rng(0), itertools.count()

    def fetch():
        return split.batch(rng.integers(0, len(split), train_config.batch_size)).to(device)

    def train(batch) -> None:
        update(model, optimizer, batch, train_config, step_generator(0, next(steps), device))

    train(fetch())  # the optimizer's state and an update's buffers belong to the start
    every = max(1, math.ceil(batches / READINGS))
    began = time.perf_counter()
    readings = [{"batches": 0, "seconds": 0.0, **read_memory()}]
    for done in range(1, batches + 1):
        batch = fetch()
        if done % every == 0 or done == batches:
            train(batch)
            readings.append({"batches": done, "seconds": time.perf_counter() - began, **read_memory()})
            say(f"{done:,} of {batches:,} batches: RssAnon {readings[-1]['rss_anon_bytes'] / 1e6:,.0f} MB, "
                f"RssFile {readings[-1]['rss_file_bytes'] / 1e6:,.0f} MB")
    return readings, every, next(steps)


def memory_record(readings: list[dict], record: dict) -> dict:
    """The record with the readings and, per kind of memory, its start, end, largest and growth."""
    for kind in ("rss_anon", "rss_file"):
        values = [reading[f"{kind}_bytes"] for reading in readings]
        record.update({f"{kind}_start_bytes": values[0], f"{kind}_end_bytes": values[-1],
                       f"{kind}_max_bytes": max(values), f"{kind}_growth_bytes": values[-1] - values[0]})
    return {**record, "peak_rss_bytes": peak_rss_bytes(), "readings": readings}
