"""audioreport: generated clips measured against the split's real audio and white noise."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import zforcing_cli.audioreport as audioreport
from zforcing_cli.audiostats import measure
from zforcing_cli.checkpoint import load_model, save_checkpoint
from zforcing_cli.data import open_dataset
from zforcing_cli.generate import AudioFormat
from zforcing_cli.model import ZForcing, ZForcingConfig
from zforcing_cli.runconfig import TrainConfig, data_description


def tiny_audio_checkpoint(folder: Path, data: Path) -> Path:
    """An untrained tiny model of the prepared audio at `data` (200-sample frames)."""
    torch.manual_seed(0)
    model = ZForcing(ZForcingConfig(modality="frames", input_size=200, embed_size=8, hidden_size=8, latent_size=4, mlp_size=8))
    config = {"model": model.config.to_dict(), "train": dataclasses.asdict(TrainConfig()),
              "data": data_description(open_dataset(str(data)))}
    return save_checkpoint(folder, model, config, {"step": 0})


@pytest.fixture(scope="module")
def audio_model(timit_data, tmp_path_factory):
    checkpoint = tiny_audio_checkpoint(tmp_path_factory.mktemp("report") / "ckpt", timit_data)
    model, config = load_model(checkpoint)
    return model, config, open_dataset(str(timit_data)).split("test")


def generated_measures(model, config, num: int, seconds: float, output_noise: float, seed: int):
    audio = AudioFormat.of(config["data"])
    model.train(False)
    frames = model.generate(num, audio.frames_for(seconds), temperature=output_noise**2, generator=torch.Generator().manual_seed(seed))
    return measure(list(audio.to_samples(frames.numpy()) / 32768.0), audio.sample_rate)


@pytest.mark.parametrize("output_noise", [0.0, 1.0])
def test_the_generated_row_measures_clips_from_the_prior(audio_model, output_noise):
    model, config, split = audio_model
    report = audioreport.sample_report(model, config["data"], split, 3, 0.25, output_noise=output_noise, seed=5)
    expected = generated_measures(model, config, 3, 0.25, output_noise, 5)
    found = report.row("generated").measures
    assert (found.clips, found.flatness, found.rms_variation) == (3, expected.flatness, expected.rms_variation)
    np.testing.assert_array_equal(found.spectrum, expected.spectrum)


def test_the_real_row_is_the_split_cut_into_clips_of_the_same_length(audio_model):
    model, config, split = audio_model
    report = audioreport.sample_report(model, config["data"], split, 1, 0.25)
    samples = split.arrays["samples"]
    clip = AudioFormat.of(config["data"]).frames_for(0.25) * 200
    expected = measure([samples[start : start + clip] / 32768.0 for start in range(0, len(samples) - clip + 1, clip)], 16000)
    real = report.row("real")
    assert real.measures.clips == len(samples) // clip > 1
    assert real.measures.flatness == expected.flatness and real.distance == 0.0
    noise = report.row("white noise")
    assert noise.measures.clips == real.measures.clips
    assert noise.measures.flatness == pytest.approx(0.56, abs=0.03) and noise.distance > 0


def test_generated_clips_come_a_chunk_at_a_time_with_progress(audio_model, monkeypatch):
    model, config, split = audio_model
    monkeypatch.setattr(audioreport, "rows_per_chunk", lambda bytes_per_row: 2)
    rows, real = [], ZForcing.generate
    monkeypatch.setattr(ZForcing, "generate", lambda self, num, steps, **kwargs: rows.append(num) or real(self, num, steps, **kwargs))
    progress = []
    audioreport.sample_report(model, config["data"], split, 5, 0.1, progress=lambda done, total: progress.append((done, total)))
    assert rows == [2, 2, 1] and progress == [(2, 5), (4, 5), (5, 5)]


def test_clips_longer_than_the_split_are_refused(audio_model):
    model, config, split = audio_model
    with pytest.raises(audioreport.ZForcingError, match="less than one clip of 600 s"):
        audioreport.sample_report(model, config["data"], split, 1, 600.0)
