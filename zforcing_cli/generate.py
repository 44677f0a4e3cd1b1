"""Free-running generation from the prior, written as what the model models: a PNG grid for
images, WAV files (each with a waveform and spectrogram PNG beside it) for audio. Audio can also
continue a prompt: the model reads it with posterior latents, then runs free from where it ends.

Memory is bounded whatever is asked for: samples are generated a chunk of rows at a time (about
GENERATION_BYTES each), audio a piece of PIECE_SECONDS at a time, streamed to its file (written
whole or not at all), and progress(done, total) follows every chunk and piece. Whether the
outputs can be written, and fit the disk, is known before anything is generated.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch

from .data.audio import decode_file, to_int16
from .data.prepared import SAMPLE_SCALE, normalise_samples
from .errors import DataError, UsageError, ZForcingError
from .fileio import atomic_file, check_can_write, check_room
from .humanize import byte_size, plural
from .model import ZForcing, ZForcingConfig
from .plots import image_grid, write_audio_plot, write_png

# progress(done, total): samples (images, sentences, audio clips) done so far, of all asked for
Progress = Callable[[float, int], None]

OUTPUT_SUFFIXES = {"binary": ".png", "frames": ".wav", "tokens": ".txt"}
WHAT = {"binary": "binary images (PNG grid)", "frames": "audio (WAV)", "tokens": "text (lines of text)"}
DEFAULT_SECONDS = 2.0
MIN_PROMPT_FRAMES = 2  # the first is the model's first input, the rest are read as targets
GENERATION_BYTES = 256 << 20  # about what one chunk of rows takes while it is generated
MAX_CHUNK_ROWS = 1024  # so that progress moves even for a tiny model
PIECE_SECONDS = 5.0  # audio generated per piece, then written out
PLOT_SECONDS = 20.0  # the waveform and spectrogram picture shows a clip's first 20 s
MAX_GRID_IMAGES = 10_000  # a 100 × 100 grid: more is not a picture one can look at
WAV_HEADER_BYTES = 44
MAX_WAV_BYTES = 2**32 - 1  # RIFF sizes are 32-bit
MAX_OPEN_CLIPS = 64  # clips generated together, each an open file: far below the usual limit of 1,024
# Generous upper estimates of what a PNG takes, to check the disk before the work is spent: a
# clip's waveform and spectrogram picture (about 60 KiB), and a grid's 2×2 pixels per image pixel
# at up to 4 bytes each (uncompressed RGBA).
PLOT_BYTES = 256 << 10
GRID_BYTES_PER_PIXEL = 4 * 4


class SampleError(ZForcingError):
    pass


def check_output_suffix(out: Path, modality: str) -> None:
    expected = OUTPUT_SUFFIXES[modality]
    if out.suffix.lower() != expected:
        raise SampleError(
            f"This model generates {WHAT[modality]}; it cannot write {out.name!r}.",
            f"Give --out a {expected} file name, e.g. --out samples{expected}.",
        )


def generator_for(model: ZForcing, seed: int) -> torch.Generator:
    generator = torch.Generator(device=next(model.parameters()).device)
    generator.manual_seed(seed)
    return generator


def step_bytes(config: ZForcingConfig) -> int:
    """A generous count of the bytes one row's step of generation holds at a time: the LSTM's
    gates and state, the MLPs, and a few copies of the output's parameters (for text, the
    logits over the vocabulary, which dominate)."""
    return 4 * (16 * config.hidden_size + 8 * config.mlp_size + 8 * config.input_size)


def rows_per_chunk(bytes_per_row: int) -> int:
    """How many samples one chunk generates together: about GENERATION_BYTES whatever --num is."""
    return max(1, min(MAX_CHUNK_ROWS, GENERATION_BYTES // max(1, bytes_per_row)))


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, count) of each chunk of at most size that total takes, in order."""
    for start in range(0, total, size):
        yield start, min(size, total - start)


# -- images ----------------------------------------------------------------------------------------


def check_image_count(num: int) -> None:
    if num > MAX_GRID_IMAGES:
        raise UsageError(
            f"--num {num:,} images would not make a picture one can look at: one PNG grid holds at most {MAX_GRID_IMAGES:,}.",
            f"Ask for at most {MAX_GRID_IMAGES:,}; for more, run again with other --seed values and other --out names.",
        )


