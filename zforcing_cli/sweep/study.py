"""A sweep's folder and its Optuna study: where the trials are stored, which spec the folder
belongs to, and the samplers and pruner every worker builds alike (Optuna stores neither).

Storage: by default a journal file in the sweep folder, which every `zforcing sweep` process on
the machine joins; `--storage postgresql://...` (or mysql) for workers on many machines, with
Optuna's heartbeat, whose callback re-queues the trials of a worker that stopped beating. The
study is plain Optuna: optuna-dashboard opens the same storage.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from ..checkpoint import SWEEP_FILE  # the folder's spec: its name, hash, storage and reference
from ..errors import ZForcingError
from ..fileio import make_folder_once, remove_made, write_json
from .spec import SweepSpec, read_spec

JOURNAL_FILE = "study.journal"
SPEC_COPY = "spec.toml"
SPEC_HASH_ATTR = "zforcing_spec_hash"  # the study's user attribute naming its spec
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120  # a trial whose worker has not beaten for this long is failed and re-queued
CONNECT_SECONDS = 10
DATABASES = ("postgresql", "mysql")
GRID_SEED = 0  # every worker shuffles the grid alike, so that trial n means the same point to all

optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep reports its trials itself (progress on stderr)


class SweepError(ZForcingError):
    """A sweep that cannot start or go on: its folder, its storage, its study."""


def default_folder(spec: SweepSpec) -> Path:
    return Path("sweeps") / spec.name


def storage_label(url: str | None) -> str:
    """What sweep.json records of the storage: 'journal', or the URL without its password."""
    if url is None:
        return "journal"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a URL at all: its scheme is enough to say what it is
        return url.split("://", 1)[0] + "://..."


def open_database(url: str) -> RDBStorage:
    """An RDBStorage on a PostgreSQL or MySQL URL, connected now: a SweepError if it cannot be."""
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        raise SweepError("SQLite cannot hold a sweep: parallel workers lock it, and on a network file system it corrupts.",
                         "Leave out --storage (a journal file in the sweep folder, for one machine), or use postgresql://.")
    if scheme not in DATABASES:
        raise SweepError(f"--storage {url!r} is not a postgresql:// or mysql:// URL.",
                         "For example --storage postgresql://user:password@host/zforcing (docs/sweeps.md).")
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna's words; it is what Optuna offers
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url, engine_kwargs={"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_SECONDS}},
                heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
            )
    except ImportError as error:
        raise SweepError(f"--storage {storage_label(url)} needs a database driver: {error}.",
                         "Install it: pip install 'zforcing[sweep]' (psycopg for PostgreSQL), or a MySQL driver (pymysql).") from None
    except Exception as error:  # noqa: BLE001 - SQLAlchemy's and the drivers' errors alike
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise SweepError(f"Cannot reach the storage {storage_label(url)}: {reason}",
                         "Check that the server runs and takes connections from here, and the URL's user, password and database.") from None


def check_folder(folder: Path, spec: SweepSpec, url: str | None) -> None:
    """The sweep folder must be new, or this spec's, with its trials in the same storage."""
    record_path = folder / SWEEP_FILE
    if folder.exists() and not folder.is_dir():
        raise SweepError(f"{folder} is a file, not a sweep folder.", "Choose another --out.")
    if not record_path.exists():
        if folder.is_dir() and any(folder.iterdir()):
            raise SweepError(f"{folder} holds files but no {SWEEP_FILE}: it is not a sweep folder.", "Choose another --out.")
        return
    record = read_record(folder, "Choose another --out.")
    recorded_name, recorded_hash, recorded_storage = record["name"], record["spec_hash"], record["storage"]
    if recorded_name != spec.name:
        raise SweepError(f"{folder} belongs to another spec: the sweep {recorded_name!r}, not {spec.name!r}.",
                         "Give this spec its own --out.")
    if recorded_hash != spec.digest():
        raise SweepError(f"{folder} belongs to another spec (its base, space, seeds or metric differ from {spec.path}'s).",
                         f"Give this spec another --out, or put back the spec saved in {folder / SPEC_COPY}.")
    if recorded_storage != storage_label(url):
        raise SweepError(f"{folder}'s trials are in the storage {recorded_storage}, not {storage_label(url)}.",
                         "Pass the same --storage as the sweep's first run (none for its journal file).")


