"""The `zforcing` command line, through typer's CliRunner (stdout and stderr kept apart)."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from zforcing_cli import __version__
from zforcing_cli.data import open_dataset

from conftest import PNG_SIGNATURE, assert_clean_error, copy_runs, invoke, plain

COMMANDS = ["prepare", "train", "evaluate", "sample", "interpolate"]


# -- version and help ------------------------------------------------------------------------------


def test_version(cwd):
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"zforcing {__version__}"


def test_no_arguments_shows_help(cwd):
    result = invoke()
    assert "Usage" in plain(result.output)
    for command in COMMANDS:
        assert command in plain(result.output)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_has_an_example(cwd, command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    assert "Example" in text
    assert f"zforcing {command}" in text
    assert "Traceback" not in text


# -- prepare ---------------------------------------------------------------------------------------


def test_prepare_mnist_from_amat_folder(cwd, amat_folder):
    folder, pixels = amat_folder
    result = invoke("prepare", "mnist", folder, "--out", "prepared/tiny")
    assert result.exit_code == 0, plain(result.output)
    assert "train 24" in plain(result.stdout) and "valid 8" in plain(result.stdout)
    dataset = open_dataset(cwd / "prepared" / "tiny")
    assert dataset.meta.counts == {"train": 24, "valid": 8, "test": 8}
    assert (dataset.split("test").batch(list(range(8)))[0].numpy() == pixels["test"]).all()


def test_prepare_defaults_to_data_kind_in_the_working_folder(cwd, amat_folder):
    result = invoke("prepare", "mnist", amat_folder[0])
    assert result.exit_code == 0, plain(result.output)
    assert (cwd / "data" / "mnist" / "meta.json").is_file()


def test_prepare_mnist_embedded(cwd):
    result = invoke("prepare", "mnist", "embedded", "--out", "emb")
    assert result.exit_code == 0, plain(result.output)
    assert "train 50,000" in plain(result.stdout)
    assert open_dataset(cwd / "emb").meta.counts == {"train": 50000, "valid": 10000, "test": 10000}


def test_prepare_existing_output_needs_force(cwd, amat_folder):
    out = cwd / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(invoke("prepare", "mnist", amat_folder[0], "--out", out), 1, "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --force replaces only a prepared dataset: a folder of the user's own is refused, named
    line = assert_clean_error(invoke("prepare", "mnist", amat_folder[0], "--out", out, "--force"), 1, "not a prepared dataset")
    assert "keep.txt" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert invoke("prepare", "mnist", amat_folder[0], "--out", out).exit_code == 0  # an empty folder is used as it is
    result = invoke("prepare", "mnist", amat_folder[0], "--out", out, "--force")
    assert result.exit_code == 0, plain(result.output)
    assert (out / "meta.json").is_file()


def corrupt_line(folder: Path, split: str, edit) -> None:
    path = folder / f"binarized_mnist_{split}.amat"
    lines = path.read_text().splitlines()
    lines[1] = edit(lines[1].split())
    path.write_text("\n".join(lines) + "\n")


def bad_source(kind, folder: Path, tmp: Path) -> Path:
    if kind == "missing":
        return tmp / "no-such-folder"
    if kind == "file":
        return folder / "binarized_mnist_train.amat"
    if kind == "empty-folder":
        (tmp / "empty").mkdir()
        return tmp / "empty"
    if kind == "not-amat":
        (tmp / "pngs").mkdir()
        (tmp / "pngs" / "digit.png").write_bytes(PNG_SIGNATURE)
        return tmp / "pngs"
    if kind == "empty-amat":
        (folder / "binarized_mnist_valid.amat").write_text("")
    if kind == "value-2":
        corrupt_line(folder, "train", lambda v: " ".join(["2"] + v[1:]))
    if kind == "value-0.5":
        corrupt_line(folder, "train", lambda v: " ".join(v[:-1] + ["0.5"]))
    if kind == "ragged":
        corrupt_line(folder, "test", lambda v: " ".join(v[:783]))
    return folder


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("missing", "does not exist"),
        ("file", "is a file"),
        ("empty-folder", "lacks binarized_mnist_train.amat"),
        ("not-amat", "lacks binarized_mnist_train.amat"),
        ("empty-amat", "is empty"),
        ("value-2", "'2' is not 0 or 1"),
        ("value-0.5", "'0.5' is not 0 or 1"),
        ("ragged", "783 values instead of 784"),
    ],
)
def test_prepare_bad_sources_are_clean_errors(cwd, amat_folder, kind, fragment):
    source = bad_source(kind, amat_folder[0], cwd)
    assert_clean_error(invoke("prepare", "mnist", source, "--out", "out"), 1, fragment)
    assert not (cwd / "out").exists()
    assert not [p for p in cwd.iterdir() if p.name.startswith(".out")]


def test_prepare_error_shows_paths_with_brackets_verbatim(cwd):
    """A path like `raw[x]` must appear as typed, not be eaten as console markup."""
    line = assert_clean_error(invoke("prepare", "mnist", "raw[x]", "--out", "out"), 1)
    assert "raw[x]" in line


def test_prepare_error_quoting_file_content_that_looks_like_markup(cwd, amat_folder):
    """The bad value is quoted from the user's file; `[/b]` must not crash the error printer."""
    corrupt_line(amat_folder[0], "valid", lambda v: " ".join(v[:5] + ["[/b]"] + v[6:]))
    line = assert_clean_error(invoke("prepare", "mnist", amat_folder[0], "--out", "out"), 1, "not 0 or 1")
    assert "[/b]" in line


