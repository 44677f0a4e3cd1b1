"""`zforcing sweep` end to end on the tiny dataset: a grid over two seeds and its report, and the
bad inputs of the issue, each one `Error:` line with nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import PNG_SIGNATURE, assert_clean_error, invoke, plain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sweep"))
from sweep_helpers import write_spec  # noqa: E402, F401 - a fixture

from zforcing_cli.plots import metric_points, read_metrics  # noqa: E402
from zforcing_cli.sweep import open_study, read_spec  # noqa: E402


def best_bound(run: Path) -> float:
    return min(metric_points(read_metrics(run / "metrics.jsonl"), "valid", "nll_bound")[1])


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_grid_sweep_trains_each_configuration_with_each_seed_and_reports_paired_differences(write_spec, in_tmp):
    spec = write_spec()
    result = invoke("sweep", spec, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert "2/2 configurations done (0 pruned, 0 failed)" in plain(result.stderr)
    folder = in_tmp / "sweeps" / "tiny"
    runs = sorted(folder.glob("trials/*/seed-*"))
    assert len(runs) == 4 and all((run / "config.json").is_file() for run in runs)
    compared = invoke("compare", *runs[:2], "--out", in_tmp / "two.png", "--json")  # ordinary run folders
    assert compared.exit_code == 0, plain(compared.output)

    report = invoke("sweep", spec, "--report", "--json")
    assert report.exit_code == 0, plain(report.output)
    data = json.loads(report.stdout)
    by_alpha = {config["params"]["aux_weight"]: config for config in data["configurations"]}
    assert set(by_alpha) == {0.0, 0.001} and data["reference_found"]
    for config in by_alpha.values():  # each seed's metric is its run's best validation bound
        seeds = {seed: best_bound(folder / f"trials/{config['trial']:04d}/seed-{seed}") for seed in (0, 1)}
        assert config["values"] == {str(seed): pytest.approx(value) for seed, value in seeds.items()}
        assert config["n"] == 2 and config["mean"] == pytest.approx(sum(seeds.values()) / 2)
    (difference,) = data["differences"]
    paired = [by_alpha[0.001]["values"][seed] - by_alpha[0.0]["values"][seed] for seed in ("0", "1")]
    assert difference["mean"] == pytest.approx(sum(paired) / 2)
    assert difference["sentence"].startswith("aux_weight = 0.001 ") and ", 2 seeds, p = " in difference["sentence"]
    assert (folder / "curves.png").read_bytes().startswith(PNG_SIGNATURE)

    text = invoke("sweep", spec, "--report")
    assert "Against aux_weight = 0:" in plain(text.stdout) and difference["sentence"] in plain(text.stdout).replace("\n", " ")

    again = invoke("sweep", spec, "--device", "cpu")  # the same command on a finished sweep trains nothing
    assert again.exit_code == 0 and "seed 0, update" not in plain(again.stderr)
    assert sorted(folder.glob("trials/*/seed-*")) == runs


def test_a_variant_axis_trains_each_variants_settings_and_reports_it_by_its_label(write_spec, in_tmp):
    spec = write_spec("variants", space="variant = [{}, { aux_weight = 0.0, bwd_weight = 0.0 }]",
                      sweep="seeds = [0]\nreference = { variant = {} }")
    result = invoke("sweep", spec, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    folder = in_tmp / "sweeps" / "variants"
    trained = {}
    for run in folder.glob("trials/*/seed-0"):
        train = json.loads((run / "config.json").read_text())["train"]
        trained[(train["aux_weight"], train["bwd_weight"])] = run
    (preset,) = set(trained) - {(0.0, 0.0)}  # the base settings: the preset's α and β
    assert preset[0] > 0 and preset[1] == 1.0
    report = json.loads(invoke("sweep", spec, "--report", "--json").stdout)
    assert report["reference"] == {"variant": "base settings"} and report["reference_found"]
    (difference,) = report["differences"]
    assert difference["sentence"].startswith("aux_weight = 0, bwd_weight = 0 ")


def test_tpe_draws_from_distributions_and_runs_the_reference_first(write_spec, in_tmp):
    spec = write_spec("tpe", space="lr = { low = 1e-4, high = 1e-2, log = true }",
                      sweep='seeds = [0]\nsampler = "tpe"\ntrials = 2\nreference = { lr = 0.001 }')
    result = invoke("sweep", spec, "--device", "cpu", "--json")
    assert result.exit_code == 0, plain(result.output)
    data = json.loads(result.stdout)  # the report follows the sweep
    first, second = data["configurations"]
    assert first["params"] == {"lr": 0.001} and data["reference_found"]
    assert 1e-4 <= second["params"]["lr"] <= 1e-2 and second["params"]["lr"] != 0.001
    (difference,) = data["differences"]
    assert difference["n"] == 1 and difference["t_p"] is None and "on 1 seed (a test needs two or more)" in difference["sentence"]


@pytest.mark.parametrize("space, sweep, fragment", [
    ("aux_wieght = [0.0, 0.001]", "seeds = [0]", "Unknown setting 'aux_wieght'"),
    ("", "seeds = [0]", "empty search space"),
    ("lr = { low = 0.1, high = 0.01 }", 'seeds = [0]\nsampler = "tpe"\ntrials = 2', "low end 0.1 is above its high end"),
    ("aux_weight = [0.0, 0.001]", "trials = 2", "No seeds"),
])
def test_a_bad_spec_is_one_error_and_no_folder(write_spec, in_tmp, space, sweep, fragment):
    result = invoke("sweep", write_spec(space=space, sweep=sweep), "--device", "cpu")
    assert_clean_error(result, 2, fragment)
    assert not (in_tmp / "sweeps").exists()


@pytest.mark.parametrize("url, fragment", [
    ("postgresql://nobody@127.0.0.1:9/zforcing", "Cannot reach the storage postgresql://nobody@127.0.0.1:9/zforcing"),
    ("sqlite:///sweep.db", "SQLite cannot hold a sweep"),
    ("redis://localhost", "is not a postgresql:// or mysql:// URL"),
    ("postgresql://user:secret@[bad", "Cannot reach the storage postgresql://"),
])
def test_a_storage_that_cannot_serve_is_one_error_and_no_folder(write_spec, in_tmp, url, fragment):
    result = invoke("sweep", write_spec(), "--storage", url, "--device", "cpu")
    assert_clean_error(result, 1, fragment)
    assert "secret" not in plain(result.output)  # a password is never shown
    assert not (in_tmp / "sweeps").exists() and not (in_tmp / "sweep.db").exists()


def test_a_sweep_folder_of_another_spec_or_space_is_refused_untouched(write_spec, in_tmp):
    first = read_spec(write_spec())
    open_study(first, in_tmp / "sweeps" / "tiny", None)  # the folder and its study, without training
    before = {path: path.stat().st_mtime_ns for path in (in_tmp / "sweeps").rglob("*")}
    other_space = write_spec(space="aux_weight = [0.0, 0.01]")  # the same name, another space
    result = invoke("sweep", other_space, "--device", "cpu")
    assert_clean_error(result, 1, "sweeps/tiny belongs to another spec")
    elsewhere = write_spec(name="other")
    result = invoke("sweep", elsewhere, "--out", in_tmp / "sweeps" / "tiny", "--report")
    assert_clean_error(result, 1, "belongs to another spec")
    assert {path: path.stat().st_mtime_ns for path in (in_tmp / "sweeps").rglob("*")} == before


def test_a_report_before_any_run_says_to_run_it(write_spec, in_tmp):
    result = invoke("sweep", write_spec(), "--report")
    assert_clean_error(result, 1, "is not a sweep folder")
    assert not (in_tmp / "sweeps").exists()


def test_the_help_has_examples(in_tmp):
    result = invoke("sweep", "--help")
    assert result.exit_code == 0 and "Examples" in plain(result.output) and "zforcing sweep aux.toml --report" in plain(result.output)


def test_without_the_extra_the_error_says_what_to_install(write_spec, in_tmp, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "optuna" else real(name, *args))
    result = invoke("sweep", write_spec(), "--device", "cpu")
    assert_clean_error(result, 1, "zforcing sweep needs optuna, which is not installed")
    assert "pip install 'zforcing[sweep]'" in plain(result.stderr)
