"""`zforcing bench`: training speed side by side with the autograd reference and a fused LSTM
pair, sampling, loading and memory (bench/speed.py); host memory on a Blizzard-sized dataset
(bench/memory.py); CPU trainings sharing the machine (bench/sharing.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..bench.defaults import DEFAULT_BATCHES, DEFAULT_HOURS, DEFAULT_UPDATES, SIZES, SYNTHETIC_SEQUENCES
from ..console import JobProgress, plural, results_table, stderr, stdout
from ..fileio import json_record
from .common import DeviceOption, ThreadsOption, announce_loop_builds, check_real, usage_error

EPILOG = (
    "**Examples:** `zforcing bench --preset timit` times a training update at the paper's TIMIT size against the "
    "autograd reference and a fused LSTM pair; `zforcing bench --preset blizzard --device cuda --json`; "
    "`zforcing bench --hidden-size 128 --mlp-size 128 --batch-size 64` times MNIST at other sizes; "
    "`zforcing bench --memory` trains on a sparse 300-hour dataset and shows host memory staying flat; "
    "`zforcing bench --processes 2 --seconds 20` measures two trainings sharing the CPU. docs/performance.md "
    "explains each figure."
)
DEFAULT_SECONDS = 30.0
NAMES = {
    "fused": "fused recurrence",
    "reference": "autograd reference",
    "fused_lstm_pair": "fused LSTM pair",
}


# The options (those several commands share are common.py's).
BenchPresetOption = Annotated[
    str | None,
    typer.Option(
        "--preset", show_default="mnist; blizzard with --memory",
        help=(
            "Model and data shape: mnist (binarized MNIST, 784 steps), timit (frames of 200 samples, 40 steps, "
            "batch 32), blizzard (the same frames, batch 128), imdb (a 16,004-word vocabulary, sentences of 16 "
            "steps)."
        ),
    ),
]
SizeOption = Annotated[
    str | None,
    typer.Option(
        "--size", show_default="paper for timit, blizzard and imdb; small for mnist and with --memory",
        help=(
            f"Model sizes: {', '.join(SIZES)}. small and paper are the training presets'; tiny only checks that the "
            "benchmark runs (its figures mean nothing)."
        ),
    ),
]
HiddenSizeOption = Annotated[
    int | None,
    typer.Option(
        "--hidden-size", min=1, show_default="the size's",
        help="Units of both LSTMs in place of the size's (the fused LSTM pair's follow).",
    ),
]
MlpSizeOption = Annotated[
    int | None,
    typer.Option(
        "--mlp-size", min=1, show_default="the size's",
        help="Hidden units of every MLP head in place of the size's.",
    ),
]
BatchSizeOption = Annotated[
    int | None,
    typer.Option(
        "--batch-size", min=1, max=SYNTHETIC_SEQUENCES, show_default="the size's",
        help="Sequences per update in place of the size's.",
    ),
]
UpdatesOption = Annotated[
    int | None,
    typer.Option(
        "--updates", min=1, show_default=str(DEFAULT_UPDATES),
        help="Timed updates of each implementation after a warm-up one; their median is reported.",
    ),
]
MemoryOption = Annotated[
    bool,
    typer.Option(
        "--memory",
        help=(
            "Measure host memory instead: random batches from a sparse memory-mapped audio dataset of --hours, "
            "with a training update every few batches."
        ),
    ),
]
HoursOption = Annotated[
    float | None,
    typer.Option(
        "--hours", show_default=f"{DEFAULT_HOURS:g}, Blizzard's 34.6 GB",
        help=(
            "With --memory: hours of 16 kHz int16 audio in the dataset (2 bytes a sample; it takes no disk "
            "space)."
        ),
    ),
]
BatchesOption = Annotated[
    int | None,
    typer.Option(
        "--batches", min=1, show_default=str(DEFAULT_BATCHES),
        help="With --memory: random batches fetched.",
    ),
]
ProcessesOption = Annotated[
    int | None,
    typer.Option(
        "--processes", min=1, show_default=False,
        help=(
            "Measure N CPU trainings at once against one alone instead (the thread policy of "
            "docs/performance.md)."
        ),
    ),
]
SecondsOption = Annotated[
    float | None,
    typer.Option(
        "--seconds", show_default=f"{DEFAULT_SECONDS:g}",
        help="With --processes: how long each measurement trains.",
    ),
]
DirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir", show_default="the temporary folder",
        help="Where the temporary datasets go; they are removed at the end, also on Ctrl-C.",
    ),
]
Tf32Option = Annotated[
    bool,
    typer.Option(
        "--tf32",
        help=(
            "On a GPU, time every implementation with float32 products on TensorFloat-32 tensor cores, as `train "
            "--precision tf32` runs them (without it, cuBLAS's products are plain float32 while cuDNN's LSTM "
            "already uses TF32, torch's default)."
        ),
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the figures as JSON on stdout.",
    ),
]


def bench_cli(
    preset: BenchPresetOption = None,
    size: SizeOption = None,
    hidden_size: HiddenSizeOption = None,
    mlp_size: MlpSizeOption = None,
    batch_size: BatchSizeOption = None,
    updates: UpdatesOption = None,
    memory: MemoryOption = False,
    hours: HoursOption = None,
    batches: BatchesOption = None,
    processes: ProcessesOption = None,
    seconds: SecondsOption = None,
    folder: DirOption = None,
    tf32: Tf32Option = False,
    as_json: JsonOption = False,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Measure speed and memory on this machine: a training update against the autograd reference and a fused LSTM pair, sampling, batch loading, peak memory; or host memory on a Blizzard-sized dataset (--memory)."""
    check_options(memory, processes, device, hours=hours, batches=batches, seconds=seconds, updates=updates, tf32=tf32 or None,
                  hidden_size=hidden_size, mlp_size=mlp_size, batch_size=batch_size)
    check_real("--seconds", seconds, example="20", above=True)
    preset = preset or ("blizzard" if memory else "mnist")
    announce_loop_builds()
    from ..bench import Resize, bench_shared, run_memory, run_speed
    from ..threads import ThreadPolicy

    if processes is not None:
        result = bench_shared(processes, seconds or DEFAULT_SECONDS, threads, preset, size, folder)
        print_result(result, as_json, shared_table)
        return
    with ThreadPolicy(threads):
        if memory:
            result = run_memory(preset, size, device, DEFAULT_HOURS if hours is None else hours, batches or DEFAULT_BATCHES,
                                folder, say)
        else:
            with JobProgress("Timing updates", shorten="time fewer with --updates") as progress:
                result = run_speed(preset, size, device, updates or DEFAULT_UPDATES, folder, say, tf32,
                                   Resize(hidden_size, mlp_size, batch_size), counted_updates(progress))
    print_result(result, as_json, memory_tables if memory else speed_tables)