def test_prepare_unknown_kind(cwd):
    line = assert_clean_error(invoke("prepare", "cifar10", cwd), 2, "Unknown data kind")
    assert "cifar10" in line


# -- train -----------------------------------------------------------------------------------------


def test_train_writes_a_run_and_points_latest(trained, tiny_data):
    work, result = trained
    latest = work / "runs" / "latest"
    assert latest.exists()
    run = latest.resolve()
    assert run.parent == (work / "runs").resolve() and run.name != "latest"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best-00000002", "step-00000002"]
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["location"] == str(tiny_data.resolve())
    assert config["train"]["batch_size"] == 4 and config["train"]["max_steps"] == 2
    assert re.search(r"Best validation bound: NLL ≤ \d+\.\d+ nats", plain(result.stdout)), plain(result.stdout)
    assert "training on mnist" in plain(result.stderr)  # progress goes to stderr
    assert "training on mnist" not in plain(result.stdout)
    assert (run / "metrics.jsonl").is_file() and (run / "training_curves.svg").is_file() and (run / "training_curves.png").is_file()


def test_a_batch_larger_than_the_data_is_recorded_as_the_batch_that_ran(cwd, tiny_data):
    result = invoke("train", "--data", tiny_data, "--batch-size", 100_000_000, "--max-steps", 1, "--out", "run", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert "a batch of 100,000,000 is more than the 24 training sequences" in plain(result.stderr)
    assert json.loads((cwd / "run" / "config.json").read_text())["train"]["batch_size"] == 24


def test_train_resume_continues_runs_latest(trained, cwd):
    runs = copy_runs(trained[0], cwd)
    result = invoke("train", "--resume", "--max-steps", 3, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    step_folders = sorted((runs / "latest" / "checkpoints").glob("step-*"))
    assert step_folders[-1].name == "step-00000003"
    state = json.loads((step_folders[-1] / "trainer_state.json").read_text())
    assert state["step"] == 3
    config = json.loads((runs / "latest" / "config.json").read_text())
    assert config["train"]["max_steps"] == 3 and config["train"]["batch_size"] == 4
    assert len([p for p in runs.iterdir() if p.name != "latest"]) == 1  # no new run folder


def test_train_resume_of_a_finished_run_says_how_to_continue(trained, cwd):
    runs = copy_runs(trained[0], cwd)
    before = sorted(p.name for p in (runs / "latest" / "checkpoints").iterdir())
    result = invoke("train", "--resume", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert "already took its 2 updates" in plain(result.stderr)
    assert "--epochs N or --max-steps N" in plain(result.stderr)
    steps = sorted((runs / "latest" / "checkpoints").glob("step-*"))
    assert steps[-1].name == "step-00000002"
    assert [name for name in before if name.startswith("step-")][-1] == "step-00000002"


@pytest.mark.parametrize(
    ("option", "values"),
    [(["--lr", "0.1"], "0.1 differs from the run's 0.002"), (["--batch-size", "8"], "8 differs from the run's 4"),
     (["--seed", "3"], "3 differs from the run's 0"), (["--preset", "paper"], "paper differs from the run's small"),
     (["--aux-condition", "hz"], "hz differs from the run's z")],
)
def test_train_resume_refuses_changing_the_configuration(trained, cwd, option, values):
    copy_runs(trained[0], cwd)
    before = sorted(p.name for p in (cwd / "runs" / "latest" / "checkpoints").iterdir())
    assert_clean_error(invoke("train", "--resume", *option), 2, values)
    assert sorted(p.name for p in (cwd / "runs" / "latest" / "checkpoints").iterdir()) == before


def test_train_resume_without_runs(cwd):
    assert_clean_error(invoke("train", "--resume"), 1, "latest does not exist")


def test_train_existing_out_needs_force(cwd, tiny_data):
    (cwd / "myrun").mkdir()
    (cwd / "myrun" / "notes.txt").write_text("mine")
    result = invoke("train", "--data", tiny_data, "--out", "myrun", "--max-steps", 1, "--device", "cpu")
    assert_clean_error(result, 1, "already exists")
    assert [p.name for p in (cwd / "myrun").iterdir()] == ["notes.txt"]


def test_train_bad_aux_condition_is_a_usage_error(cwd, tiny_data):
    assert_clean_error(invoke("train", "--data", tiny_data, "--aux-condition", "bogus"), 2, "bogus")
    assert not (cwd / "runs").exists()


def test_train_out_of_range_option_is_a_usage_error(cwd):
    result = invoke("train", "--batch-size", 0)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert not (cwd / "runs").exists()


def test_train_missing_data(cwd):
    assert_clean_error(invoke("train", "--data", cwd / "nothing"), 1, "No prepared dataset")


def test_train_unknown_preset(cwd, tiny_data):
    assert_clean_error(invoke("train", "--data", tiny_data, "--preset", "huge"), 2, "Unknown preset")


@pytest.fixture
def found_checkpoint(cwd) -> Path:
    """A folder that passes for a checkpoint until it is loaded: evaluate and sample check the
    path before the device (which loads torch)."""
    (cwd / "checkpoint").mkdir()
    (cwd / "checkpoint" / "config.json").write_text("{}")
    return cwd / "checkpoint"


@pytest.mark.parametrize("command", [["train"], ["evaluate", "checkpoint"], ["sample", "checkpoint"]])
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda(cwd, found_checkpoint, monkeypatch, command, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_clean_error(invoke(*command, "--device", device), 1, "CUDA is not available")
    assert not (cwd / "runs").exists()


def test_unknown_device(found_checkpoint):
    assert_clean_error(invoke("evaluate", found_checkpoint, "--device", "tpu"), 2, "Unknown device")


# -- evaluate --------------------------------------------------------------------------------------


def test_evaluate_latest_prints_a_table(in_trained):
    result = invoke("evaluate", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    table = plain(result.stdout)
    assert "NLL" in table and "KL, nats per image" in table and "per sequence" not in table
    assert re.search(r"sequences\s*│\s*8\b", table), table
    assert "IWAE" not in table


def test_evaluate_json(in_trained):
    result = invoke("evaluate", "--json", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    report = json.loads(result.stdout)
    assert {"elbo", "iwae", "kl", "sequences", "split", "checkpoint"} <= report.keys()
    assert report["split"] == "test" and report["sequences"] == 8 and report["iwae"] is None
    assert report["elbo"] < 0 and report["kl"] >= 0
    assert report["nll_elbo"] == pytest.approx(-report["elbo"])
    assert Path(report["checkpoint"]).name.startswith("best-")
    # the bound beside a model that ignores the data: 784 pixels, each 1 with probability 1/2
    assert report["baseline"].startswith("uniform Bernoulli") and report["baseline_nll"] == pytest.approx(784 * math.log(2))


def test_evaluate_table_gives_the_baseline(in_trained):
    table = plain(invoke("evaluate", "--device", "cpu", "--limit", 2).stdout)
    assert re.search(r"baseline NLL \(uniform Bernoulli\), nats per image\s*│\s*543\.43", table), table


def test_evaluate_iwae_and_valid_split(in_trained):
    result = invoke("evaluate", "runs/latest", "--split", "valid", "--iwae", 3, "--json", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    report = json.loads(result.stdout)
    assert report["split"] == "valid" and report["iwae_samples"] == 3 and report["sequences"] == 8
    assert report["iwae"] is not None and report["iwae"] < 0
    assert report["nll_iwae"] == pytest.approx(-report["iwae"])
    # Three importance samples give a bound in the same range as the ELBO (not off by orders).
    assert abs(report["iwae"] - report["elbo"]) < 0.2 * abs(report["elbo"])


def test_evaluate_iwae_table_row(in_trained):
    result = invoke("evaluate", "--iwae", 2, "--limit", 2, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert "IWAE, K=2" in plain(result.stdout)
    assert re.search(r"sequences\s*│\s*2\b", plain(result.stdout))


def test_evaluate_of_one_sequence_shows_how_far_it_is(in_trained, monkeypatch):
    """Off a terminal, a line every JobProgress.LOG_SECONDS (here every pass) with an ETA, even
    for a single sequence: progress counts its IWAE samples."""
    from zforcing_cli.console import JobProgress

    monkeypatch.setattr(JobProgress, "LOG_SECONDS", 0.0)
    monkeypatch.setattr(JobProgress, "MEASURE_SECONDS", 0.0)
    result = invoke("evaluate", "--iwae", 40, "--limit", 1, "--batch-size", 10, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    lines = [line for line in plain(result.stderr).splitlines() if line.startswith("Evaluating test:")]
    assert "about" in lines[0] and "to go" in lines[0]
    assert any("25%, 10 of 40 (1 sequence × 40 IWAE samples)" in line and "to go" in line for line in lines), lines


def test_evaluate_warns_of_a_job_of_days(in_trained, monkeypatch):
    from zforcing_cli.console import JobProgress

    monkeypatch.setattr(JobProgress, "MEASURE_SECONDS", 0.0)
    monkeypatch.setattr(JobProgress, "LONG_JOB_SECONDS", 0.0)
    result = invoke("evaluate", "--iwae", 40, "--limit", 1, "--batch-size", 10, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    warning = next(line for line in plain(result.stderr).splitlines() if line.startswith("Warning:"))
    assert "will take about" in warning and "--limit" in warning and "--iwae" in warning


def test_evaluate_bogus_split_is_a_usage_error(in_trained):
    assert_clean_error(invoke("evaluate", "--split", "bogus"), 2, "bogus")


def test_evaluate_without_runs_latest(cwd):
    line = assert_clean_error(invoke("evaluate"), 1)
    assert "latest" in line and "does not exist" in line


def test_evaluate_missing_checkpoint_path(cwd):
    assert_clean_error(invoke("evaluate", cwd / "nope"), 1, "does not exist")


def test_evaluate_a_folder_that_is_not_a_checkpoint(cwd):
    (cwd / "holiday-photos").mkdir()
    (cwd / "holiday-photos" / "beach.jpg").write_bytes(b"\xff\xd8")
    assert_clean_error(invoke("evaluate", cwd / "holiday-photos"), 1, "is not a checkpoint")


def test_evaluate_incomplete_checkpoint(cwd, best_checkpoint):
    folder = shutil.copytree(best_checkpoint, cwd / "ck")
    (folder / "model.safetensors").unlink()
    assert_clean_error(invoke("evaluate", folder, "--device", "cpu"), 1, "incomplete", "model.safetensors")


def test_evaluate_truncated_checkpoint(cwd, best_checkpoint):
    folder = shutil.copytree(best_checkpoint, cwd / "ck")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_clean_error(invoke("evaluate", folder, "--device", "cpu"), 1, "corrupted")


def test_evaluate_corrupted_config(cwd, best_checkpoint):
    folder = shutil.copytree(best_checkpoint, cwd / "ck")
    (folder / "config.json").write_text('{"model": ')
    assert_clean_error(invoke("evaluate", folder, "--device", "cpu"), 1, "corrupted")


def test_evaluate_with_a_missing_dataset(cwd, best_checkpoint):
    folder = shutil.copytree(best_checkpoint, cwd / "ck")
    result = invoke("evaluate", folder, "--data", cwd / "gone", "--device", "cpu")
    assert_clean_error(result, 1, "No prepared dataset")


# -- sample ----------------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_sample_png_is_reproducible_by_seed(in_trained, tmp_path):
    paths = {name: tmp_path / f"{name}.png" for name in ("a", "b", "c")}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        result = invoke("sample", "--out", paths[name], "--num", 4, "--seed", seed, "--device", "cpu")
        assert result.exit_code == 0, plain(result.output)
        assert "Wrote 4 samples" in plain(result.stdout)
    a, b, c = (paths[name].read_bytes() for name in ("a", "b", "c"))
    assert a[:8] == PNG_SIGNATURE
    assert png_size(a) == (124, 124)  # 2x2 grid of 28px digits, 2px borders, scale 2
    assert a == b
    assert a != c


def test_sample_refuses_an_audio_file_for_an_image_model(in_trained, tmp_path):
    out = tmp_path / "x.wav"
    line = assert_clean_error(invoke("sample", "--out", out, "--num", 1), 1, "x.wav")
    assert "image" in line.lower() or "png" in line.lower()
    assert not out.exists()


def test_sample_existing_output_needs_force(in_trained, tmp_path):
    out = tmp_path / "s.png"
    out.write_bytes(b"my picture")
    assert_clean_error(invoke("sample", "--out", out, "--num", 1), 1, "already exists")
    assert out.read_bytes() == b"my picture"
    result = invoke("sample", "--out", out, "--num", 1, "--force", "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_sample_length_does_not_apply_to_images(in_trained, tmp_path):
    assert_clean_error(invoke("sample", "--out", tmp_path / "s.png", "--length", 10), 2, "--length")
    assert not (tmp_path / "s.png").exists()


def test_sample_default_output_is_samples_png_in_the_working_folder(trained, cwd):
    copy_runs(trained[0], cwd)
    result = invoke("sample", "--num", 1, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert (cwd / "samples.png").read_bytes()[:8] == PNG_SIGNATURE


# -- interpolate -----------------------------------------------------------------------------------


def test_interpolate_on_an_image_model_is_a_clear_error(in_trained):
    assert_clean_error(invoke("interpolate", "runs/latest", "a good film .", "a bad film ."), 1, "text model")


def test_interpolate_needs_a_checkpoint(cwd):
    assert_clean_error(invoke("interpolate", cwd / "nothing", "a", "b"), 1, "does not exist")


# -- debugging -------------------------------------------------------------------------------------


def test_debug_variable_shows_the_traceback_of_an_expected_error(cwd):
    result = invoke("evaluate", cwd / "nope", env={"ZFORCING_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in plain(result.stderr)
    assert "CheckpointError" in plain(result.stderr)


def test_unexpected_errors_are_one_line_unless_debugging(in_trained, monkeypatch):
    import zforcing_cli.cli.evaluate as evaluate_command

    def explode(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(evaluate_command, "evaluate_split", explode)
    result = invoke("evaluate", "--device", "cpu")
    line = assert_clean_error(result, 1, "RuntimeError", "kaboom")
    assert "ZFORCING_DEBUG" in plain(result.stderr)
    assert line

    debug = invoke("evaluate", "--device", "cpu", env={"ZFORCING_DEBUG": "1"})
    assert debug.exit_code == 1
    assert isinstance(debug.exception, RuntimeError) and str(debug.exception) == "kaboom"


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 51200000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
])
def test_running_out_of_memory_names_the_option_to_lower(in_trained, monkeypatch, error):
    import zforcing_cli.cli.evaluate as evaluate_command

    def exhaust(*args, **kwargs):
        raise error

    monkeypatch.setattr(evaluate_command, "evaluate_split", exhaust)
    result = invoke("evaluate", "--device", "cpu")
    line = assert_clean_error(result, 1, "Out of memory")
    assert "bug" not in plain(result.output) and "--batch-size" in plain(result.stderr)
    if isinstance(error, RuntimeError):
        assert "47.7 GiB" in line


def test_evaluate_when_the_training_data_has_moved(cwd, best_checkpoint):
    config = json.loads((best_checkpoint / "config.json").read_text())
    folder = shutil.copytree(best_checkpoint, cwd / "moved")
    config["data"]["location"] = str(cwd / "no-longer-here")
    (folder / "config.json").write_text(json.dumps(config))
    result = invoke("evaluate", folder, "--device", "cpu")
    assert_clean_error(result, 1, "The model was trained on")
    assert "--data" in result.output
