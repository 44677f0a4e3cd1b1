"""`zforcing sample`: free-running generation from the prior (or the continuation of an audio or text prompt)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from ..checkpoint import load_model, resolve_checkpoint
from ..console import JobProgress, plural, stderr, stdout
from ..fileio import atomic_file, check_can_write
from ..sentence_defaults import DEFAULT_LENGTH
from .common import (
    RUNS_ROOT,
    CheckpointArgument,
    DEFAULT_OUTPUT_NOISE,
    DeviceOption,
    OutputNoiseOption,
    SeedOption,
    ThreadsOption,
    announce_loop_builds,
    check_real,
    output_noise_scale,
    usage_error,
)

if TYPE_CHECKING:  # the core is imported once the options and paths are checked: it loads torch
    from ..generate import AudioFormat, AudioSamples
    from ..sentences import Decoding, TextVocabulary

EPILOG = (
    "**Examples:** `zforcing sample --out digits.png --num 64 --seed 1` · "
    "`zforcing sample runs/timit --out speech.wav --seconds 4 --num 3` · "
    "`zforcing sample runs/timit --out more.wav --prompt utterance.wav` · "
    "`zforcing sample runs/imdb --num 5 --top-p 0.9` · `zforcing sample runs/imdb --prompt \"this movie\" --greedy`"
)
DEFAULT_NUM = {"binary": 64, "frames": 1, "tokens": 10}
LISTED_FILES = 4  # more outputs than this are shown as first … last


def sample_cli(
    checkpoint: CheckpointArgument = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output file: .png for images; .wav for audio, with a PNG of its waveform and spectrogram beside it; .txt for text (one sentence per line; without --out, text goes to stdout).", show_default="samples.png or samples.wav; text: stdout")] = None,
    num: Annotated[int | None, typer.Option("--num", min=1, help="How many samples. Audio: one file each, numbered name-1.wav, name-2.wav, ...", show_default="64 images, 1 audio clip, 10 sentences")] = None,
    seconds: Annotated[float | None, typer.Option("--seconds", help="Seconds of audio to generate per sample (audio models).", show_default="2")] = None,
    length: Annotated[int | None, typer.Option("--length", min=1, help="Steps per sample, instead of --seconds: frames for audio models; for text, the most tokens generated per sentence (default 20).")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Images and text: sharpen (<1) or flatten (>1) the output distribution. Audio: see --output-noise.", show_default="1")] = None,
    output_noise: OutputNoiseOption = DEFAULT_OUTPUT_NOISE,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Audio models: an audio file to continue (read, resampled to the model's rate, then continued; each output holds it followed by the continuation). Text models: the words each sentence begins with, e.g. \"this movie\".", show_default=False)] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Text: sample from the K most likely tokens only (0: all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Text: sample from the smallest set of tokens holding probability P (nucleus sampling; 1: all).")] = 1.0,
    greedy: Annotated[bool, typer.Option("--greedy", help="Text: take the most likely token at each step (the latents are still drawn from the prior).")] = False,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing output files.")] = False,
) -> None:
    """Generate from the prior, free-running, and write what the model models: a PNG grid for images, WAV files for audio, sentences for text (optionally continuing a --prompt)."""
    check_real("--temperature", temperature, example="0.8", above=True)
    noise = output_noise_scale(output_noise)
    check_real("--seconds", seconds, example="2", above=True)
    if seconds is not None and length is not None:
        raise usage_error("--seconds and --length both set how much to generate; give one of them.", "For example --seconds 2, or --length 160 (frames).")
    folder = resolve_checkpoint(checkpoint, RUNS_ROOT)
    announce_loop_builds()
    from ..device import resolve_device
    from ..generate import OUTPUT_SUFFIXES, AudioFormat, audio_steps, check_image_count, sample_audio, sample_images
    from ..sentences import Decoding
    from ..threads import ThreadPolicy

    torch_device = resolve_device(device)
    model, config = load_model(folder, torch_device)
    data = config["data"]
    modality = data["modality"]
    num = num or DEFAULT_NUM[modality]
    if modality == "tokens":
        check_text_options(seconds, prompt)
        check_output_noise(output_noise, "text")
        decoding = Decoding(greedy=greedy, temperature=1.0 if temperature is None else temperature, top_k=top_k, top_p=top_p,
                            min_tokens=data["text"]["min_tokens"])
        decoding.check()
        write_sentences(model, data, out, num, decoding, length or DEFAULT_LENGTH, prompt, seed, threads, force)
        return
    if greedy or top_k or top_p != 1.0:
        raise usage_error("--greedy, --top-k and --top-p apply to text models only.", "Leave them out, or use --temperature.")
    out = out or Path(f"samples{OUTPUT_SUFFIXES[modality]}")
    if modality == "frames":
        check_audio_temperature(temperature)
        audio = AudioFormat.of(data)
        steps = audio_steps(audio, seconds, length)
        what = f"{plural(num, 'clip')} of {audio.seconds(steps):g} s" + (" after the prompt" if prompt else "")
        with ThreadPolicy(threads), JobProgress(f"Generating {what}", shorten=SHORTEN_AUDIO) as progress:
            result = sample_audio(model, data, out, num=num, steps=steps, output_noise=noise, seed=seed,
                                  prompt=audio_prompt(prompt), force=force, progress=audio_progress(progress))
        report_audio(result)
        return
    check_image_options(prompt, seconds, length)
    check_output_noise(output_noise, "image")
    check_image_count(num)
    check_can_write(out, force)
    with ThreadPolicy(threads), JobProgress(f"Sampling {plural(num, 'image')}", shorten="ask for fewer with --num") as progress:
        sample_images(model, data, out, num=num, temperature=1.0 if temperature is None else temperature, seed=seed,
                      progress=lambda done, total: progress(done, total, f"{done:,} of {total:,} images"))
    stdout.print(escape(f"Wrote {plural(num, 'sample')} to {out}"), soft_wrap=True)


def check_output_noise(output_noise: str, kind: str) -> None:
    if output_noise != DEFAULT_OUTPUT_NOISE:
        raise usage_error(f"--output-noise applies to audio models; this is a{'n' if kind[0] in 'aeiou' else ''} {kind} model.",
                          "Leave it out; --temperature sharpens or flattens its output distribution.")


def check_audio_temperature(temperature: float | None) -> None:
    """Audio's noise is set by --output-noise, a scale of its standard deviation (--temperature T
    was its variance: --output-noise sqrt(T))."""
    if temperature is not None:
        raise usage_error("--temperature does not apply to an audio model: its output noise is set by --output-noise.",
                          f"For the draw --temperature {temperature:g} gave, use --output-noise {temperature ** 0.5:.3g}.")


SHORTEN_AUDIO = "ask for less with --seconds or --num"


def audio_progress(progress: JobProgress) -> Callable[[float, int], None]:
    """sample_audio's progress in clips (a clip being generated counts in part), shown as the
    clips written whole."""
    return lambda done, total: progress(done, total, f"{int(done):,} of {total:,} clips written")


def check_text_options(seconds: float | None, prompt: str | None) -> None:
    from ..data.audio import AUDIO_EXTENSIONS

    if seconds is not None:
        raise usage_error("--seconds applies to audio models only.", "For text, --length sets the most tokens per sentence.")
    if prompt is not None and (Path(prompt).suffix.lower() in AUDIO_EXTENSIONS or names_file(prompt)):
        raise usage_error(
            f"--prompt {prompt} names a file, but this is a text model: its prompt is the words each sentence begins with.",
            "For example --prompt \"this movie\"; an audio file is a prompt for an audio model.",
        )


def names_file(text: str) -> bool:
    """Whether text is the path of a file; a long sentence is a name too long for the file
    system, not an error."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def audio_prompt(prompt: str | None) -> Path | None:
    """An audio model's prompt: the audio file to continue; words are another model's prompt."""
    from ..data.audio import AUDIO_EXTENSIONS

    if prompt is None:
        return None
    path = Path(prompt)
    if not names_file(prompt) and path.suffix.lower() not in AUDIO_EXTENSIONS:
        raise usage_error(
            f"--prompt {prompt!r} is not an audio file, and this is an audio model: its prompt is an audio file to continue.",
            "Give --prompt the path of a WAV, FLAC, MP3, ... file; words are a prompt for a text model.",
        )
    return path


