"""The `zforcing` command: one module per command, each a thin wrapper that parses options,
calls the core and prints."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from ..version import __version__
from ..allocator import keep_freed_memory
from ..console import CommandGroup, handle_errors, stdout
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


COMMANDS = {
    "prepare": prepare, "train": train, "evaluate": evaluate, "sample": sample, "interpolate": interpolate,
    "compare": compare, "bench": bench,
}
# What to lower when a command runs out of memory: the options its memory grows with (prepare
# and compare hold one file, or one run's metrics, at a time: no option sizes them).
MEMORY_OPTIONS = {
    "prepare": "", "train": "--batch-size (or take --preset small)", "evaluate": "--batch-size",
    "sample": "--num (or give a shorter --prompt)", "interpolate": "--points or --length",
    "compare": "", "bench": "--batch-size (or take --size small)",
}
for name, module in COMMANDS.items():
    app.command(name, epilog=module.EPILOG)(handle_errors(getattr(module, f"{name}_cli"), MEMORY_OPTIONS[name]))


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so that half-written outputs are cleaned up on the way out
    # (`zforcing train` replaces this with its own stop-after-the-update handler).
    signal.signal(signal.SIGTERM, exit_on_signal)
    keep_freed_memory()  # each training update reuses what the last one freed (allocator.py)
    app()


if __name__ == "__main__":
    main()
