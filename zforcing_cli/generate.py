"""Free-running generation from the prior, written as what the model models."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import ZForcingError
from .model import ZForcing
from .plots import image_grid, write_png

OUTPUT_SUFFIXES = {"binary": ".png", "frames": ".wav", "tokens": ".txt"}
WHAT = {"binary": "binary images (PNG grid)", "frames": "audio (WAV)", "tokens": "text (lines of text)"}


class SampleError(ZForcingError):
    pass


def check_output_suffix(out: Path, modality: str) -> None:
    expected = OUTPUT_SUFFIXES[modality]
    if out.suffix.lower() != expected:
        raise SampleError(
            f"This model generates {WHAT[modality]}; it cannot write {out.name!r}.",
            f"Give --out a {expected} file name, e.g. --out samples{expected}.",
        )


def sample_images(
    model: ZForcing,
    data: dict,
    out: Path,
    num: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
) -> Path:
    """Sample `num` images pixel by pixel and write them as one PNG grid."""
    check_output_suffix(out, data["modality"])
    height, width = data["image_shape"]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    model.train(False)
    pixels = model.generate(num, height * width, temperature=temperature, generator=generator)
    images = pixels.view(num, height, width).float().cpu().numpy()
    columns = math.ceil(math.sqrt(num))
    write_png(out, image_grid(images, columns), scale=2)
    return out
