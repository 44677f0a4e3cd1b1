"""One `zforcing sweep` process: it takes configurations from the study until the sweep's total
is reached, and trains each with every seed of the spec, in sequence, through the library's
train(). Any number of workers join the same study; the count is over all of them.

A trial is a configuration. Its seeds run one after the other, each an ordinary run folder
(`<sweep>/trials/<n>/seed-<s>`), and each seed's metric is reported to the trial with the seed
as its step: the pairing Optuna's WilcoxonPruner tests against the best configuration, so that a
configuration is pruned only when its seeds, taken together, say it is worse.

Crashes: a trial records its worker's host, pid and the process's start time. At start-up, and
before each new trial, the reaper fails the RUNNING trials of this machine whose process is gone
and re-queues them, and re-queues the trials a stop or a crash ended; a re-queued trial keeps the
run folders of the trial it repeats, so its seeds resume from their last checkpoints. On a
database, Optuna's heartbeat does the same for workers on other machines.
"""

from __future__ import annotations

import math
import os
from collections import Counter
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
import torch
from optuna.trial import TrialState

from ..checkpoint import CONFIG_FILE
from ..data import PreparedDataset
from ..errors import ZForcingError
from ..plots import metric_points, read_metrics
from ..runconfig import RunConfig, data_description
from ..runfolder import METRICS_FILE
from ..settings import resolve
from ..threads import ThreadPolicy
from ..train import StopRequest, TrainEvent, TrainingStopped, train
from .spec import SweepSpec
from .study import JOURNAL_FILE

RUNS_ATTR, HOST_ATTR, PID_ATTR, STARTED_ATTR = "runs", "host", "pid", "process_start"
ERROR_ATTR = "error"  # a configuration that cannot train (it diverged): counted as done, not repeated
INTERRUPTED_ATTR = "interrupted"  # stopped or crashed: re-queued at the next start
REAPED_ATTR = "reaped"  # its process was gone: re-queued
RETRY_ATTR = "retry_of"
SURPLUS_ATTR = "surplus"  # asked for beyond the total by a worker that raced another machine's: given up untrained
ASK_LOCK = ".ask.lock"
GRID_ID = "grid_id"  # where Optuna's GridSampler keeps a trial's point (a system attr)


@dataclass
class SweepCounts:
    """Where the sweep stands, over all workers."""

    total: int
    complete: int = 0
    pruned: int = 0
    failed: int = 0  # configurations that could not train (retried ones are not counted)
    running: int = 0
    best_value: float | None = None
    best_params: dict = field(default_factory=dict)
    eta_seconds: float | None = None

    @property
    def done(self) -> int:
        return self.complete + self.pruned + self.failed


@dataclass
class SweepEvent:
    """What a worker reports: reaped (message) | trial (a configuration starts: trial, params) |
    train (a TrainEvent of the seed's run: event) | seed (a seed's metric: value) | trial_end
    (state: complete, pruned or failed; message) | surplus (a trial beyond the total, given up:
    trial, message) | finished (the total is reached, or the others run the last trials: message).
    Each carries the sweep's counts."""

    kind: str
    counts: SweepCounts
    trial: int | None = None
    params: dict = field(default_factory=dict)
    seed: int | None = None
    value: float | None = None
    event: TrainEvent | None = None
    state: str = ""
    message: str = ""


SweepCallback = Callable[[SweepEvent], None]


class ConfigurationFailed(Exception):
    """A configuration that cannot train (the message says why): its trial fails, the sweep goes on."""


class SurplusTrial(Exception):
    """A trial beyond the sweep's total: workers on other machines asked at the same moment."""


class SweepStopped(ZForcingError):
    """A stop requested (Ctrl-C, SIGTERM): the trial in progress wrote its checkpoint and goes
    back in the queue; rerunning the same command continues."""

    exit_code = 130

    def __init__(self, reason: str):
        super().__init__(f"Stopped by {reason}; the trial in progress goes back in the queue, its runs keep their checkpoints.",
                         "Run the same command again to continue the sweep.")
        self.reason = reason


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat), which tells a pid
    reused by another process; None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return None if fields[0] == "Z" else fields[19]  # a zombie is dead; field 22 of stat is the start


def process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    now = process_start(pid)
    return now is not None if started is None else now == started


