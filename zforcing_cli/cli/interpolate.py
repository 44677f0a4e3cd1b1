"""`zforcing interpolate`: walk the latent space between two sentences."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..checkpoint import load_model, resolve_checkpoint
from ..errors import ZForcingError
from .common import RUNS_ROOT, SeedOption

EPILOG = '**Example:** `zforcing interpolate runs/imdb "this movie was great ." "i hated every minute ."`'


def interpolate_cli(
    checkpoint: Annotated[Path, typer.Argument(help="A run or checkpoint folder of a text model.")],
    sentence_a: Annotated[str, typer.Argument(help="First sentence.")],
    sentence_b: Annotated[str, typer.Argument(help="Second sentence.")],
    points: Annotated[int, typer.Option("--points", min=2, help="Mixing points from α=0 to α=1.")] = 11,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    seed: SeedOption = 0,
) -> None:
    """Walk the latent space between two sentences (the paper's Table 3) with a text model."""
    folder = resolve_checkpoint(checkpoint, RUNS_ROOT)
    model, config = load_model(folder, "cpu")
    raise ZForcingError(
        f"Interpolation needs a text model; {folder} models {config['data']['kind']} ({model.config.modality} data).",
        "Text models (zforcing prepare imdb / text) are not available in this version yet.",
    )
