"""What the command modules share: option types, the runs root and the usage-error helper."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..console import stderr
from ..cores import capped_threads
from ..errors import UsageError

RUNS_ROOT = Path("runs")
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]


def cap_threads(requested: int | None) -> int | None:
    """--threads, at most one per core, with a warning when it was more."""
    if requested is None:
        return None
    threads, warning = capped_threads(requested)
    if warning:
        warn(warning)
    return threads


def warn(message: str) -> None:
    """A `Warning:` line on stderr."""
    stderr.print(f"[yellow]Warning:[/] {escape(message)}", soft_wrap=True)


ThreadsOption = Annotated[
    Optional[int],
    typer.Option(
        "--threads", min=1, envvar="ZFORCING_THREADS", callback=cap_threads,
        help="CPU threads for torch, at most one per core (more are lowered to the cores, with a warning). Default: all cores when this is the only zforcing process, a fair share while others run (docs/performance.md).",
        show_default="auto",
    ),
]
CheckpointArgument = Annotated[
    Optional[Path],
    typer.Argument(help="A run folder or a checkpoint folder. Default: runs/latest.", show_default=False),
]


MAX_SEED = 2**64 - 1  # what numpy's and torch's seeding take
SeedOption = Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="Same seed, same numbers.")]


def check_real(option: str, value: float | None, low: float = 0.0, example: str = "", above: bool = False) -> None:
    """A real-valued option must be finite and at least `low` (above it, with above=True):
    typer's range check lets nan and inf through."""
    if value is None or (math.isfinite(value) and (value > low if above else value >= low)):
        return
    bound = f"above {low:g}" if above else f"{low:g} or more"
    raise usage_error(f"{option} must be a finite number {bound}, not {value}.", f"For example {option} {example}." if example else f"Give {option} a number {bound}.")


OUTPUT_NOISE_WORDS = {"mean": 0.0, "sample": 1.0}
DEFAULT_OUTPUT_NOISE = "mean"
OutputNoiseOption = Annotated[str, typer.Option(
    "--output-noise",
    help="Audio: how much of the output distribution's noise each frame gets. mean: none, each frame is the "
         "Gaussian's mean given the latents drawn from the prior (what sounds like speech: the full noise is white "
         "within each frame); sample: all of it, the model's faithful draw; or a number T, the noise's standard "
         "deviation times T (e.g. 0.3).")]


def output_noise_scale(text: str) -> float:
    """--output-noise as the scale of the output Gaussian's standard deviation: mean 0, sample 1, or T."""
    if text.strip().lower() in OUTPUT_NOISE_WORDS:
        return OUTPUT_NOISE_WORDS[text.strip().lower()]
    try:
        scale = float(text)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale) or scale < 0:
        raise usage_error(f"--output-noise must be mean, sample or a number 0 or more, not {text!r}.",
                          "For example --output-noise mean, --output-noise sample or --output-noise 0.3.")
    return scale


def exit_on_signal(number, frame) -> None:
    """A signal handler that unwinds the stack (finally blocks run, temporary outputs go) and
    exits with the shell's code for the signal, 128 + its number."""
    raise SystemExit(128 + number)


def announce_loop_builds() -> None:
    """Say on stderr when the compiled loops are built (about 20 s, once per machine), or why they
    cannot be (a build that failed before, once per process, with the command that retries it). The
    commands that run the model call it once their options and paths have passed their checks:
    it loads torch."""
    from .. import fused_cpu

    fused_cpu.build_notice = lambda text: stderr.print(escape(text), style="dim", soft_wrap=True)
    fused_cpu.warning_notice = lambda text: stderr.print(f"[yellow]Warning:[/] {escape(text)}", soft_wrap=True)


def usage_error(message: str, hint: str = "") -> UsageError:
    return UsageError(message, hint)
