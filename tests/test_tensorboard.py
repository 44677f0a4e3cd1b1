"""`train --tensorboard`: the event file holds what metrics.jsonl holds, plus samples, and
logging them leaves training unchanged."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_clean_error, invoke, tiny_run_config
from zforcing_cli.train import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

CPU = torch.device("cpu")


def events(run_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def logged_run(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    config = tiny_run_config(tiny_dataset, epochs=1, checkpoint_every=3)
    train(run_dir, config, tiny_dataset, CPU, tensorboard=True)
    return run_dir, config


def test_scalars_are_the_metrics_records(logged_run):
    run_dir, _ = logged_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    accumulator = events(run_dir)
    for kind, key in (("train", "elbo"), ("train", "kl"), ("train", "aux"), ("train", "lr"), ("valid", "nll_bound"), ("valid", "kl")):
        logged = [(event.step, event.value) for event in accumulator.Scalars(f"{kind}/{key}")]
        expected = [(r["step"], r[key]) for r in records if r["type"] == kind]
        assert [step for step, _ in logged] == [step for step, _ in expected] and logged
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_validation_adds_sample_images(logged_run):
    run_dir, _ = logged_run
    images = events(run_dir).Images("samples")
    valid_steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"valid"' in line]
    assert [image.step for image in images] == valid_steps
    assert images[0].width == 4 * 28 + 5 * 2  # a 4 × 4 grid with 2-pixel borders


def test_logging_leaves_training_unchanged(logged_run, tiny_dataset, tmp_path):
    run_dir, config = logged_run
    train(tmp_path / "plain", config, tiny_dataset, CPU)
    (logged,) = (run_dir / "checkpoints").glob("step-*6")
    plain = tmp_path / "plain" / "checkpoints" / logged.name
    for name, tensor in load_file(logged / "model.safetensors").items():
        assert torch.equal(tensor, load_file(plain / "model.safetensors")[name]), name


def test_text_samples(text_data, tmp_path):
    from zforcing_cli.data import open_dataset
    from zforcing_cli.presets import preset_configs
    from zforcing_cli.runconfig import RunConfig, data_description

    dataset = open_dataset(text_data)
    model, training = preset_configs("small", dataset.meta)
    training.max_steps, training.batch_size = 2, 4
    train(tmp_path / "run", RunConfig(model, training, data_description(dataset)), dataset, CPU, tensorboard=True)
    accumulator = events(tmp_path / "run")
    (text,) = accumulator.Tensors("samples/text_summary")
    assert text.step == 2 and b"1. " in text.tensor_proto.string_val[0]


def test_missing_extra_is_a_clear_error(cwd, tiny_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    assert_clean_error(invoke("train", "--data", tiny_data, "--max-steps", 1, "--tensorboard"), 1, "tensorboard")
    assert not (cwd / "runs").exists()


def test_audio_samples(timit_tree, tmp_path):
    from zforcing_cli.data import prepare
    from zforcing_cli.presets import preset_configs
    from zforcing_cli.runconfig import RunConfig, data_description

    dataset = prepare("timit", str(timit_tree[0]), tmp_path / "timit")
    model, training = preset_configs("small", dataset.meta)
    training.max_steps, training.batch_size, training.valid_limit = 2, 4, 4
    train(tmp_path / "run", RunConfig(model, training, data_description(dataset)), dataset, CPU, tensorboard=True)
    (clip,) = events(tmp_path / "run").Audio("samples")
    assert clip.step == 2 and clip.sample_rate == 16000 and clip.length_frames == 16000 * 2