class AskLock:
    """An flock in the sweep folder around counting the trials and asking for a new one, so that
    the workers of one machine never start more than the total (released by the objective once
    its trial is recorded as this process's)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> "AskLock":
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __exit__(self, *exc_info) -> None:
        self.release()


class SweepWorker:
    """Trains configurations of one sweep until its total is reached or a stop is requested."""

    def __init__(self, spec: SweepSpec, study: optuna.Study, folder: Path, dataset: PreparedDataset, device: torch.device,
                 callback: SweepCallback | None = None, stop: StopRequest | None = None):
        self.spec, self.study, self.folder, self.dataset, self.device = spec, study, Path(folder), dataset, device
        self.callback = callback or (lambda event: None)
        self.stop = stop or StopRequest()
        self.host = socket.gethostname()
        self.started = process_start(os.getpid())
        self.journal = (self.folder / JOURNAL_FILE).exists()  # single machine: a trial without a host is a dead one's
        self.lock: AskLock | None = None
        self.counts_at_start = SweepCounts(spec.trials)  # a seed's train events carry these, not a fresh count per update

    def run(self) -> SweepCounts:
        """Take trials until the total is reached (or the others run the last ones); a
        SweepStopped when a stop was requested. Every run on the spec's thread count (one by
        default), fixed so that a run's sums never follow the machine's load; the worker
        registers as a zforcing process, so that automatic ones starting beside it leave it room."""
        with ThreadPolicy(self.spec.base.get("threads", 1)):
            return self.take_trials()

    def take_trials(self) -> SweepCounts:
        while True:
            with AskLock(self.folder / ASK_LOCK) as lock:
                self.reap()
                counts = self.counts()
                if counts.done + counts.running >= counts.total:
                    break
                self.lock = lock
                try:
                    self.study.optimize(self.objective, n_trials=1, catch=(ConfigurationFailed, SurplusTrial),
                                        callbacks=[self.trial_ended], gc_after_trial=False)
                except TrainingStopped as error:
                    raise SweepStopped(error.reason) from None
                finally:
                    self.lock = None
            if self.stop.reason is not None:
                raise SweepStopped(self.stop.reason)
        message = ("the sweep's trials are all done" if counts.done >= counts.total
                   else "the other workers run the last trials")
        self.callback(SweepEvent("finished", counts, message=message))
        return counts

    # -- the reaper ------------------------------------------------------------------------------------

    def reap(self) -> None:
        """Fail this machine's RUNNING trials whose process is gone; re-queue each trial that a
        kill, a stop or a crash ended, once."""
        storage = self.study._storage
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = trial.user_attrs
            if HOST_ATTR not in attrs and not self.journal:
                continue  # on a database: another machine's, which the heartbeat watches
            alive = PID_ATTR in attrs and process_alive(attrs[PID_ATTR], attrs.get(STARTED_ATTR))
            if attrs.get(HOST_ATTR, self.host) != self.host or alive:
                continue
            storage.set_trial_user_attr(trial._trial_id, REAPED_ATTR, True)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            message = f"trial {trial.number}'s worker (pid {attrs.get(PID_ATTR, '?')}) is gone: failed it and queued it again"
            self.callback(SweepEvent("reaped", self.counts(), trial=trial.number, params=trial.params, message=message))
        trials = self.study.get_trials(deepcopy=False)
        retried = {trial.user_attrs.get(RETRY_ATTR) for trial in trials}
        for trial in trials:
            ended = trial.state == TrialState.FAIL and (REAPED_ATTR in trial.user_attrs or INTERRUPTED_ATTR in trial.user_attrs)
            if ended and trial.number not in retried and RUNS_ATTR in trial.user_attrs:
                self.study.enqueue_trial(trial.params, user_attrs={RUNS_ATTR: trial.user_attrs[RUNS_ATTR], RETRY_ATTR: trial.number})

    # -- a trial: one configuration, every seed ----------------------------------------------------------

    def objective(self, trial: optuna.Trial) -> float:
        self.give_up_surplus(trial)
        trial.set_user_attr(RUNS_ATTR, trial.user_attrs.get(RUNS_ATTR, f"trials/{trial.number:04d}"))
        trial.set_user_attr(HOST_ATTR, self.host)
        trial.set_user_attr(PID_ATTR, os.getpid())
        trial.set_user_attr(STARTED_ATTR, self.started)
        self.lock.release()  # the trial is this process's now: other workers may ask for theirs
        params = self.suggest(trial)
        self.callback(SweepEvent("trial", self.counts(), trial=trial.number, params=params))
        values = []
        try:
            for seed in self.spec.seeds:
                value = self.train_seed(trial, {**self.spec.base, **self.spec.settings_of(params)}, seed)
                trial.report(value, step=seed)
                values.append(value)
                self.callback(SweepEvent("seed", self.counts(), trial=trial.number, params=params, seed=seed, value=value))
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after {len(values)} of {len(self.spec.seeds)} seeds")
                self.check_stop(seed)
        except (optuna.TrialPruned, ConfigurationFailed):
            raise
        except BaseException:
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            raise
        return sum(values) / len(values)

    def give_up_surplus(self, trial: optuna.Trial) -> None:
        """Raise SurplusTrial when the trials asked for before this one already make the total.

        On one machine the ask lock makes counting and asking one step, so this never happens.
        Workers on several machines count, then ask, each on its own: two that count one
        configuration left may both ask. The storage numbers trials in the order they were
        created, so the later one is the surplus; it fails untrained (neither counted nor queued
        again), and the grid point it drew is freed."""
        if not is_surplus(self.study, trial.number, self.spec.trials):
            return
        trial.set_user_attr(SURPLUS_ATTR, True)
        storage = self.study._storage
        if GRID_ID in storage.get_trial_system_attrs(trial._trial_id):
            storage.set_trial_system_attr(trial._trial_id, GRID_ID, -1)  # so that its point does not count as visited
        message = (f"trial {trial.number} would be one more than the sweep's {self.spec.trials:,} configurations (workers elsewhere "
                   "asked at the same moment): given up, nothing trained")
        self.callback(SweepEvent("surplus", self.counts(), trial=trial.number, message=message))
        raise SurplusTrial(message)

    def suggest(self, trial: optuna.Trial) -> dict:
        params = {}
        for name, axis in self.spec.space.items():
            if axis.is_grid:
                params[name] = trial.suggest_categorical(name, list(axis.values))
            elif isinstance(axis.low, int):
                params[name] = trial.suggest_int(name, axis.low, axis.high, step=axis.step or 1, log=axis.log)
            else:
                params[name] = trial.suggest_float(name, axis.low, axis.high, step=axis.step, log=axis.log)
        return params

    def check_stop(self, seed: int) -> None:
        """A stop requested between two seeds (train() raises TrainingStopped for one during a seed)."""
        if self.stop.reason is not None and seed != self.spec.seeds[-1]:
            raise SweepStopped(self.stop.reason)

    def train_seed(self, trial: optuna.Trial, settings: dict, seed: int) -> float:
        """Train (or resume, or find finished) the seed's run; its metric."""
        run_dir = self.folder / trial.user_attrs[RUNS_ATTR] / f"seed-{seed}"
        resolved = resolve({**settings, "seed": seed}, self.dataset.meta, len(self.dataset.split("train")))
        run_config = RunConfig(resolved.model, resolved.train, data_description(self.dataset), resolved.preset)
        resume = (run_dir / CONFIG_FILE).exists()
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # a kill before the run wrote its config: nothing to keep
        self.counts_at_start = self.counts()

        def forward(event: TrainEvent) -> None:
            self.callback(SweepEvent("train", self.counts_at_start, trial=trial.number, seed=seed, event=event))

        try:
            train(run_dir, run_config, self.dataset, self.device, forward, resume=resume, stop=self.stop)
        except TrainingStopped:
            raise
        except ZForcingError as error:
            trial.set_user_attr(ERROR_ATTR, f"seed {seed}: {error.message}")
            raise ConfigurationFailed(error.message) from None
        return self.run_metric(run_dir, trial, seed)

    def run_metric(self, run_dir: Path, trial: optuna.Trial, seed: int) -> float:
        """The spec's metric, from the run's validations (metrics.jsonl, so a run finished before a
        restart reads the same)."""
        metric = self.spec.metric
        _, values = metric_points(read_metrics(run_dir / METRICS_FILE), "valid", metric.key)
        if not values:
            message = f"seed {seed}: the run ended without a finite validation {metric.key}"
            trial.set_user_attr(ERROR_ATTR, message)
            raise ConfigurationFailed(message)
        if not metric.best:
            return values[-1]
        return min(values) if metric.direction == "minimize" else max(values)

    def trial_ended(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(trial.state, "failed")
        if state == "failed" and ERROR_ATTR not in trial.user_attrs:
            return  # stopped or crashed: the next start queues it again
        self.callback(SweepEvent("trial_end", self.counts(), trial=trial.number, params=trial.params, state=state,
                                 message=trial.user_attrs.get(ERROR_ATTR, "")))

    # -- counting ------------------------------------------------------------------------------------------

    def counts(self) -> SweepCounts:
        return sweep_counts(self.study, self.spec.trials)


def sweep_counts(study: optuna.Study, total: int) -> SweepCounts:
    trials = study.get_trials(deepcopy=False)
    places = Counter(place_in_total(trial) for trial in trials)
    counts = SweepCounts(total, complete=places["complete"], pruned=places["pruned"], failed=places["failed"], running=places["running"])
    durations = [(trial.datetime_complete - trial.datetime_start).total_seconds() for trial in trials
                 if trial.state == TrialState.COMPLETE and trial.datetime_start and trial.datetime_complete]
    best = best_trial(study)
    if best is not None:
        counts.best_value, counts.best_params = best.value, best.params
    if durations:
        left = max(0, counts.total - counts.done)
        counts.eta_seconds = sum(durations) / len(durations) * math.ceil(left / max(1, counts.running))
    return counts


def place_in_total(trial: optuna.trial.FrozenTrial) -> str | None:
    """The SweepCounts field a trial counts in (complete, pruned, failed as a configuration, or
    running), or None for one that takes no place in the total: failed by a stop, a crash, a
    reaper or as a surplus (the stopped and the reaped are queued again), or waiting in the queue."""
    if trial.state == TrialState.FAIL:
        return "failed" if ERROR_ATTR in trial.user_attrs else None
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.RUNNING: "running"}.get(trial.state)


def is_surplus(study: optuna.Study, number: int, total: int) -> bool:
    """Whether the trials numbered before this one that take a place in the total are the total already."""
    before = sum(1 for trial in study.get_trials(deepcopy=False)
                 if trial.number < number and place_in_total(trial) is not None)
    return before >= total


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # nothing complete yet
        return None