def sample_images(
    model: ZForcing,
    data: dict,
    out: Path,
    num: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Sample `num` images pixel by pixel, a chunk of them at a time, and write them as one PNG grid."""
    check_output_suffix(out, data["modality"])
    check_image_count(num)
    height, width = data["image_shape"]
    check_room(Path(out).absolute().parent, num * height * width * GRID_BYTES_PER_PIXEL + PLOT_BYTES,
               f"A PNG grid of {num:,} images", "Ask for fewer with --num, or write elsewhere with --out.")
    generator = generator_for(model, seed)
    model.train(False)
    images = np.empty((num, height, width), dtype=np.float32)
    size = rows_per_chunk(step_bytes(model.config) + 8 * height * width)  # a step's work, every step's pixel
    for start, count in chunks(num, size):
        pixels = model.generate(count, height * width, temperature=temperature, generator=generator)
        images[start : start + count] = pixels.view(count, height, width).float().cpu().numpy()
        if progress is not None:
            progress(start + count, num)
    columns = math.ceil(math.sqrt(num))
    write_png(out, image_grid(images, columns), scale=2)
    return out


# -- audio -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioFormat:
    """How an audio model's frames map to a waveform: the checkpoint's data["audio"] block."""

    sample_rate: int
    frame_size: int
    mean: float
    std: float

    @classmethod
    def of(cls, data: dict) -> AudioFormat:
        audio = data.get("audio") or {}
        try:
            return cls(int(audio["sample_rate"]), int(audio["frame_size"]), float(audio["mean"]), float(audio["std"]))
        except (KeyError, TypeError, ValueError):
            raise SampleError(
                "The checkpoint records no audio format (sample rate, frame size, mean and std), so its frames cannot be written as audio.",
                "Train the model again with this version of zforcing.",
            ) from None

    def seconds(self, frames: int) -> float:
        return frames * self.frame_size / self.sample_rate

    def frames_for(self, seconds: float) -> int:
        """Whole frames that hold at least `seconds` of audio (at least one)."""
        return max(1, math.ceil(seconds * self.sample_rate / self.frame_size - 1e-9))

    def normalise(self, samples: np.ndarray) -> np.ndarray:
        """int16 samples (a whole number of frames) -> (frames, F) float32, as the model sees them."""
        return normalise_samples(samples, self.mean, self.std).reshape(-1, self.frame_size)

    def to_samples(self, frames: np.ndarray) -> np.ndarray:
        """(..., T, F) normalised frames -> (..., T·F) int16 samples, clipped to [-1, 1] first."""
        waveform = np.clip(np.asarray(frames, dtype=np.float64) * self.std + self.mean, -1.0, 1.0)
        return to_int16(waveform.reshape(*waveform.shape[:-2], -1))


@dataclass
class AudioSamples:
    """What sample_audio wrote, and how fast it generated."""

    out: Path  # the --out the WAV files are named after (numbered_paths)
    clips: int
    seconds: float  # the length of each file
    prompt_seconds: float  # of which the prompt (0 without one)
    wall_seconds: float  # generating, reading the prompt's frames included; not the files

    def paths(self, start: int = 0, stop: int | None = None) -> list[Path]:
        """The WAV files of clips start .. stop - 1 (all by default)."""
        return numbered_paths(self.out, self.clips, start, stop)

    @property
    def generated_seconds(self) -> float:
        """Seconds of audio the model generated, all samples together."""
        return self.clips * (self.seconds - self.prompt_seconds)

    @property
    def real_time_factor(self) -> float:
        """Seconds of audio generated per second of wall time."""
        return self.generated_seconds / max(self.wall_seconds, 1e-9)


def numbered_paths(out: Path, count: int, start: int = 0, stop: int | None = None) -> list[Path]:
    """out itself for one sample; name-1.wav .. name-N.wav for more, the numbers zero-padded to
    the width of N (name-01.wav .. name-12.wav), so that they sort in order. Only those of
    clips start .. stop - 1 (all by default): a million names are not held at once."""
    out = Path(out)
    if count == 1:
        return [out]
    width = len(str(count))
    return [out.with_name(f"{out.stem}-{index + 1:0{width}d}{out.suffix}") for index in range(start, count if stop is None else stop)]


def plot_path(wav: Path) -> Path:
    return Path(wav).with_suffix(".png")


def audio_steps(audio: AudioFormat, seconds: float | None = None, length: int | None = None) -> int:
    """Frames to generate per sample: `length` frames, or enough for `seconds` (default 2 s)."""
    if length is not None:
        return length
    return audio.frames_for(DEFAULT_SECONDS if seconds is None else seconds)


def read_prompt(path: Path, audio: AudioFormat) -> np.ndarray:
    """A prompt file as int16 samples at the model's rate, mono, cut to whole frames."""
    path = Path(path)
    if not path.exists():
        raise SampleError(f"The prompt {path} does not exist.", "Give --prompt an audio file (WAV, FLAC, ...) to continue.")
    if path.is_dir():
        raise SampleError(f"The prompt {path} is a folder, not an audio file.", "Give --prompt one audio file to continue.")
    try:
        samples = decode_file(path, audio.sample_rate)
    except DataError as error:
        raise SampleError(error.message, "Give --prompt an audio file that libsndfile reads (WAV, FLAC, MP3, OGG, ...).") from None
    frames = len(samples) // audio.frame_size
    if frames < MIN_PROMPT_FRAMES:
        needed = audio.seconds(MIN_PROMPT_FRAMES)
        raise SampleError(
            f"The prompt {path} is too short: {len(samples) / audio.sample_rate:.3g} s, less than the "
            f"{MIN_PROMPT_FRAMES} frames of {audio.frame_size} samples ({needed:g} s at {audio.sample_rate} Hz) a prompt needs.",
            f"Give --prompt at least {needed:g} s of audio.",
        )
    return samples[: frames * audio.frame_size]


def audio_pieces(
    model: ZForcing, audio: AudioFormat, num: int, steps: int, output_noise: float, generator: torch.Generator,
    prompt: np.ndarray,
) -> Iterator[torch.Tensor]:
    """(num, T, F) frames, PIECE_SECONDS of them at a time, `steps` in all: the numbers of one
    call to model.generate, in memory bounded by a piece. With a prompt (int16 samples, whole
    frames, or none), its first frame is the model's first input, the rest are read with
    posterior latents, and generation goes on from the state after its last frame."""
    first_input = state = None
    if len(prompt):
        frames = torch.from_numpy(audio.normalise(prompt)).to(next(model.parameters()).device)  # (P, F)
        state = model.encode(frames[1:].expand(num, -1, -1), first_input=frames[0].expand(num, -1), generator=generator)
        first_input = frames[-1].expand(num, -1)
    piece = audio.frames_for(PIECE_SECONDS)
    for start in range(0, steps, piece):
        # the Gaussian head's temperature scales its variance: output_noise² scales the std by output_noise
        frames, state = model.generate(num, min(piece, steps - start), temperature=output_noise**2, generator=generator,
                                       first_input=first_input, state=state, return_state=True)
        first_input = frames[:, -1]
        yield frames


class ClipWriter:
    """One clip streamed into a 16-bit WAV file (written whole or not at all); its first
    PLOT_SECONDS are kept for the waveform and spectrogram PNG written beside it once the
    WAV is complete."""

    def __init__(self, path: Path, plot: Path, audio: AudioFormat, prompt: np.ndarray, stack: ExitStack):
        self.path, self.plot, self.audio = path, plot, audio
        self.prompt_seconds = len(prompt) / audio.sample_rate
        self.samples = len(prompt)
        self.kept = [prompt]
        self.room = int(PLOT_SECONDS * audio.sample_rate) - len(prompt)
        temporary = stack.enter_context(atomic_file(path))
        self.file = stack.enter_context(
            soundfile.SoundFile(temporary, "w", samplerate=audio.sample_rate, channels=1, format="WAV", subtype="PCM_16"))
        self.file.write(prompt)

    def write(self, samples: np.ndarray) -> None:
        self.file.write(samples)
        self.samples += len(samples)
        if self.room > 0:
            self.kept.append(samples[: self.room])
            self.room -= len(self.kept[-1])

    def write_plot(self) -> None:
        shown = np.concatenate(self.kept)
        seconds = self.samples / self.audio.sample_rate
        title = self.path.name if seconds <= PLOT_SECONDS else f"{self.path.name}: the first {PLOT_SECONDS:g} s of {seconds:g} s"
        write_audio_plot(self.plot, shown / SAMPLE_SCALE, self.audio.sample_rate, title, boundary=self.prompt_seconds or None)


def check_wav_size(audio: AudioFormat, samples: int, files: int, folder: Path) -> None:
    """A clip must fit a WAV file (4 GiB), and all of them, with their plots, the free space
    where they go (the folder must be writable)."""
    size = WAV_HEADER_BYTES + 2 * samples
    if size > MAX_WAV_BYTES:
        longest = (MAX_WAV_BYTES - WAV_HEADER_BYTES) // 2 / audio.sample_rate
        raise UsageError(
            f"Each clip would be {samples / audio.sample_rate:,.0f} s of audio, a WAV file of {byte_size(size)}; "
            f"a WAV file holds at most 4 GiB, {longest / 3600:.1f} h at {audio.sample_rate} Hz.",
            "Ask for less with --seconds (or --length), and for more clips with --num.",
        )
    check_room(folder, files * (size + PLOT_BYTES), f"{plural(files, 'WAV file')} and their plots",
               "Ask for less with --seconds or --num, or write elsewhere with --out.")


def sample_audio(
    model: ZForcing,
    data: dict,
    out: Path,
    num: int = 1,
    steps: int | None = None,
    output_noise: float = 1.0,
    seed: int = 0,
    prompt: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> AudioSamples:
    """Generate `num` clips of `steps` frames (default 2 s) and write each as a 16-bit WAV at the
    model's sample rate, with a waveform and spectrogram PNG beside it. With a prompt file, each
    clip is the prompt (resampled, mono, whole frames) followed by its continuation.
    output_noise scales the output Gaussian's standard deviation: 1 draws from it, 0 takes its
    mean (the latents are drawn from the prior either way).

    Every output is checked before anything is generated: existing files need force, each
    clip must fit a WAV file and all of them the disk. Clips are generated a chunk at a time
    and streamed to their files a piece at a time; progress counts frames.
    """
    out = Path(out)
    check_output_suffix(out, data["modality"])
    audio = AudioFormat.of(data)
    if model.config.input_size != audio.frame_size:
        raise SampleError(
            f"The checkpoint's model reads frames of {model.config.input_size} values, but its audio format has frames of {audio.frame_size} samples.",
            "Use another checkpoint of the run, or train again.",
        )
    steps = audio_steps(audio) if steps is None else steps
    check_clip_names(out, num, force)
    prompt_samples = read_prompt(prompt, audio) if prompt is not None else np.zeros(0, np.int16)
    check_wav_size(audio, len(prompt_samples) + steps * audio.frame_size, num, out.absolute().parent)

    generator = generator_for(model, seed)
    model.train(False)
    # a piece's frames as float32 in the model, float64 and int16 on their way to the file; the
    # prompt's frames, all read at once (the backward LSTM runs over the whole prompt)
    prompt_frames = len(prompt_samples) // audio.frame_size
    size = min(MAX_OPEN_CLIPS, rows_per_chunk((1 + prompt_frames) * step_bytes(model.config)
                                              + audio.frames_for(PIECE_SECONDS) * audio.frame_size * 48))
    generating = Stopwatch()  # reading the prompt's frames included; not the files
    work = ClipWork()
    report = (lambda done: progress(done, num)) if progress is not None else (lambda done: None)
    for start, count in [(0, 1)] + [(1 + start, count) for start, count in chunks(num - 1, size)]:
        paths = numbered_paths(out, num, start, start + count)
        share, generated = work.generating_share, generating.seconds
        with ExitStack() as stack:
            writers = [ClipWriter(path, plot_path(path), audio, prompt_samples, stack) for path in paths]
            done = 0
            for frames in generating.timed(audio_pieces(model, audio, count, steps, output_noise, generator, prompt_samples)):
                for writer, samples in zip(writers, audio.to_samples(frames.float().cpu().numpy())):
                    writer.write(samples)
                done += frames.shape[1]
                report(start + count * share * done / steps)
        plotting = time.perf_counter()
        for plotted, writer in enumerate(writers, 1):
            writer.write_plot()
            report(start + count * share + plotted * (1 - share))
        work.add(generating.seconds - generated, time.perf_counter() - plotting)
    prompt_seconds = len(prompt_samples) / audio.sample_rate
    return AudioSamples(out, num, prompt_seconds + audio.seconds(steps), prompt_seconds, generating.seconds)


class ClipWork:
    """How a clip's work divides between generating it and writing its picture, as measured so
    far, so that progress in clips moves at the pace of the work: either may dominate (a large
    model, a long clip; a small model's short clips, whose pictures take most of the time).
    The first chunk is a single clip, so that the measure exists by the time an ETA is given."""

    def __init__(self):
        self.generating = self.plotting = 0.0

    def add(self, generating: float, plotting: float) -> None:
        self.generating += generating
        self.plotting += plotting

    @property
    def generating_share(self) -> float:
        total = self.generating + self.plotting
        return self.generating / total if total > 0 else 0.5


def check_clip_names(out: Path, num: int, force: bool) -> None:
    """check_can_write for every clip's WAV and PNG, from one listing of their folder: what
    is there is matched against numbered_paths' pattern, instead of a look at each of (perhaps)
    a million names."""
    first = numbered_paths(out, num, 0, 1)[0]
    check_can_write(first, force)
    check_can_write(plot_path(first), force)
    if num == 1:
        return
    folder = first.absolute().parent
    ours = re.compile(rf"{re.escape(out.stem)}-(\d{{{len(str(num))}}})(?:{re.escape(out.suffix)}|\.png)")
    for entry in os.scandir(folder):
        number = ours.fullmatch(entry.name)
        if number and 1 <= int(number[1]) <= num and (entry.is_dir() or not force):
            check_can_write(folder / entry.name, force)  # its error: a folder, or a file without --force


class Stopwatch:
    """The time spent making the items of iterators, added up."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, items: Iterator) -> Iterator:
        iterator = iter(items)
        while True:
            started = time.perf_counter()
            item = next(iterator, None)
            self.seconds += time.perf_counter() - started
            if item is None:
                return
            yield item