def check_options(memory: bool, processes: int | None, device: str, **given) -> None:
    """Options that belong to another benchmark are refused, not ignored."""
    if memory and processes is not None:
        raise usage_error("--memory and --processes are two different benchmarks.", "Give one of them.")
    owners = {"hours": "--memory", "batches": "--memory", "seconds": "--processes"}
    for name, owner in owners.items():
        if given[name] is not None and not (memory if owner == "--memory" else processes is not None):
            raise usage_error(f"--{name} applies only with {owner}.", f"Add {owner}, or leave --{name} out.")
    speed_only = {"updates": "sets the speed benchmark's timed updates", "tf32": "sets the speed benchmark's GPU products",
                  **dict.fromkeys(("hidden_size", "mlp_size", "batch_size"), "resizes the speed benchmark's model")}
    for name, what in speed_only.items():
        if given[name] is not None and (memory or processes is not None):
            option = "--" + name.replace("_", "-")
            raise usage_error(f"{option} {what}; it does not apply with --memory or --processes.", f"Leave {option} out.")
    if processes is not None and device not in ("auto", "cpu"):
        raise usage_error("--processes measures CPU trainings sharing the cores; it runs on the CPU.", "Leave --device out.")


def counted_updates(progress: JobProgress):
    """run_speed's counted(done, total), shown by a JobProgress."""
    return lambda done, total: progress(done, total, f"{done:,} of {total:,} updates")


def say(message: str) -> None:
    stderr.print(escape(message), style="dim", soft_wrap=True)


