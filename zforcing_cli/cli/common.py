"""What the command modules share: option types, the runs root and the usage-error helper."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError

RUNS_ROOT = Path("runs")
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
ThreadsOption = Annotated[
    Optional[int],
    typer.Option(
        "--threads", min=1, envvar="ZFORCING_THREADS",
        help="CPU threads for torch. Default: all cores when this is the only zforcing process, a fair share while others run (docs/performance.md).",
        show_default="auto",
    ),
]
CheckpointArgument = Annotated[
    Optional[Path],
    typer.Argument(help="A run folder or a checkpoint folder. Default: runs/latest.", show_default=False),
]


def usage_error(message: str, hint: str = "") -> UsageError:
    return UsageError(message, hint)
