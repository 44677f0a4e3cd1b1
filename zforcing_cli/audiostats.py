"""How much a set of audio clips sounds like speech, in four numbers, measured in bounded memory.

Each clip is cut into Hann-windowed analysis frames of about 32 ms (a power of two of samples,
half overlapping), and each frame's periodogram is taken. From these:

- **Spectral flatness**: the geometric over the arithmetic mean of a frame's power spectrum
  (DC left out). White noise is about 0.56; a voiced sound, whose energy sits in a few harmonics,
  is near 0.001. The median over the frames that carry sound: within ACTIVE_DB of the clip's
  loudest frame and above digital silence, so that the pauses between words (whose low-level
  noise is flat) measure the recording, not the speech.
- **Energy by band**: the share of all frames' power below 1 kHz, from 1 to 4 kHz (the Nyquist
  frequency of 8 kHz audio included), and above 4 kHz. Speech holds most of its energy below 1 kHz; white noise spreads it evenly to the
  Nyquist frequency.
- **RMS variation**: the coefficient of variation (std / mean) of a clip's RMS in blocks of 20
  ms, the median over clips. Speech rises and falls with its syllables; steady noise does not.
- **Average spectrum**: the mean periodogram of all frames, scaled to unit power, for the
  log-spectral distance between two sets of clips (the RMS difference of their average spectra
  in dB) and for the picture that overlays them.

Medians come from fine log-spaced histograms (HISTOGRAM_BINS_PER_DECADE, about 1% apart), so
memory does not grow with the number of clips.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

ANALYSIS_SECONDS = 0.032  # analysis frame: rounded to a power of two of samples
ENVELOPE_SECONDS = 0.020  # the RMS envelope's block
ACTIVE_DB = 40.0  # a frame counts for flatness within this many dB of its clip's loudest frame
SILENCE_RMS = 1e-4  # ... and above this RMS (full scale 1): digital silence has no spectrum
BAND_EDGES_HZ = (1000.0, 4000.0)
BANDS = ("below 1 kHz", "1-4 kHz", "above 4 kHz")
HISTOGRAM_BINS_PER_DECADE = 200
FLATNESS_RANGE = (1e-9, 1.0)  # geometric over arithmetic mean: at most 1
VARIATION_RANGE = (1e-4, 1e3)
POWER_FLOOR = 1e-20  # keeps log() finite for a bin of exact zeros


def analysis_size(sample_rate: int) -> int:
    """Samples per analysis frame: the power of two nearest ANALYSIS_SECONDS (256 at 8 kHz, 512 at 16 kHz)."""
    return 2 ** max(4, round(math.log2(ANALYSIS_SECONDS * sample_rate)))


class LogHistogram:
    """Counts of positive values in log-spaced bins over [low, high] (values outside land in the
    end bins): a median within about 1% in fixed memory."""

    def __init__(self, low: float, high: float):
        self.low, self.high = math.log10(low), math.log10(high)
        self.counts = np.zeros(int(round((self.high - self.low) * HISTOGRAM_BINS_PER_DECADE)), dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        logs = np.log10(np.maximum(values, 10.0**self.low))
        index = ((logs - self.low) * HISTOGRAM_BINS_PER_DECADE).astype(np.int64)
        np.add.at(self.counts, np.clip(index, 0, len(self.counts) - 1), 1)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def median(self) -> float:
        """The geometric centre of the bin holding the median; nan when empty."""
        if self.total == 0:
            return math.nan
        index = int(np.searchsorted(np.cumsum(self.counts), (self.total + 1) / 2))
        return 10.0 ** (self.low + (index + 0.5) / HISTOGRAM_BINS_PER_DECADE)


@dataclass
class AudioMeasures:
    """What AudioStats found in a set of clips."""

    clips: int
    seconds: float
    flatness: float  # median over active frames
    band_shares: dict[str, float]  # BANDS -> share of the power, summing to 1
    rms_variation: float  # median over clips
    frequencies: np.ndarray  # (bins,) Hz
    spectrum: np.ndarray  # (bins,) the average power spectrum, scaled to sum to 1

    def as_dict(self) -> dict:
        return {"clips": self.clips, "seconds": self.seconds, "spectral_flatness": self.flatness,
                "band_energy": self.band_shares, "rms_variation": self.rms_variation}


class AudioStats:
    """Adds up the measures of clips given one at a time (float waveforms, full scale 1)."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.size = analysis_size(sample_rate)
        self.window = np.hanning(self.size)
        self.frequencies = np.fft.rfftfreq(self.size, 1.0 / sample_rate)
        self.power = np.zeros(len(self.frequencies))
        self.flatness = LogHistogram(*FLATNESS_RANGE)
        self.variation = LogHistogram(*VARIATION_RANGE)
        self.clips, self.samples = 0, 0

    def add(self, clip: np.ndarray) -> None:
        clip = np.asarray(clip, dtype=np.float64)
        self.clips += 1
        self.samples += len(clip)
        frames = self.frames(clip)  # (frames, size)
        if len(frames):
            periodograms = np.abs(np.fft.rfft(frames * self.window, axis=-1)) ** 2  # (frames, bins)
            self.power += periodograms.sum(0)
            self.flatness.add(frame_flatness(periodograms[active_frames(frames)]))
        envelope = block_rms(clip, max(1, round(ENVELOPE_SECONDS * self.sample_rate)))
        if len(envelope) > 1 and envelope.mean() > 0:
            self.variation.add(np.array([envelope.std() / envelope.mean()]))

    def frames(self, clip: np.ndarray) -> np.ndarray:
        """(frames, size) the half-overlapping analysis frames of a clip (none if it is shorter than one)."""
        if len(clip) < self.size:
            return np.zeros((0, self.size))
        return np.lib.stride_tricks.sliding_window_view(clip, self.size)[:: self.size // 2]

    def result(self) -> AudioMeasures:
        total = self.power.sum()
        spectrum = self.power / total if total > 0 else self.power
        return AudioMeasures(
            clips=self.clips, seconds=self.samples / self.sample_rate, flatness=self.flatness.median(),
            band_shares=band_shares(self.frequencies, spectrum), rms_variation=self.variation.median(),
            frequencies=self.frequencies, spectrum=spectrum,
        )


def frame_flatness(periodograms: np.ndarray) -> np.ndarray:
    """(frames, bins) -> (frames,) geometric over arithmetic mean of each power spectrum, DC left out."""
    power = np.maximum(periodograms[:, 1:], POWER_FLOOR)
    return np.exp(np.log(power).mean(-1)) / power.mean(-1)


def active_frames(frames: np.ndarray) -> np.ndarray:
    """(frames, size) -> (frames,) bool: the frames within ACTIVE_DB of the clip's loudest and
    above digital silence."""
    mean_square = (frames**2).mean(-1)
    floor = max(mean_square.max() * 10.0 ** (-ACTIVE_DB / 10.0), SILENCE_RMS**2)
    return mean_square >= floor


def block_rms(clip: np.ndarray, block: int) -> np.ndarray:
    """The RMS of each whole block of `block` samples."""
    blocks = len(clip) // block
    return np.sqrt((clip[: blocks * block].reshape(blocks, block) ** 2).mean(-1))


def band_shares(frequencies: np.ndarray, spectrum: np.ndarray) -> dict[str, float]:
    """The share of the spectrum's power in each of BANDS (0 where there is none)."""
    low, high = BAND_EDGES_HZ
    masks = (frequencies < low, (frequencies >= low) & (frequencies <= high), frequencies > high)
    total = spectrum.sum()
    return {name: float(spectrum[mask].sum() / total) if total > 0 else 0.0 for name, mask in zip(BANDS, masks)}


def log_spectral_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The RMS difference, in dB, of two average spectra (each scaled to unit power), DC left out."""
    decibels = 10.0 * (np.log10(np.maximum(a[1:], POWER_FLOOR)) - np.log10(np.maximum(b[1:], POWER_FLOOR)))
    return float(np.sqrt(np.mean(decibels**2)))


def measure(clips: Iterable[np.ndarray], sample_rate: int) -> AudioMeasures:
    stats = AudioStats(sample_rate)
    for clip in clips:
        stats.add(clip)
    return stats.result()