def print_result(result: dict, as_json: bool, tables) -> None:
    if as_json:
        stdout.print_json(json.dumps(json_record(result), allow_nan=False))
        return
    for table in tables(result):
        stdout.print(table)


def machine_line(machine: dict) -> str:
    where = machine["gpu"] or f"{machine['cpu']}, {plural(machine['cores'], 'core')}"
    return f"{where}; torch {machine['torch']} on {plural(machine['threads'], 'thread')}, Python {machine['python']}"


def megabytes(count: int | None) -> str:
    return "—" if count is None else f"{count / 1e6:,.0f} MB"


def speed_tables(result: dict) -> list[Table]:
    from ..bench.speed import IMPLEMENTATIONS

    cuda = result["update_memory_bytes_fused"] is not None
    table = Table(title=escape(f"{result['preset']} ({result['size']}): batch {result['batch_size']} × {result['steps']} steps, "
                               f"LSTMs {result['hidden_size']:,}, MLPs {result['mlp_size']:,}, {result['parameters']:,} parameters, "
                               f"{result['device']}{' (TF32 products)' if result['tf32'] else ''}; median of "
                               f"{plural(result['updates'], 'update')} after a warm-up"),
                  caption=escape(machine_line(result["machine"])), title_justify="left", header_style="bold")
    table.add_column("training update")
    for name in ("ms", "sequences/s", "÷ pair", *(["extra memory"] if cuda else [])):
        table.add_column(name, justify="right")
    floor = result["update_ms_fused_lstm_pair"]
    for name in IMPLEMENTATIONS:
        ms = result[f"update_ms_{name}"]
        memory = [megabytes(result[f"update_memory_bytes_{name}"])] if cuda else []
        table.add_row(NAMES[name], f"{ms:,.1f}", f"{result['batch_size'] / ms * 1e3:,.1f}", f"{ms / floor:.2f}", *memory)
    rows = [("the fused update's recurrence", result["loops"]),
            ("reference ÷ fused", f"{result['ratio_reference_vs_fused']:.2f}"),
            (f"sampling {result['sample_sequences']} at once, sequences/s", f"{result['sample_sequences_per_s']:,.1f}")]
    if result["sample_x_real_time"] is not None:
        rows.append(("sampling, × real time", f"{result['sample_x_real_time']:,.1f}"))
    rows += [(f"random batch of {result['batch_size']} from the memory-mapped set, ms", f"{result['batch_fetch_ms']:,.3f}"),
             (f"peak memory ({result['peak_memory_measure']})", megabytes(result["peak_memory_bytes"]))]
    return [table, results_table("", rows)]


def memory_tables(result: dict) -> list[Table]:
    table = Table(title=escape(f"host memory: {result['hours']:g} h of {result['preset']} audio "
                               f"({result['dataset_bytes'] / 1e9:,.1f} GB, {megabytes(result['dataset_allocated_bytes'])} on disk), "
                               f"batches of {result['batch_size']}"),
                  caption=escape(machine_line(result["machine"])), title_justify="left", header_style="bold")
    for name in ("batches", "seconds", "RssAnon", "RssFile", "RssShmem"):
        table.add_column(name, justify="right")
    for reading in result["readings"]:
        table.add_row(f"{reading['batches']:,}", f"{reading['seconds']:,.1f}", megabytes(reading["rss_anon_bytes"]),
                      megabytes(reading["rss_file_bytes"]), megabytes(reading["rss_shmem_bytes"]))
    rows = [
        ("data read by the batches", megabytes(result["bytes_read"])),
        ("RssAnon growth (what the process holds)", megabytes(result["rss_anon_growth_bytes"])),
        ("RssFile growth (page cache the kernel can drop)", megabytes(result["rss_file_growth_bytes"])),
        ("training updates", f"{result['updates']:,}"),
        ("peak RSS", megabytes(result["peak_rss_bytes"])),
    ]
    return [table, results_table("", rows)]


def shared_table(result: dict) -> list[Table]:
    rows = [(key.replace("_", " "), formatted(value)) for key, value in result.items()]
    return [results_table(f"{plural(result['processes'], 'training')} sharing the CPU", rows)]


def formatted(value) -> str:
    if isinstance(value, list):
        return ", ".join(formatted(item) for item in value)
    return f"{value:,.2f}" if isinstance(value, float) else str(value)
