"""`zforcing interpolate`: walk the latent space between two sentences (the paper's Table 3)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..checkpoint import load_model, resolve_checkpoint
from ..console import JobProgress, stdout
from ..errors import ZForcingError
from ..sentence_defaults import DEFAULT_LENGTH, INTERPOLATION_TOP_K
from .common import RUNS_ROOT, DeviceOption, SeedOption, ThreadsOption, announce_loop_builds, check_real
from .sample import warn_unknown

EPILOG = ('**Example:** `zforcing interpolate runs/imdb "this movie was great ." "i hated every minute of it ."` '
          "prints α, the greedy decoding and a sampled one for α = 0, 0.1, ..., 1; `--json` gives the same as a list.")


def interpolate_cli(
    checkpoint: Annotated[Path, typer.Argument(help="A run or checkpoint folder of a text model.")],
    sentence_a: Annotated[str, typer.Argument(help="First sentence (α = 0).")],
    sentence_b: Annotated[str, typer.Argument(help="Second sentence (α = 1).")],
    points: Annotated[int, typer.Option("--points", min=2, max=1001, help="Mixing points from α=0 to α=1.")] = 11,
    length: Annotated[int, typer.Option("--length", min=1, help="The most tokens decoded per sentence.")] = DEFAULT_LENGTH,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="The sampled column draws from the K most likely tokens.")] = INTERPOLATION_TOP_K,
    temperature: Annotated[float, typer.Option("--temperature", help="Temperature of the sampled column.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout: a list of {alpha, greedy, sampled}.")] = False,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Mix the posterior latents of two sentences and decode each mix (the paper's Table 3)."""
    check_real("--temperature", temperature, example="0.8", above=True)
    folder = resolve_checkpoint(checkpoint, RUNS_ROOT)
    announce_loop_builds()
    from ..device import resolve_device
    from ..sentences import TextVocabulary, interpolate
    from ..threads import ThreadPolicy

    torch_device = resolve_device(device)
    model, config = load_model(folder, torch_device)
    if not model.config.latent:
        raise ZForcingError("The model has no latent (it was trained with --no-latent): there are no latents to interpolate.",
                            "Interpolate with a Z-Forcing model; `zforcing sample --prompt` continues a sentence with this one.")
    vocabulary = TextVocabulary.of(config["data"])
    with ThreadPolicy(threads), JobProgress("Decoding the mixes", shorten="ask for fewer --points") as progress:
        rows = interpolate(model, vocabulary, sentence_a, sentence_b, points=points, length=length, top_k=top_k,
                           temperature=temperature, seed=seed,
                           progress=lambda done, total: progress(done, total, f"{done:,} of {total:,} decodings"))
    warn_unknown(vocabulary)
    if as_json:
        stdout.print_json(json.dumps([asdict(row) for row in rows]))
        return
    table = Table(title=escape(f"{sentence_a}  →  {sentence_b}"), title_justify="left")
    table.add_column("α", justify="right")
    table.add_column("greedy")
    table.add_column(f"sampled (top-{top_k})")
    for row in rows:
        table.add_row(f"{row.alpha:.2g}", escape(row.greedy), escape(row.sampled))
    stdout.print(table)
