"""audiostats: each measure on signals whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from zforcing_cli.audiostats import (
    BANDS,
    HISTOGRAM_BINS_PER_DECADE,
    LogHistogram,
    analysis_size,
    log_spectral_distance,
    measure,
)

RATE = 8000


def sine(frequency: float, seconds: float = 2.0, rate: int = RATE, amplitude: float = 0.3) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * frequency * np.arange(int(seconds * rate)) / rate)


def white(seconds: float = 2.0, seed: int = 0, rate: int = RATE) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.1, int(seconds * rate))


def test_analysis_frames_are_about_32_ms():
    assert (analysis_size(8000), analysis_size(16000), analysis_size(22050)) == (256, 512, 512)


def test_white_noise_is_flat_and_spreads_its_energy_evenly():
    found = measure([white(seed=seed) for seed in range(4)], RATE)
    assert found.flatness == pytest.approx(0.56, abs=0.02)  # the geometric over the arithmetic mean of χ²₂ power
    assert found.band_shares[BANDS[0]] == pytest.approx(0.25, abs=0.02)  # 1 kHz of a 4 kHz band
    assert found.rms_variation < 0.15


def test_a_low_tone_is_peaked_and_below_1_khz():
    found = measure([sine(220.0)], RATE)
    assert found.flatness < 1e-3
    assert found.band_shares[BANDS[0]] > 0.999


def test_a_tone_between_1_and_4_khz_is_in_the_middle_band_and_16_khz_audio_has_a_top_band():
    middle = measure([sine(2000.0, rate=16000)], 16000).band_shares
    high = measure([sine(6000.0, rate=16000)], 16000).band_shares
    assert middle[BANDS[1]] > 0.99 and high[BANDS[2]] > 0.99
    assert sum(middle.values()) == pytest.approx(1.0)


def test_syllable_like_loudness_varies_and_a_steady_tone_does_not():
    t = np.arange(2 * RATE) / RATE
    syllables = sine(220.0) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    assert measure([syllables], RATE).rms_variation > 0.5
    assert measure([sine(220.0)], RATE).rms_variation < 0.05


def test_quiet_and_silent_frames_do_not_count_for_flatness():
    """A tone with pauses of digital silence and of faint noise (60 dB down) measures as the tone."""
    pause = np.zeros(RATE)
    faint = white(1.0, seed=3) * 1e-3 * 0.3 / 0.1
    found = measure([np.concatenate([pause, sine(220.0, 1.0), faint, sine(220.0, 1.0)])], RATE)
    assert found.flatness < 1e-3


def test_log_spectral_distance_is_the_rms_db_difference():
    spectrum = np.linspace(1.0, 2.0, 9)
    assert log_spectral_distance(spectrum, spectrum) == 0.0
    assert log_spectral_distance(spectrum, spectrum * 10.0) == pytest.approx(10.0)
    assert log_spectral_distance(spectrum, spectrum * np.where(np.arange(9) % 2, 10.0, 1.0)) == pytest.approx(np.sqrt(50.0))


def test_the_average_spectrum_has_unit_power_whatever_the_loudness():
    quiet, loud = measure([white() * 0.01], RATE), measure([white()], RATE)
    assert quiet.spectrum.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(quiet.spectrum, loud.spectrum, rtol=1e-9)


def test_the_histogram_median_is_within_a_bin_and_its_memory_does_not_grow():
    values = np.random.default_rng(0).lognormal(-3.0, 1.5, 10_001)
    histogram = LogHistogram(1e-9, 1.0)
    size = histogram.counts.nbytes
    for part in np.array_split(values, 7):
        histogram.add(part)
    assert histogram.median() == pytest.approx(np.median(values), rel=np.log(10) / HISTOGRAM_BINS_PER_DECADE)
    assert histogram.counts.nbytes == size and histogram.total == len(values)
    assert np.isnan(LogHistogram(1e-9, 1.0).median())


def test_a_clip_shorter_than_an_analysis_frame_counts_without_a_spectrum():
    found = measure([np.ones(10)], RATE)
    assert found.clips == 1 and np.isnan(found.flatness)
