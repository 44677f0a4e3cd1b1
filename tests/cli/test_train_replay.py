"""A run's arithmetic fixed by the run: its thread count decided once as it starts, recorded in
config.json and kept on --resume, and its config.json replayed into a new folder bit for bit,
whatever else runs then."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from zforcing_cli.runconfig import RunConfig
from zforcing_cli.threads import register, remove_quietly
from zforcing_cli.train import train

from conftest import assert_clean_error, invoke, plain

TINY = ("--device", "cpu", "--batch-size", 4, "--hidden-size", 8, "--latent-size", 2, "--mlp-size", 8, "--embed-size", 4)
AUTOMATIC = {"ZFORCING_THREADS": None}  # the suite fixes one thread (conftest.py): these runs take the policy's share


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A registry of its own, on a machine of two cores: alone, the policy's share is 2 threads."""
    folder = tmp_path / "active"
    monkeypatch.setenv("ZFORCING_ACTIVE_DIR", str(folder))
    monkeypatch.setattr("zforcing_cli.threads.available_cores", lambda: 2)
    monkeypatch.setattr("zforcing_cli.cores.machine_cores", lambda: 2)
    yield folder
    torch.set_num_threads(1)


@pytest.fixture
def another_training(registry):
    """Another zforcing process registered (a lock held by an open file of its own): the
    policy's share is now one thread."""
    fd, path = register(registry)
    yield
    remove_quietly(path)
    os.close(fd)


def train_ok(*options):
    result = invoke("train", *options, env=AUTOMATIC)
    assert result.exit_code == 0, plain(result.output)
    return plain(result.stderr)


def config(run) -> dict:
    return json.loads((run / "config.json").read_text())


def metric_rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{name: value for name, value in row.items() if name != "seconds"} for row in rows]  # all but the clock


def last_checkpoint_tensors(run) -> dict[str, torch.Tensor]:
    (last,) = sorted((run / "checkpoints").glob("step-*"))[-1:]
    return {f"{file.stem}.{name}": tensor for file in sorted(last.glob("*.safetensors")) for name, tensor in load_file(file).items()}


@pytest.fixture
def first_run(cwd, tiny_data, registry):
    stderr = train_ok(*TINY, "--data", tiny_data, "--out", "run", "--max-steps", 3, "--seed", 3, "--aux-weight", 0.01)
    assert "torch on 2 threads (fixed for the run, recorded in its config.json)" in stderr
    assert config(cwd / "run")["threads"] == 2
    return cwd / "run"


def test_a_replayed_config_json_repeats_the_run_bit_for_bit_whatever_else_runs(first_run, cwd, another_training):
    stderr = train_ok("--config", first_run / "config.json", "--out", "replay", "--device", "cpu")
    assert "torch on 2 threads" in stderr  # the recorded count, not the share of 1 the policy would give now
    replay = cwd / "replay"
    assert config(replay) == config(first_run)
    assert metric_rows(replay) == metric_rows(first_run)
    first, again = last_checkpoint_tensors(first_run), last_checkpoint_tensors(replay)
    assert first.keys() == again.keys() and len(first) > 10
    assert all(torch.equal(first[name], again[name]) for name in first)


def test_an_option_given_with_a_replayed_config_json_replaces_its_value(first_run, cwd):
    train_ok("--config", first_run / "config.json", "--out", "other", "--threads", 1, "--seed", 4)
    assert (config(cwd / "other")["threads"], config(cwd / "other")["train"]["seed"]) == (1, 4)


def test_a_replayed_count_above_the_cores_is_lowered_with_a_warning(first_run, cwd):
    recorded = config(first_run)
    (cwd / "bigger.json").write_text(json.dumps({**recorded, "threads": 8}))  # a run from a machine of 8 cores
    stderr = train_ok("--config", cwd / "bigger.json", "--out", "replay", "--device", "cpu")
    assert "Warning: The --config file's threads = 8 is more than the cores this process may run on: using 2" in stderr
    assert config(cwd / "replay")["threads"] == 2


def test_a_resumed_count_above_the_cores_is_lowered_with_a_warning(first_run):
    (first_run / "config.json").write_text(json.dumps({**config(first_run), "threads": 8}))
    stderr = train_ok("--resume", "--out", first_run, "--max-steps", 4, "--device", "cpu")
    assert "Warning: The run was trained on 8 threads, more than the cores this process may run on: using 2" in stderr