def write_sentences(model, data: dict, out: Path | None, num: int, decoding: Decoding, length: int, prompt: str | None,
                    seed: int, threads: int | None, force: bool) -> None:
    """Sentences to stdout as they come, or one per line to a .txt file, streamed and written
    whole or not at all."""
    from ..generate import check_output_suffix
    from ..sentences import TextVocabulary, check_length, sentence_chunks
    from ..threads import ThreadPolicy

    check_length(length)
    if out is not None:
        check_output_suffix(out, "tokens")
        check_can_write(out, force)
    vocabulary = TextVocabulary.of(data)
    with ThreadPolicy(threads), JobProgress(f"Sampling {plural(num, 'sentence')}", shorten="ask for fewer with --num") as progress, \
            sentence_writer(out) as write:
        done = 0
        for sentences in sentence_chunks(model, vocabulary, num, decoding, length=length, prompt=prompt, seed=seed):
            write(sentences)
            done += len(sentences)
            progress(done, num, f"{done:,} of {num:,} sentences")
    warn_unknown(vocabulary)
    if out is not None:
        stdout.print(escape(f"Wrote {plural(num, 'sentence')} to {out}"), soft_wrap=True)


@contextmanager
def sentence_writer(out: Path | None) -> Iterator[Callable[[list[str]], None]]:
    """write(sentences): to stdout, or appended to out (through a temporary file, renamed once
    every sentence is in)."""
    if out is None:
        def show(sentences: list[str]) -> None:
            for sentence in sentences:
                stdout.print(escape(sentence), soft_wrap=True, highlight=False)

        yield show
        return
    with atomic_file(out) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        yield lambda sentences: handle.writelines(sentence + "\n" for sentence in sentences)