def read_record(folder: Path, hint: str) -> dict:
    """The folder's sweep.json: its name, spec hash and storage, and the reference of its latest
    start (older folders lack it); a SweepError with the hint when it cannot be read as one."""
    record_path = folder / SWEEP_FILE
    try:
        record = json.loads(record_path.read_text())
        if not all(isinstance(record[key], str) for key in ("name", "spec_hash", "storage")) \
                or not isinstance(record.get("reference", {}), dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise SweepError(f"{record_path} cannot be read as a sweep record.", hint) from None
    return record


def record_reference(folder: Path, spec: SweepSpec) -> None:
    """Keep sweep.json's reference the spec's (it may change between starts): `zforcing compare`
    reports a sweep folder against the reference of its latest start."""
    record = read_record(folder, "Choose another --out.")
    if record.get("reference") != spec.reference:
        write_json(folder / SWEEP_FILE, {**record, "reference": spec.reference})


def make_folder(folder: Path, spec: SweepSpec, url: str | None) -> list[Path] | None:
    """Create the sweep folder with its record and spec copy, whole at once (make_folder_once), so
    that a worker starting beside this one never finds a folder without its record; returns the
    folders made, for unmake_folder() to take back if the study cannot start; None for a folder
    that had its record, or that a worker starting at the same moment made first (checked then
    to be this spec's)."""
    if (folder / SWEEP_FILE).exists():
        return None

    def fill(staging: Path) -> None:
        write_json(staging / SWEEP_FILE, {"name": spec.name, "spec_hash": spec.digest(), "storage": storage_label(url),
                                          "reference": spec.reference})
        shutil.copyfile(spec.path, staging / SPEC_COPY)

    made = make_folder_once(folder, fill)
    if made is None:
        check_folder(folder, spec, url)
    return made


def unmake_folder(folder: Path, made: list[Path] | None) -> None:
    """Take back what make_folder and a new journal wrote."""
    if made is None:
        return
    for name in (SWEEP_FILE, SPEC_COPY, JOURNAL_FILE):
        (folder / name).unlink(missing_ok=True)
    remove_made(made)


def open_study(spec: SweepSpec, folder: Path, url: str | None) -> optuna.Study:
    """The sweep's study, created or joined, after checking that the folder and the storage are
    this spec's; nothing is left behind when that fails."""
    storage = open_database(url) if url is not None else None  # unreachable: an error before any file
    check_folder(folder, spec, url)
    made = make_folder(folder, spec, url)
    if made is None:
        record_reference(folder, spec)
    try:
        if storage is None:
            storage = JournalStorage(JournalFileBackend(str(folder / JOURNAL_FILE)))
        study = optuna.create_study(study_name=spec.name, storage=storage, load_if_exists=True,
                                    direction=spec.metric.direction, sampler=make_sampler(spec), pruner=make_pruner(spec))
        claim_study(study, spec)
        if spec.sampler == "tpe" and spec.reference:  # TPE would never draw it: the reference goes first
            study.enqueue_trial(spec.reference, skip_if_exists=True)
    except BaseException:
        unmake_folder(folder, made)
        raise
    return study


def recorded_sweep(folder: Path) -> tuple[SweepSpec, str | None, bool]:
    """A sweep folder's spec (its copy, with the name and the reference sweep.json records) and
    storage URL, for `zforcing compare SWEEP`, which has no spec file; the flag says whether
    sweep.json records the reference (folders made before it did: the copy's reference)."""
    record = read_record(folder, "Pass a folder written by zforcing sweep.")
    spec_copy = folder / SPEC_COPY
    if not spec_copy.is_file():
        raise SweepError(f"{folder} holds no {SPEC_COPY}, the copy of its spec.",
                         f"Report it from its spec: zforcing sweep SPEC --report --out {folder}")
    storage = record["storage"]
    if "***" in storage:  # storage_label hides a password
        raise SweepError(f"{folder}'s trials are in {storage}, whose password {SWEEP_FILE} does not keep.",
                         f"Report it from its spec, with the password: zforcing sweep SPEC --report --out {folder} --storage URL")
    spec = replace(read_spec(spec_copy), name=record["name"])  # the copy's file name is not the sweep's
    if "reference" in record:
        spec.reference = record["reference"]
    return spec, None if storage == "journal" else storage, "reference" in record


def load_study(spec: SweepSpec, folder: Path, url: str | None) -> optuna.Study:
    """The study of a sweep that has run (for the report); a SweepError when there is none."""
    if not (folder / SWEEP_FILE).exists():
        raise SweepError(f"{folder} is not a sweep folder: {spec.path} has not run yet there.",
                         f"Run it first: zforcing sweep {spec.path}" + (f" --out {folder}" if folder != default_folder(spec) else ""))
    check_folder(folder, spec, url)
    storage = open_database(url) if url is not None else JournalStorage(JournalFileBackend(str(folder / JOURNAL_FILE)))
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec), pruner=make_pruner(spec))
    except KeyError:
        raise SweepError(f"The storage holds no study named {spec.name!r}.", "Run the sweep first.") from None
    claim_study(study, spec)
    return study


def claim_study(study: optuna.Study, spec: SweepSpec) -> None:
    """Mark a new study as this spec's; refuse a study of the same name made by another spec."""
    recorded = study.user_attrs.get(SPEC_HASH_ATTR)
    if recorded is None:
        study.set_user_attr(SPEC_HASH_ATTR, spec.digest())
    elif recorded != spec.digest():
        raise SweepError(f"The storage already holds a sweep named {spec.name!r} with another base, space, seeds or metric.",
                         'Give this spec another name ([sweep] name = "...") or put the other one\'s space back.')


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(spec.grid(), seed=GRID_SEED)
    return optuna.samplers.TPESampler()


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """Across seeds only: a configuration is pruned when a Wilcoxon signed-rank test over the
    seeds it shares with the best says it is worse (never on one seed's noise)."""
    if not spec.prune:
        return optuna.pruners.NopPruner()
    with warnings.catch_warnings():  # "experimental": its interface may change, which the tests would tell
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.WilcoxonPruner(p_threshold=spec.prune_p)
