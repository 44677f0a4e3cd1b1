"""sweep/study.py against a real PostgreSQL server, started for these tests in a temporary folder
on a Unix socket (as the `postgres` user when the tests run as root: initdb refuses root)."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import assert_clean_error, invoke, plain
from sweep_helpers import write_spec  # noqa: F401 - a fixture

from zforcing_cli.sweep import open_study, read_spec
from zforcing_cli.sweep import study as study_module

PORT = 54329  # names the socket file in our own folder; nothing listens on the network


def postgres_program(name: str) -> str | None:
    """initdb and pg_ctl: on the PATH, or where Debian's packages put them (newest version)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda path: int(Path(path).parts[-3]))
    return candidates[-1] if candidates else None


def as_postgres_user(folder: Path) -> list[str]:
    """The command prefix that runs the server's programs as a user they accept, owning folder."""
    if os.geteuid() != 0:
        return []
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("the tests run as root, which initdb refuses, and there is no postgres user to run it as")
    runuser = shutil.which("runuser") or shutil.which("su")
    if runuser is None:
        pytest.skip("the tests run as root, which initdb refuses, and neither runuser nor su is here to switch user")
    os.chown(folder, user.pw_uid, user.pw_gid)
    return [runuser, "-u", "postgres", "--"] if runuser.endswith("runuser") else [runuser, "postgres", "-c"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    if command[-2:-1] == ["-c"]:  # su postgres -c "..."
        command = [*command[:-1], " ".join(map(str, command[-1]))]
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = postgres_program("initdb"), postgres_program("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'zforcing[sweep]')")
    folder = Path(tempfile.mkdtemp(prefix="zf-pg-"))  # short: a Unix socket's path holds about 100 characters
    user = as_postgres_user(folder)

    def as_user(*command) -> subprocess.CompletedProcess:
        return run([*user, list(command)] if user[-1:] == ["-c"] else [*user, *command])

    try:
        made = as_user(initdb, "-D", folder / "data", "-A", "trust", "-U", "postgres", "-N")
        if made.returncode != 0:
            pytest.skip(f"initdb could not make a database cluster: {made.stderr.strip()[-500:]}")
        options = f"-k {folder} -c listen_addresses='' -p {PORT} -c fsync=off"
        started = as_user(pg_ctl, "-D", folder / "data", "-l", folder / "server.log", "-w", "-t", "60", "-o", options, "start")
        if started.returncode != 0:
            log = (folder / "server.log").read_text() if (folder / "server.log").exists() else started.stderr
            pytest.skip(f"the PostgreSQL server would not start here: {log.strip()[-500:]}")
        yield f"postgresql://postgres@/postgres?host={folder}&port={PORT}"
        as_user(pg_ctl, "-D", folder / "data", "-m", "immediate", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_sweep_on_postgresql_runs_reports_and_keeps_a_plain_optuna_study(write_spec, tmp_path, monkeypatch, postgres_url):
    monkeypatch.chdir(tmp_path)
    spec = write_spec("pg", sweep="seeds = [0]\nreference = { aux_weight = 0.0 }")
    result = invoke("sweep", spec, "--storage", postgres_url, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    study = optuna.load_study(study_name="pg", storage=postgres_url)  # what optuna-dashboard opens
    assert [trial.state for trial in study.get_trials()] == [TrialState.COMPLETE] * 2
    assert json.loads((tmp_path / "sweeps" / "pg" / "sweep.json").read_text())["storage"].startswith("postgresql://postgres@/postgres")
    assert not (tmp_path / "sweeps" / "pg" / "study.journal").exists()
    report = invoke("sweep", spec, "--storage", postgres_url, "--report", "--json")
    assert report.exit_code == 0, plain(report.output)
    assert {config["trial"] for config in json.loads(report.stdout)["configurations"]} == {0, 1}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::optuna.exceptions.ExperimentalWarning")  # Optuna's words on ask() and heartbeats
def test_a_trial_whose_worker_stops_beating_is_failed_and_queued_again_with_its_runs(write_spec, tmp_path, monkeypatch, postgres_url):
    monkeypatch.setattr(study_module, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(study_module, "GRACE_SECONDS", 1)
    study = open_study(read_spec(write_spec("beat")), tmp_path / "beat", postgres_url)
    trial = study.ask()  # a worker on another machine, which then dies
    trial.set_user_attr("runs", "trials/0000")
    study._storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)  # what every worker's optimize() does before a trial
    dead, retry = study.get_trials()
    assert dead.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.params == dead.params and retry.user_attrs["runs"] == "trials/0000"  # it resumes the dead one's runs


def test_a_second_sweep_with_the_same_name_and_another_space_is_refused(write_spec, tmp_path, monkeypatch, postgres_url):
    monkeypatch.chdir(tmp_path)
    open_study(read_spec(write_spec("shared")), tmp_path / "first", postgres_url)
    other = write_spec("shared", space="aux_weight = [0.0, 0.5]")
    result = invoke("sweep", other, "--storage", postgres_url, "--out", tmp_path / "second", "--device", "cpu")
    assert_clean_error(result, 1, "already holds a sweep named 'shared' with another base, space, seeds or metric")
    assert not (tmp_path / "second").exists()
