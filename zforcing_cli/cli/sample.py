"""`zforcing sample`: free-running generation from the prior (or an audio prompt's continuation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..checkpoint import load_model, resolve_checkpoint
from ..console import plural, stderr, stdout
from ..device import resolve_device
from ..errors import ZForcingError
from ..fileio import check_can_write
from ..generate import (
    OUTPUT_SUFFIXES,
    WHAT,
    AudioFormat,
    AudioSamples,
    audio_steps,
    sample_audio,
    sample_images,
)
from ..threads import ThreadPolicy
from .common import (
    RUNS_ROOT,
    CheckpointArgument,
    DeviceOption,
    SeedOption,
    ThreadsOption,
    check_real,
    usage_error,
)

EPILOG = (
    "**Examples:** `zforcing sample --out digits.png --num 64 --seed 1` · "
    "`zforcing sample runs/timit --out speech.wav --seconds 4 --num 3` · "
    "`zforcing sample runs/timit --out more.wav --prompt utterance.wav`"
)
DEFAULT_NUM = {"binary": 64, "frames": 1}
LISTED_FILES = 4  # more outputs than this are shown as first … last


def sample_cli(
    checkpoint: CheckpointArgument = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output file: .png for images; .wav for audio, with a PNG of its waveform and spectrogram beside it (.txt text in later versions).", show_default="samples.png or samples.wav")] = None,
    num: Annotated[int | None, typer.Option("--num", min=1, help="How many samples. Audio: one file each, numbered name-1.wav, name-2.wav, ...", show_default="64 images, 1 audio clip")] = None,
    seconds: Annotated[float | None, typer.Option("--seconds", help="Seconds of audio to generate per sample (audio models).", show_default="2")] = None,
    length: Annotated[int | None, typer.Option("--length", min=1, help="Steps per sample, instead of --seconds: frames for audio models.")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Sharpen (<1) or flatten (>1) the output distribution.")] = 1.0,
    prompt: Annotated[Path | None, typer.Option("--prompt", help="An audio file to continue (audio models): read, resampled to the model's rate, then continued; each output holds it followed by the continuation.", show_default=False)] = None,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing output files.")] = False,
) -> None:
    """Generate from the prior, free-running, and write what the model models: a PNG grid for images, WAV files for audio (optionally continuing a --prompt)."""
    check_real("--temperature", temperature, example="0.8", above=True)
    check_real("--seconds", seconds, example="2", above=True)
    if seconds is not None and length is not None:
        raise usage_error("--seconds and --length both set how much to generate; give one of them.", "For example --seconds 2, or --length 160 (frames).")
    torch_device = resolve_device(device)
    folder = resolve_checkpoint(checkpoint, RUNS_ROOT)
    model, config = load_model(folder, torch_device)
    data = config["data"]
    modality = data["modality"]
    if modality not in DEFAULT_NUM:
        raise ZForcingError(f"Sampling {WHAT[modality]} is not available in this version yet.", "Sample an image or an audio model.")
    out = out or Path(f"samples{OUTPUT_SUFFIXES[modality]}")
    num = num or DEFAULT_NUM[modality]
    if modality == "frames":
        audio = AudioFormat.of(data)
        steps = audio_steps(audio, seconds, length)
        what = f"{plural(num, 'clip')} of {audio.seconds(steps):g} s" + (" after the prompt" if prompt else "")
        with ThreadPolicy(threads), stderr.status(f"Generating {what} ..."):
            result = sample_audio(model, data, out, num=num, steps=steps, temperature=temperature, seed=seed, prompt=prompt, force=force)
        report_audio(result)
        return
    check_image_options(prompt, seconds, length)
    check_can_write(out, force)
    with ThreadPolicy(threads), stderr.status(f"Sampling {plural(num, 'sequence')} ..."):
        sample_images(model, data, out, num=num, temperature=temperature, seed=seed)
    stdout.print(escape(f"Wrote {plural(num, 'sample')} to {out}"), soft_wrap=True)


def check_image_options(prompt: Path | None, seconds: float | None, length: int | None) -> None:
    if prompt is not None:
        raise usage_error("--prompt does not apply to an image model.", "Image models sample whole images from scratch; --prompt continues audio with an audio model.")
    if seconds is not None or length is not None:
        raise usage_error("--seconds and --length do not apply to an image model.", "Images are always 28x28 = 784 pixels.")


def report_audio(result: AudioSamples) -> None:
    each = f"{result.seconds:g} s each" + (f", the first {result.prompt_seconds:g} s the prompt" if result.prompt_seconds else "")
    stdout.print(escape(f"Wrote {plural(len(result.paths), 'sample')} ({each}) to {list_files(result.paths)}"), soft_wrap=True)
    stdout.print(escape(f"Waveform and spectrogram beside each: {list_files(result.plots)}"), soft_wrap=True)
    stderr.print(
        f"Generated {result.generated_seconds:.3g} s of audio in {result.wall_seconds:.3g} s: "
        f"{result.real_time_factor:.3g}× real time", soft_wrap=True,
    )


def list_files(paths: list[Path]) -> str:
    """'a.wav', 'a-1.wav, a-2.wav, a-3.wav' or, for many, 'a-01.wav … a-64.wav'."""
    if len(paths) <= LISTED_FILES:
        return ", ".join(str(path) for path in paths)
    return f"{paths[0]} … {paths[-1]}"
