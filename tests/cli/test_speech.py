"""Audio end to end through the command line: prepare a TIMIT tree, train the Gaussian-output
model on its stream sequences, evaluate whole test utterances in the paper's sign and unit."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import soundfile
import torch

from zforcing_cli.checkpoint import load_model
from zforcing_cli.data import open_dataset
from zforcing_cli.evaluate import evaluate_split, evaluation_batches
from zforcing_cli.presets import preset_configs

from conftest import assert_clean_error, invoke, plain


@pytest.fixture(scope="module")
def timit_run(timit_tree, tmp_path_factory):
    """Prepared tiny TIMIT and a 3-update small-preset run on it."""
    work = tmp_path_factory.mktemp("speech")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        prepared = invoke("prepare", "timit", timit_tree[0], "--out", "timit")
        assert prepared.exit_code == 0, plain(prepared.output)
        trained = invoke("train", "--data", "timit", "--out", "run", "--max-steps", 3, "--batch-size", 4, "--device", "cpu")
    assert trained.exit_code == 0, plain(trained.output)
    return work, trained


def test_training_on_audio_reports_nats_per_sequence(timit_run):
    _, trained = timit_run
    assert "nats per sequence" in plain(trained.stdout) and "per image" not in plain(trained.output)


def test_training_and_evaluate_state_the_bound_in_one_sign(timit_run, monkeypatch):
    """Audio's bounds are log-likelihoods (the paper's Table 1) in every command: training's
    validation lines, its best bound, and evaluate's figure on the valid split, the same figure."""
    work, trained = timit_run
    best = re.search(r"Best validation bound: log-likelihood ≥ (-[\d,]+\.\d\d) nats per sequence", plain(trained.stdout))
    assert best, plain(trained.stdout)
    assert re.search(r"valid log-likelihood ≥ -[\d,]+\.\d\d nats per sequence", plain(trained.stderr)), plain(trained.stderr)
    assert "NLL" not in plain(trained.output)
    monkeypatch.chdir(work)
    valid = plain(invoke("evaluate", "run", "--device", "cpu", "--split", "valid").stdout)
    assert re.search(rf"log-likelihood ≥ \(ELBO\), nats per sequence\s*│\s*{best.group(1)} │", valid), valid


def test_the_run_uses_the_speech_preset_and_records_the_framing(timit_run):
    work, _ = timit_run
    config = json.loads((work / "run" / "config.json").read_text())
    assert config["model"]["modality"] == "frames" and config["model"]["input_size"] == 200
    assert config["preset"] == "small"
    audio = config["data"]["audio"]
    assert (audio["sample_rate"], audio["frame_size"], audio["sequence_frames"]) == (16000, 200, 40)


def test_test_utterances_are_evaluated_whole(timit_run, monkeypatch):
    """Every test utterance in one piece: the bound covers its frames after the first (the SRNN
    protocol), averaged over the true number of utterances, never over padding."""
    work, _ = timit_run
    monkeypatch.chdir(work)
    result = invoke("evaluate", "run", "--json", "--device", "cpu", "--batch-size", 4)
    assert result.exit_code == 0, plain(result.output)
    report = json.loads(result.stdout)
    test = open_dataset(work / "timit").split("test")
    lengths = np.diff(test.arrays["offsets"]) // 200
    assert report["sequences"] == len(lengths) == 6
    assert report["steps"] == int((lengths - 1).sum())
    assert report["samples_per_sequence"] == pytest.approx(report["steps"] * 200 / 6)
    assert report["nll_elbo_per_sample"] == pytest.approx(-report["elbo"] / report["samples_per_sequence"])


def test_the_global_gaussian_baseline_and_the_iwae_bound_per_sample(timit_run, monkeypatch):
    """The baseline beside the bound: -log N(x; 0, 1) of every normalised target sample (the train
    split's mean and std predict every sample), computed from the samples themselves."""
    work, _ = timit_run
    monkeypatch.chdir(work)
    result = invoke("evaluate", "run", "--json", "--device", "cpu", "--iwae", 2)
    assert result.exit_code == 0, plain(result.output)
    report = json.loads(result.stdout)
    test = open_dataset(work / "timit").split("test")
    targets = np.concatenate([test.sequence(index)[1].ravel() for index in range(len(test))]).astype(np.float64)
    expected = 0.5 * np.log(2 * np.pi) + 0.5 * np.mean(targets ** 2)
    assert report["baseline"].startswith("global Gaussian")
    assert report["baseline_nll_per_sample"] == pytest.approx(expected, rel=1e-9)
    assert report["baseline_nll"] == pytest.approx(expected * report["samples_per_sequence"], rel=1e-9)
    assert report["nll_iwae_per_sample"] == pytest.approx(-report["iwae"] / report["samples_per_sequence"])
    table = plain(invoke("evaluate", "run", "--device", "cpu", "--iwae", 2).stdout)
    assert "log-likelihood ≥ (IWAE, K=2), nats per sample" in table and f"{-expected:.4f}" in table
    assert "NLL" not in table  # one sign for audio: every figure a log-likelihood


def test_the_gaussian_baseline_on_the_train_split_is_half_log_two_pi_e(timit_run):
    """On the data its mean and std come from, the global Gaussian scores 0.5·ln(2πe) = 1.419
    nats per sample (up to the context frames, which the statistics count but no bound does)."""
    from zforcing_cli.evaluate import baseline_nll

    work, _ = timit_run
    dataset = open_dataset(work / "timit")
    train = dataset.split("train")
    per_sample = baseline_nll(dataset, "train") / (train.meta.audio["sequence_frames"] * 200)
    assert per_sample == pytest.approx(0.5 * np.log(2 * np.pi * np.e), abs=0.02)


