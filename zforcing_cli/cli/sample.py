"""`zforcing sample`: free-running generation from the prior."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..checkpoint import load_model, resolve_checkpoint
from ..console import plural, stderr, stdout
from ..device import resolve_device
from ..fileio import check_can_write
from ..generate import sample_images
from ..threads import ThreadPolicy
from .common import RUNS_ROOT, CheckpointArgument, DeviceOption, SeedOption, ThreadsOption, check_real, usage_error

EPILOG = "**Example:** `zforcing sample --out digits.png --num 64 --seed 1`"


def sample_cli(
    checkpoint: CheckpointArgument = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output file: .png for images (.wav audio, .txt text in later versions).", show_default="samples.png")] = None,
    num: Annotated[int, typer.Option("--num", min=1, help="How many samples.")] = 64,
    seconds: Annotated[Optional[float], typer.Option("--seconds", min=0.0, help="Audio length (audio models).")] = None,
    length: Annotated[Optional[int], typer.Option("--length", min=1, help="Steps per sample (audio and text models).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Sharpen (<1) or flatten (>1) the output distribution.")] = 1.0,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Generate from the prior, free-running, and write what the model models (a PNG grid for images)."""
    check_real("--temperature", temperature, example="0.8", above=True)
    torch_device = resolve_device(device)
    folder = resolve_checkpoint(checkpoint, RUNS_ROOT)
    model, config = load_model(folder, torch_device)
    data = config["data"]
    out = out or Path("samples.png")
    if data["modality"] == "binary" and (seconds is not None or length is not None):
        raise usage_error("--seconds and --length do not apply to an image model.", "Images are always 28x28 = 784 pixels.")
    check_can_write(out, force)
    with ThreadPolicy(threads), stderr.status(f"Sampling {plural(num, 'sequence')} ..."):
        sample_images(model, data, out, num=num, temperature=temperature, seed=seed)
    stdout.print(escape(f"Wrote {plural(num, 'sample')} to {out}"), soft_wrap=True)