def warn_unknown(vocabulary: TextVocabulary) -> None:
    if vocabulary.unknown:
        words = ", ".join(repr(word) for word in vocabulary.unknown)
        stderr.print(f"[yellow]Warning:[/] {escape(f'not in the model vocabulary, read as <unk>: {words}.')}", soft_wrap=True)


def check_image_options(prompt: Path | None, seconds: float | None, length: int | None) -> None:
    if prompt is not None:
        raise usage_error("--prompt does not apply to an image model.", "Image models sample whole images from scratch; --prompt continues audio with an audio model.")
    if seconds is not None or length is not None:
        raise usage_error("--seconds and --length do not apply to an image model.", "Images are always 28x28 = 784 pixels.")


def report_audio(result: AudioSamples) -> None:
    each = f"{result.seconds:g} s each" + (f", the first {result.prompt_seconds:g} s the prompt" if result.prompt_seconds else "")
    from ..generate import plot_path

    shown = listed_paths(result)
    stdout.print(escape(f"Wrote {plural(result.clips, 'sample')} ({each}) to {list_files(shown, result.clips)}"), soft_wrap=True)
    plots = [plot_path(path) for path in shown]
    stdout.print(escape(f"Waveform and spectrogram beside each: {list_files(plots, result.clips)}"), soft_wrap=True)
    stderr.print(
        f"Generated {result.generated_seconds:.3g} s of audio in {result.wall_seconds:.3g} s: "
        f"{result.real_time_factor:.3g}× real time", soft_wrap=True,
    )


def listed_paths(result: AudioSamples) -> list[Path]:
    """The clips list_files names: all of a few, or the first and the last."""
    if result.clips <= LISTED_FILES:
        return result.paths()
    return result.paths(0, 1) + result.paths(result.clips - 1)


def list_files(paths: list[Path], count: int) -> str:
    """'a.wav', 'a-1.wav, a-2.wav, a-3.wav' or, for many, 'a-01.wav … a-64.wav' (paths: listed_paths')."""
    if count <= LISTED_FILES:
        return ", ".join(str(path) for path in paths)
    return f"{paths[0]} … {paths[-1]}"
