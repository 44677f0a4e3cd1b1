"""How close an audio model's samples come to real audio: `zforcing evaluate --samples N`.

N clips are generated from the prior (z_t ~ p(z_t | h_{t-1}), the output drawn with the chosen
output noise) and measured with audiostats beside two reference rows: the split's real audio,
cut into clips of the same length, and white Gaussian noise of the real audio's loudness. Each
row gets its log-spectral distance to the real audio's average spectrum.

Nothing is written: generated clips are measured a chunk at a time and dropped, so memory is
bounded by a chunk whatever N is; progress(done, total) counts generated clips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .audiostats import AudioMeasures, AudioStats, log_spectral_distance
from .data.prepared import SAMPLE_SCALE, PreparedSplit
from .errors import ZForcingError
from .generate import AudioFormat, audio_pieces, chunks, generator_for, rows_per_chunk, step_bytes
from .model import ZForcing

DEFAULT_CLIP_SECONDS = 4.0
NOISE_SEED = 0  # the white-noise reference row is the same in every report


@dataclass
class MeasuredRow:
    name: str
    measures: AudioMeasures
    distance: float  # log-spectral distance to the real audio, dB

    def as_dict(self) -> dict:
        return {**self.measures.as_dict(), "log_spectral_distance_db": self.distance}


@dataclass
class SampleReport:
    sample_rate: int
    clip_seconds: float
    output_noise: float
    rows: list[MeasuredRow]  # real, generated, white noise

    def row(self, name: str) -> MeasuredRow:
        return next(row for row in self.rows if row.name == name)

    def as_dict(self) -> dict:
        return {"sample_rate": self.sample_rate, "clip_seconds": self.clip_seconds, "output_noise": self.output_noise,
                **{row.name: row.as_dict() for row in self.rows}}


def real_clips(split: PreparedSplit, clip_samples: int) -> Iterator[np.ndarray]:
    """The split's waveform (float, full scale 1) in consecutive clips of clip_samples; a
    shorter rest is dropped. The stored array is read a clip at a time."""
    samples = split.arrays["samples"]
    for start in range(0, len(samples) - clip_samples + 1, clip_samples):
        yield np.asarray(samples[start : start + clip_samples], dtype=np.float64) / SAMPLE_SCALE


def noise_clips(count: int, clip_samples: int, rms: float) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(NOISE_SEED)
    for _ in range(count):
        yield np.clip(rng.normal(0.0, rms, clip_samples), -1.0, 1.0)


def generated_clips(model: ZForcing, audio: AudioFormat, num: int, steps: int, output_noise: float, seed: int,
                    progress: Callable[[float, int], None]) -> Iterator[np.ndarray]:
    """num clips of `steps` frames from the prior, as written to a WAV file (int16) but float,
    a chunk of clips at a time."""
    generator = generator_for(model, seed)
    model.train(False)
    size = rows_per_chunk(step_bytes(model.config) + steps * audio.frame_size * 48)
    for start, count in chunks(num, size):
        frames = torch.cat(list(audio_pieces(model, audio, count, steps, output_noise, generator, np.zeros(0, np.int16))), dim=1)
        yield from audio.to_samples(frames.float().cpu().numpy()) / SAMPLE_SCALE
        progress(start + count, num)


def sample_report(model: ZForcing, data: dict, split: PreparedSplit, num: int, clip_seconds: float = DEFAULT_CLIP_SECONDS,
                  output_noise: float = 0.0, seed: int = 0,
                  progress: Callable[[float, int], None] | None = None) -> SampleReport:
    """Measure num generated clips of clip_seconds against the split's real audio and white noise."""
    audio = AudioFormat.of(data)
    steps = audio.frames_for(clip_seconds)
    clip_samples = steps * audio.frame_size
    real = AudioStats(audio.sample_rate)
    square_sum = 0.0
    for clip in real_clips(split, clip_samples):
        real.add(clip)
        square_sum += float(np.dot(clip, clip))
    if real.clips == 0:
        raise ZForcingError(
            f"The {split.name or 'evaluated'} split holds less than one clip of {audio.seconds(steps):g} s of real audio to compare with.",
            "Ask for shorter clips with --seconds.",
        )
    reference = real.result()
    generated = AudioStats(audio.sample_rate)
    for clip in generated_clips(model, audio, num, steps, output_noise, seed, progress or (lambda done, total: None)):
        generated.add(clip)
    noise = AudioStats(audio.sample_rate)
    for clip in noise_clips(real.clips, clip_samples, np.sqrt(square_sum / (real.clips * clip_samples))):
        noise.add(clip)
    rows = [MeasuredRow(name, measures, log_spectral_distance(reference.spectrum, measures.spectrum))
            for name, measures in (("real", reference), ("generated", generated.result()), ("white noise", noise.result()))]
    return SampleReport(audio.sample_rate, audio.seconds(steps), output_noise, rows)
