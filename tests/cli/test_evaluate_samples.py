"""`zforcing evaluate --samples N`: the table, --json, the spectra picture and the errors."""

from __future__ import annotations

import json

import pytest
from conftest import PNG_SIGNATURE, assert_clean_error, invoke, plain

from test_audioreport import tiny_audio_checkpoint


@pytest.fixture(scope="module")
def audio_checkpoint(timit_data, tmp_path_factory):
    return tiny_audio_checkpoint(tmp_path_factory.mktemp("samples") / "ckpt", timit_data)


def evaluate(checkpoint, *args):
    return invoke("evaluate", checkpoint, "--device", "cpu", *args)


def test_json_gives_the_three_rows(audio_checkpoint):
    result = evaluate(audio_checkpoint, "--samples", 3, "--seconds", 0.25, "--output-noise", "sample", "--json")
    assert result.exit_code == 0, plain(result.output)
    report = json.loads(result.stdout)
    assert (report["output_noise"], report["clip_seconds"], report["sample_rate"]) == (1.0, 0.25, 16000)
    assert report["generated"]["clips"] == 3 and report["real"]["clips"] > 1
    for row in ("real", "generated", "white noise"):
        assert set(report[row]) == {"clips", "seconds", "spectral_flatness", "band_energy", "rms_variation", "log_spectral_distance_db"}
        assert sum(report[row]["band_energy"].values()) == pytest.approx(1.0)
    assert report["real"]["log_spectral_distance_db"] == 0.0
    assert report["white noise"]["spectral_flatness"] == pytest.approx(0.56, abs=0.03)


def test_the_table_and_the_spectra_picture(audio_checkpoint, cwd):
    result = evaluate(audio_checkpoint, "--samples", 2, "--seconds", 0.25, "--spectra", "spectra.png")
    assert result.exit_code == 0, plain(result.output)
    table = plain(result.stdout)
    assert "output noise mean" in table
    for line in ("spectral flatness (median)", "energy below 1 kHz", "energy 1-4 kHz", "energy above 4 kHz", "RMS variation", "log-spectral distance"):
        assert line in table
    assert "2 × 0.25 s" in table and "white noise" in table
    assert (cwd / "spectra.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "Wrote the average spectra to spectra.png" in plain(result.stderr)


def test_an_image_model_is_refused_naming_what_it_needs(cwd):
    import dataclasses

    import torch

    from zforcing_cli.checkpoint import save_checkpoint
    from zforcing_cli.data import open_dataset
    from zforcing_cli.model import ZForcing, ZForcingConfig
    from zforcing_cli.runconfig import TrainConfig, data_description

    torch.manual_seed(0)
    model = ZForcing(ZForcingConfig(modality="binary", input_size=2, embed_size=4, hidden_size=8, latent_size=4, mlp_size=8))
    config = {"model": model.config.to_dict(), "train": dataclasses.asdict(TrainConfig()),
              "data": data_description(open_dataset("embedded"))}
    checkpoint = save_checkpoint(cwd / "ckpt", model, config, {"step": 0})
    assert_clean_error(evaluate(checkpoint, "--samples", 2), 1, "--samples measures generated audio", "binary-image model")


@pytest.mark.parametrize(("args", "fragment"), [
    (("--samples", 0), "--samples"),
    (("--seconds", 1), "--seconds applies to the samples report"),
    (("--spectra", "s.png"), "--spectra applies to the samples report"),
    (("--output-noise", "sample"), "--output-noise applies to the samples report"),
    (("--samples", 2, "--iwae", 5), "--samples measures generated audio instead of the bounds"),
    (("--samples", 2, "--spectra", "s.jpg"), "is not a .png or .svg file"),
    (("--samples", 2, "--output-noise", "loud"), "--output-noise must be mean, sample or a number"),
    (("--samples", 2, "--seconds", 0), "--seconds must be a finite number above 0"),
])
def test_bad_options_are_usage_errors(audio_checkpoint, cwd, args, fragment):
    result = evaluate(audio_checkpoint, *args)
    assert result.exit_code == 2, plain(result.output)
    assert fragment in plain(result.output)
    assert not list(cwd.iterdir())


def test_a_million_samples_start_at_once_in_chunks_with_a_warning_of_a_long_job(audio_checkpoint, monkeypatch):
    """Memory is a chunk of clips whatever N is; as soon as the speed is measured, JobProgress's
    warning of a long job names the option that shortens it."""
    import zforcing_cli.audioreport as audioreport
    from zforcing_cli.console import JobProgress
    from zforcing_cli.model import ZForcing

    rows, real_generate = [], ZForcing.generate

    def generate_twice(self, num, steps, **kwargs):
        rows.append(num)
        if len(rows) == 2:
            raise KeyboardInterrupt
        return real_generate(self, num, steps, **kwargs)

    monkeypatch.setattr(JobProgress, "MEASURE_SECONDS", 0.0)
    monkeypatch.setattr(JobProgress, "LONG_JOB_SECONDS", 60.0)
    monkeypatch.setattr(audioreport, "rows_per_chunk", lambda bytes_per_row: 4)
    monkeypatch.setattr(ZForcing, "generate", generate_twice)
    result = evaluate(audio_checkpoint, "--samples", 10**6, "--seconds", 0.0125)
    assert result.exit_code == 130, plain(result.output)
    assert rows == [4, 4]
    warning = next(line for line in plain(result.stderr).splitlines() if line.startswith("Warning:"))
    assert "Generating 1,000,000 clips" in warning and "will take about" in warning and "--samples" in warning, warning
