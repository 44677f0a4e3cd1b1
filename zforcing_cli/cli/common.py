"""What the command modules share: option types, the runs root and the usage-error helper."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import print_error

RUNS_ROOT = Path("runs")
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
CheckpointArgument = Annotated[
    Optional[Path],
    typer.Argument(help="A run folder or a checkpoint folder. Default: runs/latest.", show_default=False),
]


def usage_error(message: str, hint: str = "") -> typer.Exit:
    print_error(message, hint)
    return typer.Exit(2)
