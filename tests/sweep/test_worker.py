"""sweep/worker.py for real: worker processes joining one journal-backed study, and a worker
SIGKILLed in the middle of a trial, whose trial the next start reaps and finishes."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from conftest import invoke, plain
from sweep_helpers import Worker, write_spec  # noqa: F401 - write_spec: a fixture

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals and flock")
TIMEOUT = 180.0  # seconds; only reached when something is broken


def journal_study(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(folder / "study.journal"))))


def wait_for(condition, what: str, worker: Worker) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if worker.process.poll() is not None:
            pytest.fail(f"the worker exited ({worker.process.returncode}) before {what}:\n{worker.stderr()}")
        if time.monotonic() > deadline:
            worker.process.kill()
            pytest.fail(f"no {what} within {TIMEOUT:.0f} s:\n{worker.stderr()}")
        time.sleep(0.05)


def test_two_workers_join_one_study_and_stop_at_its_total(write_spec, tmp_path):
    # 12 updates a run: long enough that both workers, started together, are up before the trials run out
    spec = write_spec("pair", space="aux_weight = [0.0, 0.001, 0.002, 0.003]", sweep="seeds = [0]", steps=12)
    workers = [Worker(tmp_path, spec), Worker(tmp_path, spec)]
    for worker in workers:
        assert worker.finish(TIMEOUT) == 0, worker.stderr()
    study = journal_study(tmp_path / "sweeps" / "pair", "pair")
    trials = study.get_trials()
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * 4  # the total over both, no more
    assert sorted(trial.params["aux_weight"] for trial in trials) == [0.0, 0.001, 0.002, 0.003]
    assert {trial.user_attrs["pid"] for trial in trials} == {worker.process.pid for worker in workers}
    assert all("The sweep's trials are all done" in worker.stderr() or "the other workers run the last trials" in worker.stderr().lower()
               for worker in workers)


def test_a_worker_killed_mid_trial_is_reaped_and_the_rerun_loses_nothing(write_spec, tmp_path, monkeypatch):
    spec = write_spec("killed", space="aux_weight = [0.0, 0.001]", sweep="seeds = [0, 1]")
    folder = tmp_path / "sweeps" / "killed"
    worker = Worker(tmp_path, spec)
    wait_for(lambda: (folder / "trials" / "0000" / "seed-1").exists(), "second seed of the first trial", worker)
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait()
    (first,) = [trial for trial in journal_study(folder, "killed").get_trials() if trial.number == 0]
    assert first.state == TrialState.RUNNING and first.intermediate_values == {0: pytest.approx(first.intermediate_values[0])}
    finished_seed = sorted((folder / "trials" / "0000" / "seed-0" / "checkpoints").glob("step-*"))
    stamps = [path.stat().st_mtime_ns for path in finished_seed]

    monkeypatch.chdir(tmp_path)
    result = invoke("sweep", spec, "--device", "cpu")  # the same command again
    assert result.exit_code == 0, plain(result.output)
    assert f"trial 0's worker (pid {worker.process.pid}) is gone" in plain(result.stderr)
    trials = journal_study(folder, "killed").get_trials()
    reaped, *others = trials
    assert reaped.state == TrialState.FAIL and reaped.user_attrs["reaped"]
    complete = [trial for trial in others if trial.state == TrialState.COMPLETE]
    assert len(complete) == 2 and len(others) == 2  # the total, nothing more
    (retry,) = [trial for trial in complete if trial.user_attrs.get("retry_of") == 0]
    assert retry.params == reaped.params and retry.user_attrs["runs"] == "trials/0000"
    assert retry.intermediate_values[0] == pytest.approx(first.intermediate_values[0])  # seed 0 kept, not retrained
    assert [path.stat().st_mtime_ns for path in finished_seed] == stamps
    assert f"trial {retry.number} seed 0, update" not in plain(result.stderr)  # its validation is not redone
    assert f"trial {retry.number} seed 1, update" in plain(result.stderr)
    assert not (folder / "trials" / f"{retry.number:04d}").exists()  # the retry trains in the killed trial's folders


def test_a_stopped_worker_continues_where_it_stopped(write_spec, tmp_path, monkeypatch):
    spec = write_spec("stopped", space="aux_weight = [0.0]", sweep="seeds = [0, 1]", steps=18)
    folder = tmp_path / "sweeps" / "stopped"
    worker = Worker(tmp_path, spec)
    wait_for(lambda: any((folder / "trials" / "0000" / "seed-0").glob("metrics.jsonl")), "the first run's first update", worker)
    worker.process.send_signal(signal.SIGINT)
    assert worker.finish(TIMEOUT) == 130, worker.stderr()
    assert "To continue: zforcing sweep " in worker.stderr()
    (stopped,) = journal_study(folder, "stopped").get_trials()
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["interrupted"]
    checkpoints = list((folder / "trials" / "0000" / "seed-0" / "checkpoints").glob("step-*"))
    assert checkpoints  # the stop wrote one

    monkeypatch.chdir(tmp_path)
    result = invoke("sweep", spec, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    assert "trial 1 seed 0: resuming from " in plain(result.stderr)
    _, retry = journal_study(folder, "stopped").get_trials()
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_of"] == 0 and set(retry.intermediate_values) == {0, 1}


class FreedLock:
    """What the run loop's ask lock is to objective(): released once the trial is claimed."""

    def release(self) -> None:
        pass


def test_a_trial_asked_beyond_the_total_by_a_racing_machine_is_given_up_untrained(write_spec, tmp_path):
    """Machine B counted one configuration left, but machine A asked first: both asked, and B's
    trial (the later number) would be one more than the total. It is failed without training,
    counted nowhere, not queued again, and its grid point stays free."""
    import torch

    from zforcing_cli.data import open_dataset
    from zforcing_cli.sweep import SweepWorker, open_study, read_spec
    from zforcing_cli.sweep.worker import SURPLUS_ATTR, SurplusTrial, is_surplus

    spec = read_spec(write_spec("race", space="aux_weight = [0.0, 0.001, 0.002]", sweep="seeds = [0]\ntrials = 2"))
    folder = tmp_path / "sweeps" / "race"
    study = open_study(spec, folder, None)
    events = []
    worker = SweepWorker(spec, study, folder, open_dataset(spec.base["data"]), torch.device("cpu"), events.append)
    for _ in range(2):  # the two configurations of the total, running on machine A
        trial = study.ask()
        study._storage.set_trial_user_attr(trial._trial_id, "host", "machine-a")
    worker.lock = FreedLock()
    study.optimize(worker.objective, n_trials=1, catch=(SurplusTrial,))  # B asks as the run loop does

    first, second, surplus = study.get_trials()
    assert surplus.state == TrialState.FAIL and surplus.user_attrs == {SURPLUS_ATTR: True}
    assert surplus.system_attrs.get("grid_id") == -1 and not (folder / "trials").exists()
    assert [event.kind for event in events] == ["surplus"] and "one more than the sweep's 2 configurations" in events[0].message
    counts = worker.counts()
    assert (counts.running, counts.done, counts.failed) == (2, 0, 0)
    worker.reap()
    assert len(study.get_trials()) == 3  # nothing queued again
    assert not is_surplus(study, second.number, 2) and is_surplus(study, surplus.number, 2)
    study.tell(first.number, state=TrialState.FAIL)  # A's first trial crashes: B's later number takes the free place
    assert not is_surplus(study, surplus.number, 2)
