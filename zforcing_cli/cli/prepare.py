"""`zforcing prepare`: raw corpus to prepared dataset."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..console import stderr, stdout
from ..data import AVAILABLE_KINDS, PLANNED_KINDS, prepare

EPILOG = (
    "**Examples:** `zforcing prepare mnist ~/data/binarized_mnist --out data/mnist` reads "
    "Larochelle's three .amat files; `zforcing prepare mnist embedded` writes out the copy in the package."
)


def prepare_cli(
    kind: Annotated[str, typer.Argument(help=f"Data kind: {', '.join(AVAILABLE_KINDS)} (coming: {', '.join(PLANNED_KINDS)}).")],
    source: Annotated[str, typer.Argument(help="Raw data: for mnist, the folder of Larochelle's .amat files, or `embedded`.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write. Default: data/KIND.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Read a raw corpus once into a prepared dataset folder (meta.json + memory-mapped arrays)."""
    out = out or Path("data") / kind
    started = time.perf_counter()
    with stderr.status(escape(f"Preparing {kind} from {source} ...")):
        dataset = prepare(kind, source, out, force=force)
    counts = ", ".join(f"{split} {count:,}" for split, count in dataset.meta.counts.items())
    stdout.print(escape(f"Prepared {kind} at {out} ({counts}) in {time.perf_counter() - started:.1f} s."), soft_wrap=True)