def test_resume_keeps_the_recorded_count_whatever_else_runs(first_run, another_training):
    stderr = train_ok("--resume", "--out", first_run, "--max-steps", 4, "--device", "cpu")
    assert "torch on 2 threads" in stderr and "Warning" not in stderr
    assert config(first_run)["threads"] == 2


def test_resume_with_another_count_says_the_numbers_may_differ(first_run):
    stderr = train_ok("--resume", "--out", first_run, "--max-steps", 4, "--device", "cpu", "--threads", 1)
    warnings = [line for line in stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == ["Warning: --threads 1 differs from the 2 the run was trained on: its numbers may differ from "
                        "those of an uninterrupted run."]
    assert "torch on 1 thread " in stderr and config(first_run)["threads"] == 1


def test_a_run_recorded_before_threads_were_resumes_on_the_share_and_records_it(first_run, another_training):
    old = config(first_run)
    del old["threads"]
    (first_run / "config.json").write_text(json.dumps(old))
    assert RunConfig.from_dict(old).threads is None
    train_ok("--resume", "--out", first_run, "--max-steps", 4, "--device", "cpu")
    assert config(first_run)["threads"] == 1  # the share beside another training


def test_the_library_records_the_count_it_trains_on(tmp_path, tiny_dataset, run_config_factory):
    torch.set_num_threads(1)
    train(tmp_path / "run", run_config_factory(tiny_dataset, max_steps=1), tiny_dataset, torch.device("cpu"))
    assert config(tmp_path / "run")["threads"] == 1


@pytest.mark.parametrize(("text", "fragment"), [
    ("{", "is not valid JSON"),
    ('{"model": {}}', "is not a run's config.json"),
    ('{"model": {"hidden_size": 8}, "train": {"max_step": 2}}', "Unknown setting 'max_step'"),
])
def test_a_bad_json_config_is_one_error_and_no_run_folder(cwd, tiny_data, text, fragment):
    (cwd / "bad.json").write_text(text)
    result = invoke("train", "--data", tiny_data, "--out", "run", "--config", cwd / "bad.json", "--device", "cpu")
    assert fragment in assert_clean_error(result, result.exit_code)
    assert not (cwd / "run").exists()


def loops_words(stderr: str) -> str:
    """The loops a start line names, without the why: what config.json records."""
    line = next(line for line in stderr.splitlines() if "recorded in its config.json);" in line)
    return line.split("recorded in its config.json); ", 1)[1].split(" (")[0].strip()


def test_the_loops_a_run_trains_on_are_recorded_and_other_loops_on_replay_or_resume_are_said(first_run, cwd, monkeypatch):
    recorded = config(first_run)["loops"]
    assert recorded in ("compiled loops", "Python loops")
    other = "Python loops" if recorded == "compiled loops" else "compiled loops"
    edited = config(first_run)
    edited["loops"] = other  # as if trained where the other loops ran
    (cwd / "other.json").write_text(json.dumps(edited))
    stderr = train_ok("--config", cwd / "other.json", "--out", "replay", "--device", "cpu")
    assert f"The run was trained on the {other}; this process runs the {recorded}: its numbers may differ" in stderr.replace("\n", " ")
    assert config(cwd / "replay")["loops"] == other  # the record stays what the run started on
    same = train_ok("--config", first_run / "config.json", "--out", "again", "--device", "cpu")
    assert "its numbers may differ" not in same and loops_words(same) == recorded

    (first_run / "config.json").write_text(json.dumps(edited))
    resumed = train_ok("--resume", "--out", first_run, "--max-steps", 4, "--device", "cpu")
    assert f"The run was trained on the {other}" in resumed.replace("\n", " ")


def test_a_run_from_before_loops_were_recorded_records_them_on_resume(first_run, cwd):
    old = config(first_run)
    del old["loops"]
    (first_run / "config.json").write_text(json.dumps(old))
    stderr = train_ok("--resume", "--out", first_run, "--max-steps", 4, "--device", "cpu")
    assert "its numbers may differ" not in stderr and config(first_run)["loops"] == loops_words(stderr)
