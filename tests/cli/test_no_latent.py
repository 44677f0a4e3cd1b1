"""`zforcing train --no-latent` end to end: the deterministic baseline trains on its NLL, records
what it is, and evaluate, sample and interpolate treat it as a model without z."""

from __future__ import annotations

import json

import pytest

from zforcing_cli.checkpoint import load_model
from zforcing_cli.data import open_dataset
from zforcing_cli.evaluate import evaluate_split

from conftest import assert_clean_error, invoke, plain

TINY = ("--max-steps", 2, "--batch-size", 4, "--hidden-size", 8, "--mlp-size", 8, "--embed-size", 4, "--device", "cpu")


def train_without_latent(work, data, *options):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        result = invoke("train", "--data", data, "--out", "run", "--no-latent", *TINY, *options)
    assert result.exit_code == 0, plain(result.output)
    return work / "run", result


@pytest.fixture(scope="module")
def mnist_run(tiny_data, tmp_path_factory):
    return train_without_latent(tmp_path_factory.mktemp("no_latent"), tiny_data)


def test_the_run_records_a_model_without_latent_trained_on_its_nll(mnist_run):
    run, result = mnist_run
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["latent"] is False
    assert {name: config["train"][name] for name in ("aux_weight", "aux_start", "bwd_weight", "kl_anneal")} == \
        {"aux_weight": 0.0, "aux_start": None, "bwd_weight": 0.0, "kl_anneal": False}  # the small preset's α and β are off
    stderr = plain(result.stderr)
    assert "no latent: an LSTM of 8" in stderr and "torch's LSTM (no latent)" in stderr
    assert "(exact)" in stderr and "KL" not in stderr.split("torch on")[1]  # no KL in the validation and progress lines
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert rows and all(row["loss"] == row["nll"] for row in rows)


def test_evaluate_names_the_nll_exact_and_skips_iwae_with_a_note(mnist_run):
    run, _ = mnist_run
    result = invoke("evaluate", run, "--iwae", 5, "--diagnostics", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    table = plain(result.stdout)
    assert "NLL (exact), nats per image" in table and "≤" not in table and "KL" not in table and "IWAE" not in table
    assert "no latent" in plain(result.stderr) and "--iwae and --diagnostics are skipped" in plain(result.stderr)
    report = json.loads(invoke("evaluate", run, "--json", "--device", "cpu").stdout)
    model, _ = load_model(run / "checkpoints" / sorted(path.name for path in (run / "checkpoints").glob("best-*"))[-1])
    expected = evaluate_split(model, open_dataset(report["data"]).split("test"), batch_size=500)
    assert report["exact"] is True and report["nll_iwae"] is None
    assert report["nll_elbo"] == pytest.approx(-expected.elbo) and report["kl"] == 0.0


def test_sample_draws_images(mnist_run, tmp_path):
    run, _ = mnist_run
    result = invoke("sample", run, "--num", 2, "--out", tmp_path / "grid.png", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert (tmp_path / "grid.png").read_bytes().startswith(b"\x89PNG")


def test_resume_keeps_it_and_a_z_weight_is_refused(mnist_run, tiny_data, tmp_path):
    run, _ = mnist_run
    line = assert_clean_error(invoke("train", "--data", tiny_data, "--out", tmp_path / "r", "--no-latent", "--aux-weight", 0.1), 2)
    assert "--aux-weight 0.1" in line and "--no-latent" in line
    line = assert_clean_error(invoke("train", "--data", tiny_data, "--out", tmp_path / "r", "--no-latent", "--cond-ln"), 2)
    assert "--cond-ln" in line
    assert not (tmp_path / "r").exists()
    assert "--latent" in assert_clean_error(invoke("train", "--resume", "--out", run, "--latent"), 2)


def test_text_trains_samples_and_evaluates_a_perplexity_but_does_not_interpolate(text_data, tmp_path):
    run, _ = train_without_latent(tmp_path, text_data)
    evaluated = invoke("evaluate", run, "--device", "cpu")
    assert evaluated.exit_code == 0, plain(evaluated.output)
    assert "perplexity (exact)" in plain(evaluated.stdout)
    sampled = invoke("sample", run, "--num", 2, "--prompt", "the film was", "--length", 4, "--device", "cpu")
    assert sampled.exit_code == 0, plain(sampled.output)
    assert len(plain(sampled.stdout).strip().splitlines()) == 2
    assert "no latent" in assert_clean_error(invoke("interpolate", run, "the film was great .", "the plot was awful ."), 1)


def test_audio_trains_samples_and_evaluates_a_log_likelihood(timit_data, tmp_path):
    run, _ = train_without_latent(tmp_path, timit_data)
    evaluated = invoke("evaluate", run, "--device", "cpu")
    assert evaluated.exit_code == 0, plain(evaluated.output)
    assert "log-likelihood (exact), nats per sequence" in plain(evaluated.stdout)
    sampled = invoke("sample", run, "--num", 1, "--seconds", 0.1, "--out", tmp_path / "s.wav", "--device", "cpu")
    assert sampled.exit_code == 0, plain(sampled.output)
    assert (tmp_path / "s.wav").read_bytes()[:4] == b"RIFF"
