"""Terminal output: progress and errors on stderr, results on stdout. Only this module and
cli.py import rich.

Under torchrun every rank runs the command: the other ranks' errors name their rank, and those
all ranks meet alike (a wrong command line) are left to rank 0 to report."""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from typer.core import TyperGroup

from .launch import PeerFailed, launched_rank
from .errors import UsageError, ZForcingError, file_system_error, is_out_of_memory, out_of_memory_error, wrapped_os_error
from .humanize import duration, plural  # noqa: F401 - the command modules take them from here too

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)
# A progress line written to a log file is as wide as it needs to be: at rich's default 80
# columns it would be cut short ("300/3…").
LOG_WIDTH = 400
DEBUG_VARIABLE = "ZFORCING_DEBUG"

F = TypeVar("F", bound=Callable)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def print_error(message: str, hint: str = "") -> None:
    rank = launched_rank()
    if rank:
        message = f"rank {rank}: {message}"
    stderr.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        stderr.print(f"[dim]Hint:[/] {escape(hint)}", soft_wrap=True)


def handle_errors(command: F, memory_options: str = "") -> F:
    """Expected failures become one `Error:` line plus a hint and exit 1; ZFORCING_DEBUG=1
    shows the traceback instead. Running out of memory is expected too: its hint names
    memory_options, the options that size the command's work."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except PeerFailed as error:  # rank 0 reports it
            raise typer.Exit(error.exit_code) from None
        except ZForcingError as error:
            fail(error)
        except OSError as error:
            fail(file_system_error(error))
        except KeyboardInterrupt:
            print_error("Interrupted.", "Outputs are written whole or not at all: nothing half-written was left behind.")
            raise typer.Exit(130) from None
        except Exception as error:  # noqa: BLE001 - the last line of defence for the user
            if is_out_of_memory(error):
                fail(out_of_memory_error(error, memory_options))
            if (os_error := wrapped_os_error(error)) is not None:  # a library's wrapping of a full disk, say
                fail(file_system_error(os_error))
            if debug_enabled():
                raise
            print_error(
                f"Unexpected {type(error).__name__}: {error}",
                f"This is a bug in zforcing; run again with {DEBUG_VARIABLE}=1 for the traceback and report it.",
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def fail(error: ZForcingError) -> None:
    if debug_enabled():
        traceback.print_exc(file=sys.stderr)
    if not (isinstance(error, UsageError) and launched_rank()):
        print_error(error.message, error.hint)
    raise typer.Exit(error.exit_code) from None


class CommandGroup(TyperGroup):
    """The app's command group: a wrong command line (unknown option, value out of range) is
    reported like every other error, one `Error:` line and a hint, exit 2, with no usage box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            print_error("Aborted.", "Nothing was changed.")
            sys.exit(1)
        except typer.TyperException as error:  # typer's usage errors (click's, vendored)
            context = getattr(error, "ctx", None)
            command = context.command_path if context is not None else "zforcing"
            if error.format_message() and not launched_rank():  # empty when the help was shown for a bare command
                print_error(error.format_message(), f"Run `{command} --help` for the options.")
            sys.exit(getattr(error, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)

    def get_params(self, ctx):
        return without_flag_types(super().get_params(ctx))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            without_flag_types(command.get_params(ctx))
        return command


def without_flag_types(params: list) -> list:
    """A flag takes no value, so the help shows no type beside it (typer would write `<bool>`):
    its metavar, which the help shows in place of the type, is made empty. --help is among
    params, which get_params makes once per command."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


def progress_console() -> Console:
    """stderr, as wide as a progress line needs when it is not a terminal."""
    return stderr if stderr.is_terminal else Console(stderr=True, highlight=False, width=LOG_WIDTH)


def training_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=progress_console(),
        transient=False,
    )


class JobProgress:
    """How far a long job is, on stderr: on a terminal a bar with the share done, what is
    done, the time elapsed and an ETA; elsewhere (a log file, CI), where rich would draw
    nothing until the end, a plain line every LOG_SECONDS.

    Once the job has run MEASURE_SECONDS, its estimate is said off a terminal, and announced
    everywhere as a warning, with `shorten` (what would make it shorter), when it exceeds
    LONG_JOB_SECONDS. Use it as a context manager; call it with (done, total, detail), done
    and total in any one unit (None for a total not known yet), detail saying what is done.
    """

    LOG_SECONDS = 30.0
    MEASURE_SECONDS = 2.0
    LONG_JOB_SECONDS = 24 * 3600.0

    def __init__(self, description: str, shorten: str = ""):
        self.description = description
        self.shorten = shorten
        self.bar = Progress(
            TextColumn(f"[bold]{escape(description)}"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=stderr, transient=True,
            disable=not stderr.is_terminal,
        )
        self.task = self.bar.add_task(description, total=None, detail="")
        self.started = self.last_line = time.perf_counter()
        self.estimated = False

    def __enter__(self) -> "JobProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.__exit__(*exc_info)

    def __call__(self, done: float, total: float | None, detail: str = "") -> None:
        self.bar.update(self.task, completed=done, total=total, detail=escape(detail))
        now = time.perf_counter()
        elapsed = now - self.started
        remaining = elapsed / done * (total - done) if total and 0 < done < total else None
        if not self.estimated and remaining is not None and elapsed >= self.MEASURE_SECONDS:
            self.estimated = True
            self.announce(remaining)
        if not stderr.is_terminal and now - self.last_line >= self.LOG_SECONDS:
            self.last_line = now
            self.say(self.line(done, total, detail, elapsed, remaining))

    def announce(self, remaining: float) -> None:
        if remaining > self.LONG_JOB_SECONDS:
            advice = f"; {self.shorten}" if self.shorten else ""
            self.bar.console.print(
                f"[yellow]Warning:[/] {escape(f'{self.description} will take about {duration(remaining)} more at its speed so far{advice}.')}",
                soft_wrap=True,
            )
        elif not stderr.is_terminal:
            self.say(f"{self.description}: about {duration(remaining)} to go.")

    def line(self, done: float, total: float | None, detail: str, elapsed: float, remaining: float | None) -> str:
        parts = [f"{100 * done / total:.0f}%"] if total else []
        parts += [detail] if detail else []
        parts.append(f"{duration(elapsed)} so far" + ("" if remaining is None else f", about {duration(remaining)} to go"))
        return f"{self.description}: {', '.join(parts)}"

    def say(self, text: str) -> None:
        self.bar.console.print(escape(text), soft_wrap=True)


def results_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(escape(name), escape(value))  # "E_q[z]" is text, not rich markup
    return table
