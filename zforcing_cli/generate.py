"""Free-running generation from the prior, written as what the model models: a PNG grid for
images, WAV files (each with a waveform and spectrogram PNG beside it) for audio. Audio can also
continue a prompt: the model reads it with posterior latents, then runs free from where it ends."""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch

from .data.audio import decode_file, to_int16
from .data.prepared import SAMPLE_SCALE, normalise_samples
from .errors import DataError, ZForcingError
from .fileio import check_can_write, write_bytes
from .model import ZForcing
from .plots import image_grid, write_audio_plot, write_png

OUTPUT_SUFFIXES = {"binary": ".png", "frames": ".wav", "tokens": ".txt"}
WHAT = {"binary": "binary images (PNG grid)", "frames": "audio (WAV)", "tokens": "text (lines of text)"}
DEFAULT_SECONDS = 2.0
MIN_PROMPT_FRAMES = 2  # the first is the model's first input, the rest are read as targets


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


# -- images ----------------------------------------------------------------------------------------


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
    generator = generator_for(model, seed)
    model.train(False)
    pixels = model.generate(num, height * width, temperature=temperature, generator=generator)
    images = pixels.view(num, height, width).float().cpu().numpy()
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

    paths: list[Path]  # the WAV files, one per sample
    plots: list[Path]  # the waveform and spectrogram PNG beside each
    seconds: float  # the length of each file
    prompt_seconds: float  # of which the prompt (0 without one)
    wall_seconds: float  # generating, reading the prompt's frames included; not the files

    @property
    def generated_seconds(self) -> float:
        """Seconds of audio the model generated, all samples together."""
        return len(self.paths) * (self.seconds - self.prompt_seconds)

    @property
    def real_time_factor(self) -> float:
        """Seconds of audio generated per second of wall time."""
        return self.generated_seconds / max(self.wall_seconds, 1e-9)


def numbered_paths(out: Path, count: int) -> list[Path]:
    """out itself for one sample; name-1.wav .. name-N.wav for more, the numbers zero-padded to
    the width of N (name-01.wav .. name-12.wav), so that they sort in order."""
    out = Path(out)
    if count == 1:
        return [out]
    width = len(str(count))
    return [out.with_name(f"{out.stem}-{index:0{width}d}{out.suffix}") for index in range(1, count + 1)]


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


def continue_prompt(
    model: ZForcing, prompt: np.ndarray, audio: AudioFormat, num: int, steps: int, temperature: float, generator: torch.Generator,
) -> torch.Tensor:
    """(num, steps, F) frames continuing the prompt (int16 samples, whole frames): its first frame
    is the model's first input, the rest are read with posterior latents, and generation goes on
    from the state after its last frame."""
    device = next(model.parameters()).device
    frames = torch.from_numpy(audio.normalise(prompt)).to(device)  # (P, F)
    first, targets, last = frames[0], frames[1:], frames[-1]
    state = model.encode(targets.expand(num, -1, -1), first_input=first.expand(num, -1), generator=generator)
    return model.generate(num, steps, temperature=temperature, generator=generator, first_input=last.expand(num, -1), state=state)


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM WAV, written atomically."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(samples, dtype=np.int16), sample_rate, format="WAV", subtype="PCM_16")
    write_bytes(path, buffer.getvalue())


def sample_audio(
    model: ZForcing,
    data: dict,
    out: Path,
    num: int = 1,
    steps: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    prompt: Path | None = None,
    force: bool = False,
) -> AudioSamples:
    """Generate `num` clips of `steps` frames (default 2 s) and write each as a 16-bit WAV at the
    model's sample rate, with a waveform and spectrogram PNG beside it. With a prompt file, each
    clip is the prompt (resampled, mono, whole frames) followed by its continuation.

    Every output is checked before anything is generated: existing files need force.
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
    paths = numbered_paths(out, num)
    plots = [plot_path(path) for path in paths]
    for path in paths + plots:
        check_can_write(path, force)

    prompt_samples = read_prompt(prompt, audio) if prompt is not None else np.zeros(0, np.int16)
    started = time.perf_counter()
    generator = generator_for(model, seed)
    model.train(False)
    if prompt is None:
        frames = model.generate(num, steps, temperature=temperature, generator=generator)
    else:
        frames = continue_prompt(model, prompt_samples, audio, num, steps, temperature, generator)
    generated = audio.to_samples(frames.float().cpu().numpy())  # (num, steps·F)
    wall = time.perf_counter() - started

    prompt_seconds = len(prompt_samples) / audio.sample_rate
    for path, plot, continuation in zip(paths, plots, generated):
        samples = np.concatenate([prompt_samples, continuation])
        write_wav(path, samples, audio.sample_rate)
        write_audio_plot(plot, samples / SAMPLE_SCALE, audio.sample_rate, path.name, boundary=prompt_seconds or None)
    seconds = prompt_seconds + audio.seconds(steps)
    return AudioSamples(paths, plots, seconds, prompt_seconds, wall)
