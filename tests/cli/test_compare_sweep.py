"""`zforcing compare SWEEP`: a sweep folder's report without its spec, the same as `zforcing sweep
SPEC --report`'s; a sweep folder beside run folders, and a folder whose storage needs a password,
are one error. The sweep folder is built without training: its study's trials added by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from conftest import PNG_SIGNATURE, assert_clean_error, invoke, plain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sweep"))
from sweep_helpers import write_spec  # noqa: E402, F401 - a fixture

from zforcing_cli.sweep import open_study, read_spec  # noqa: E402
from zforcing_cli.sweep.worker import RUNS_ATTR  # noqa: E402

ALPHAS = (0.0, 0.001)
BOUNDS = {0.0: {0: 131.0, 1: 133.5, 2: 130.0}, 0.001: {0: 130.0, 1: 131.5, 2: 129.5}}  # by α, by seed


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_validations(run: Path, best: float) -> None:
    """A seed's run folder as far as the report reads it: two validations, the second the best."""
    run.mkdir(parents=True)
    records = [{"type": "valid", "step": step, "nll_bound": bound, "kl": 1.0} for step, bound in ((1, best + 2.0), (2, best))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def finished_sweep(spec_path: Path, folder: Path) -> optuna.Study:
    """The folder and study `zforcing sweep` leaves after both configurations ran with three seeds."""
    study = open_study(read_spec(spec_path), folder, None)
    for number, alpha in enumerate((0.001, 0.0)):
        runs = f"trials/{number:04d}"
        for seed, bound in BOUNDS[alpha].items():
            write_validations(folder / runs / f"seed-{seed}", bound)
        study.add_trial(create_trial(
            params={"aux_weight": alpha}, distributions={"aux_weight": CategoricalDistribution(ALPHAS)},
            value=sum(BOUNDS[alpha].values()) / 3, intermediate_values=BOUNDS[alpha], user_attrs={RUNS_ATTR: runs},
            state=TrialState.COMPLETE))
    return study


def test_compare_on_a_sweep_folder_prints_the_sweeps_report(write_spec, in_tmp):
    spec = write_spec(sweep="seeds = [0, 1, 2]\nreference = { aux_weight = 0.0 }")
    folder = in_tmp / "sweeps" / "tiny"
    finished_sweep(spec, folder)

    report = invoke("sweep", spec, "--report", "--json")
    assert report.exit_code == 0, plain(report.output)
    (folder / "curves.png").unlink()
    compared = invoke("compare", folder, "--json")
    assert compared.exit_code == 0, plain(compared.output)
    assert json.loads(compared.stdout) == json.loads(report.stdout)
    data = json.loads(compared.stdout)
    (difference,) = data["differences"]
    assert difference["mean"] == pytest.approx(-3.5 / 3) and difference["n"] == 3  # (-1 - 2 - 0.5) / 3
    assert difference["sentence"].startswith("aux_weight = 0.001 lowers the validation bound by 1.17")
    assert (folder / "curves.png").read_bytes().startswith(PNG_SIGNATURE)  # the band plot, drawn by compare too

    text = invoke("compare", folder)
    assert text.exit_code == 0 and plain(text.stdout) == plain(invoke("sweep", spec, "--report").stdout)
    assert "Against aux_weight = 0:" in plain(text.stdout) and "Note:" not in plain(text.stderr)


def test_compare_reports_against_the_reference_of_the_latest_start(write_spec, in_tmp):
    folder = in_tmp / "sweeps" / "tiny"
    finished_sweep(write_spec(sweep="seeds = [0, 1, 2]\nreference = { aux_weight = 0.0 }"), folder)
    open_study(read_spec(write_spec(sweep="seeds = [0, 1, 2]\nreference = { aux_weight = 0.001 }")), folder, None)
    assert json.loads((folder / "sweep.json").read_text())["reference"] == {"aux_weight": 0.001}
    result = invoke("compare", folder, "--json")
    assert result.exit_code == 0, plain(result.output)
    (difference,) = json.loads(result.stdout)["differences"]
    assert difference["against"] == {"aux_weight": 0.001} and difference["mean"] == pytest.approx(7 / 6)


def test_an_older_sweep_folder_without_its_reference_says_which_it_uses(write_spec, in_tmp):
    folder = in_tmp / "sweeps" / "tiny"
    finished_sweep(write_spec(sweep="seeds = [0, 1, 2]\nreference = { aux_weight = 0.0 }"), folder)
    record = json.loads((folder / "sweep.json").read_text())
    del record["reference"]
    (folder / "sweep.json").write_text(json.dumps(record))
    result = invoke("compare", folder, "--json")
    assert result.exit_code == 0, plain(result.output)
    assert json.loads(result.stdout)["differences"][0]["against"] == {"aux_weight": 0.0}  # the spec copy's
    assert "records no reference" in plain(result.stderr) and "spec.toml" in plain(result.stderr)


def test_a_sweep_folder_beside_run_folders_is_one_error(write_spec, in_tmp):
    folder = in_tmp / "sweeps" / "tiny"
    finished_sweep(write_spec(), folder)
    result = invoke("compare", folder / "trials" / "0000" / "seed-0", folder)
    assert_clean_error(result, 2, "is a sweep folder, which compare reports alone")
    assert_clean_error(invoke("compare", folder, folder), 2, f"not beside {folder}.")
    assert_clean_error(invoke("compare", folder, "--metric", "elbo"), 2, "--metric is for run folders")
    assert not (in_tmp / "compare.png").exists() and not (folder / "curves.png").exists()


def test_a_sweep_on_a_database_with_a_password_asks_for_the_spec(write_spec, in_tmp):
    folder = in_tmp / "sweeps" / "tiny"
    finished_sweep(write_spec(), folder)
    record = json.loads((folder / "sweep.json").read_text())
    (folder / "sweep.json").write_text(json.dumps({**record, "storage": "postgresql://user:***@host/zforcing"}))
    result = invoke("compare", folder)
    assert_clean_error(result, 1, "whose password sweep.json does not keep")
    assert "--storage URL" in plain(result.stderr)
