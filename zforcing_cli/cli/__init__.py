"""The `zforcing` command: one module per command, each a thin wrapper that parses options,
calls the core and prints."""

from __future__ import annotations

import signal
from typing import Annotated, Callable, NamedTuple

import typer
from rich.markup import escape

from .. import fused_cpu
from ..allocator import keep_freed_memory
from ..console import CommandGroup, handle_errors, stderr, stdout
from ..version import __version__
from . import bench, compare, evaluate, interpolate, prepare, sample, train
from .common import exit_on_signal

app = typer.Typer(
    name="zforcing",
    cls=CommandGroup,
    help="Train, evaluate and sample the Z-Forcing stochastic recurrent model (Goyal et al., NIPS 2017).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def version_callback(value: bool) -> None:
    if value:
        stdout.print(f"zforcing {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Z-Forcing: stochastic recurrent networks trained with an auxiliary cost."""


class Command(NamedTuple):
    function: Callable[..., None]  # what typer calls, its parameters the command's options
    epilog: str  # the help's worked examples
    # What to lower when the command runs out of memory: the options its memory grows with
    # ("" for prepare and compare, which hold one file, or one run's metrics, at a time).
    memory_options: str


COMMANDS = {
    "prepare": Command(prepare.prepare_cli, prepare.EPILOG, ""),
    "train": Command(train.train_cli, train.EPILOG, "--batch-size (or take --preset small)"),
    "evaluate": Command(evaluate.evaluate_cli, evaluate.EPILOG, "--batch-size"),
    "sample": Command(sample.sample_cli, sample.EPILOG, "--num (or give a shorter --prompt)"),
    "interpolate": Command(interpolate.interpolate_cli, interpolate.EPILOG, "--points or --length"),
    "compare": Command(compare.compare_cli, compare.EPILOG, ""),
    "bench": Command(bench.bench_cli, bench.EPILOG, "--batch-size (or take --size small)"),
}
for name, command in COMMANDS.items():
    app.command(name, epilog=command.epilog)(handle_errors(command.function, command.memory_options))


def main(prog_name: str | None = None) -> None:
    """The command line; prog_name: the program its help names (by default, as click finds it)."""
    # SIGTERM unwinds like Ctrl-C, so that half-written outputs are cleaned up on the way out
    # (`zforcing train` replaces this with its own stop-after-the-update handler).
    signal.signal(signal.SIGTERM, exit_on_signal)
    keep_freed_memory()  # each training update reuses what the last one freed (allocator.py)
    fused_cpu.build_notice = lambda text: stderr.print(escape(text), style="dim", soft_wrap=True)
    fused_cpu.warning_notice = lambda text: stderr.print(f"[yellow]Warning:[/] {escape(text)}", soft_wrap=True)
    app(prog_name=prog_name)


if __name__ == "__main__":
    main()