def test_whole_counts_print_as_integers(timit_run, monkeypatch):
    """0.5 s stream sequences hold 8,000 samples each, not "8,000.0"; an average over whole
    utterances keeps its decimal."""
    work, _ = timit_run
    monkeypatch.chdir(work)
    valid = plain(invoke("evaluate", "run", "--device", "cpu", "--split", "valid").stdout)
    assert re.search(r"waveform samples per sequence\s*│\s*8,000 │", valid), valid
    test = plain(invoke("evaluate", "run", "--device", "cpu").stdout)
    assert re.search(r"waveform samples per sequence\s*│\s*[\d,]+\.\d │", test), test


def test_the_table_uses_the_papers_sign(timit_run, monkeypatch):
    work, _ = timit_run
    monkeypatch.chdir(work)
    table = plain(invoke("evaluate", "run", "--device", "cpu", "--batch-size", 4).stdout)
    assert "log-likelihood ≥ (ELBO), nats per sequence" in table and "nats per sample" in table


def test_a_padded_audio_batch_masks_what_follows_each_utterance(timit_run):
    work, _ = timit_run
    test = open_dataset(work / "timit").split("test")
    batch = test.batch(np.arange(len(test)))
    lengths = np.diff(test.arrays["offsets"]) // 200 - 1
    assert batch.targets.shape == (len(test), lengths.max(), 200)
    assert torch.equal(batch.mask.sum(1), torch.as_tensor(lengths, dtype=torch.float32))
    for row, length in enumerate(lengths):
        context, targets = test.sequence(row)
        assert torch.equal(batch.first_input[row], torch.from_numpy(context))
        assert torch.equal(batch.targets[row, :length], torch.from_numpy(targets))
        assert not batch.targets[row, length:].any()


@pytest.mark.parametrize(("kind", "sizes"), [("timit", (512, 1024, 256, 512)), ("blizzard", (1024, 2048, 256, 1024))])
def test_paper_presets_take_the_papers_speech_sizes(timit_run, kind, sizes):
    work, _ = timit_run
    meta = open_dataset(work / "timit").meta
    meta.kind = kind
    model, train = preset_configs("paper", meta)
    assert (model.embed_size, model.hidden_size, model.latent_size, model.mlp_size) == sizes
    assert (train.batch_size, train.lr) == ((32, 1e-3) if kind == "timit" else (128, 3e-4))


def test_the_whole_utterance_bound_matches_each_utterance_alone(timit_run):
    """evaluate_split's bound on the padded test batch is the mean of a direct computation per
    utterance with the same noise: padding changes nothing, and the average is over utterances."""
    work, _ = timit_run
    model, _ = load_model(work / "run" / "checkpoints" / "step-00000003")
    test = open_dataset(work / "timit").split("test")
    result = evaluate_split(model, test, batch_size=len(test), seed=7)
    batch = test.batch(np.arange(len(test)))
    _, noise = next(evaluation_batches(model, test, len(test), len(test), "cpu", 7, None))  # evaluate_split's
    padded = model(batch.targets, batch.mask, noise=noise, auxiliary=False, first_input=batch.first_input).elbo
    assert result.elbo == pytest.approx(padded.double().mean().item(), rel=1e-6)
    for row in range(len(test)):
        context, targets = test.sequence(row)
        alone = model(torch.from_numpy(targets)[None], noise=noise[row:row + 1, : len(targets)], auxiliary=False,
                      first_input=torch.from_numpy(context)[None]).elbo
        assert alone.item() == pytest.approx(padded[row].item(), rel=1e-5, abs=1e-2)


def test_a_trained_checkpoint_samples_finite_audio_of_the_asked_length(timit_run, tmp_path):
    work, _ = timit_run
    result = invoke("sample", work / "run", "--out", tmp_path / "s.wav", "--seconds", 0.25, "--num", 2, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    for name in ("s-1.wav", "s-2.wav"):
        samples, rate = soundfile.read(tmp_path / name, dtype="int16")
        assert rate == 16000 and samples.shape == (20 * 200,)
        assert np.isfinite(samples.astype(np.float64)).all() and samples.any()
        assert (tmp_path / name).with_suffix(".png").is_file()


@pytest.mark.parametrize(("options", "difference"), [
    (("--sample-rate", 8000), "sample rate 8,000 Hz instead of the model's 16,000 Hz"),
    (("--frame-size", 100), "frame size 100 samples instead of the model's 200 samples"),
])
def test_evaluate_refuses_audio_framed_otherwise_than_the_model(timit_run, timit_tree, tmp_path, options, difference):
    work, _ = timit_run
    for index, wav in enumerate(sorted(timit_tree[0].rglob("*.WAV"))[:6]):
        shutil.copy(wav, tmp_path / f"{index}.wav")
    prepared = invoke("prepare", "wav", tmp_path, "--out", tmp_path / "other", "--sequence-length", 4, *options)
    assert prepared.exit_code == 0, plain(prepared.output)
    result = invoke("evaluate", work / "run", "--data", tmp_path / "other", "--device", "cpu")
    assert_clean_error(result, 1, difference)
    assert "--sample-rate 16000 --frame-size 200" in plain(result.stderr)
