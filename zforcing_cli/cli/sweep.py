"""`zforcing sweep SPEC.toml`: run a sweep's configurations, seed by seed, as one of any number
of workers joining its study, with progress on stderr; `--report` prints each configuration's
numbers over its seeds and its paired differences against the reference, and draws their
validation curves. The core (zforcing_cli/sweep/, stats.py) needs Optuna and SciPy, the extra
`zforcing[sweep]`, imported only when the command runs."""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..console import stderr, stdout
from ..errors import ZForcingError
from ..humanize import duration, plural
from .common import DeviceOption
from .train import SIGNAL_EXIT_CODES, stop_on_signals

EPILOG = (
    "**Examples:** `zforcing sweep aux.toml` runs the sweep in sweeps/aux (start the same command in other terminals "
    "for more workers on this machine); `zforcing sweep aux.toml --storage postgresql://user:pw@host/zforcing` "
    "on every machine of a cluster; `zforcing sweep aux.toml --report` prints each configuration's mean ± SD and 95% "
    "CI over its seeds, the paired differences against the reference, and draws sweeps/aux/curves.png. "
    "The spec's format: docs/sweeps.md. Rerunning a stopped or killed sweep's command continues it."
)
PACKAGES = ("optuna", "scipy")


def require_sweep_packages() -> None:
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ZForcingError(f"zforcing sweep needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed.",
                            "Install them with: pip install 'zforcing[sweep]'.")


def sweep_cli(
    spec: Annotated[Path, typer.Argument(help="The sweep's spec, a TOML file (docs/sweeps.md).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", help="The sweep folder. Default: sweeps/<the spec's name>.", show_default=False)] = None,
    storage: Annotated[Optional[str], typer.Option(
        "--storage", show_default="a journal file in the sweep folder",
        help="A postgresql:// or mysql:// URL, for workers on several machines (never SQLite).")] = None,
    report: Annotated[bool, typer.Option("--report", help="Do not train: print the report of what the sweep has so far, and draw its curves.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Run a sweep: configurations from a grid or TPE (Optuna), each trained with every seed of the spec, pruned only by a paired test across seeds; then report each configuration's mean ± SD and 95% CI and its paired differences against the reference."""
    require_sweep_packages()
    from ..data import open_dataset
    from ..device import resolve_device
    from ..evaluate import bound_unit
    from ..sweep import SweepStopped, SweepWorker, default_folder, open_study, read_spec
    from ..sweep.study import storage_label
    from ..train import StopRequest

    sweep_spec = read_spec(spec)
    folder = out or default_folder(sweep_spec)
    if report:
        report_sweep(sweep_spec, folder, storage, as_json)
        return
    dataset = open_dataset(sweep_spec.base.get("data", "embedded"))
    unit = bound_unit(dataset.meta.modality)
    torch_device = resolve_device(device)
    study = open_study(sweep_spec, folder, storage)
    stderr.print(escape(f"Sweep {sweep_spec.name!r} in {folder}: {plural(sweep_spec.trials, 'configuration')} × {plural(len(sweep_spec.seeds), 'seed')}, "
                        f"{sweep_spec.sampler} sampler, storage {storage_name(storage, folder)}"), soft_wrap=True)
    stop = StopRequest()
    try:
        with stop_on_signals(stop, stderr):
            SweepWorker(sweep_spec, study, folder, dataset, torch_device, SweepReporter(unit), stop).run()
    except SweepStopped as stopped:
        again = ["zforcing", "sweep", str(spec)] + (["--out", str(out)] if out else []) + (["--storage", storage_label(storage)] if storage else [])
        stderr.print(escape(f"{stopped.message}\nTo continue: {shlex.join(again)}"), soft_wrap=True)
        raise typer.Exit(SIGNAL_EXIT_CODES.get(stopped.reason, 1)) from None
    print_report(sweep_spec, study, folder, unit, as_json)


def storage_name(url: str | None, folder: Path) -> str:
    from ..sweep.study import JOURNAL_FILE, storage_label

    return str(folder / JOURNAL_FILE) if url is None else storage_label(url)


class SweepReporter:
    """SweepEvents as lines on stderr: trials as they start and end, each seed's metric and
    validations, and the sweep's counts with the best so far and an ETA."""

    def __init__(self, unit: str):
        self.unit = unit

    def say(self, text: str, style: str = "") -> None:
        stderr.print(escape(text), style=style or None, soft_wrap=True)

    def __call__(self, event) -> None:
        handler = getattr(self, f"on_{event.kind}", None)
        if handler is not None:
            handler(event)

    def on_reaped(self, event) -> None:
        self.say(event.message, "yellow")

    on_surplus = on_reaped  # a trial beyond the total, given up: said the same way

    def on_trial(self, event) -> None:
        from ..sweep.report import describe_params

        self.say(f"trial {event.trial}: {describe_params(event.params)}")

    def on_train(self, event) -> None:
        train_event = event.event
        if train_event.kind == "validation":
            self.say(f"  trial {event.trial} seed {event.seed}, update {train_event.step:,}/{train_event.total_steps:,}: "
                     f"validation bound {train_event.metrics['nll_bound']:.2f} {self.unit}, KL {train_event.metrics['kl']:.2f}", "dim")
        elif train_event.kind == "resume" and train_event.path is not None:
            self.say(f"  trial {event.trial} seed {event.seed}: resuming from {train_event.path} (update {train_event.step:,})")
        elif train_event.kind in ("warning", "stale_lock"):
            self.say(f"  trial {event.trial} seed {event.seed}: {train_event.message}", "yellow")

    def on_seed(self, event) -> None:
        self.say(f"  trial {event.trial} seed {event.seed}: {event.value:.2f} {self.unit}")

    def on_trial_end(self, event) -> None:
        note = f" ({event.message})" if event.message else ""
        self.say(f"trial {event.trial} {event.state}{note}; {self.status(event.counts)}")

    def on_finished(self, event) -> None:
        self.say(f"{event.message[0].upper()}{event.message[1:]}: {self.status(event.counts)}")

    def status(self, counts) -> str:
        from ..sweep.report import describe_params

        parts = [f"{counts.done}/{counts.total} configurations done ({counts.pruned} pruned, {counts.failed} failed), {counts.running} running"]
        if counts.best_value is not None:
            parts.append(f"best {counts.best_value:.2f} {self.unit} ({describe_params(counts.best_params)})")
        if counts.eta_seconds is not None and counts.done < counts.total:
            parts.append(f"about {duration(counts.eta_seconds)} left")
        return "; ".join(parts)


def report_sweep(spec, folder: Path, storage: str | None, as_json: bool) -> None:
    """The report of what the sweep in folder has so far (`sweep SPEC --report`, `compare SWEEP`)."""
    from ..data import open_dataset
    from ..evaluate import bound_unit
    from ..sweep import load_study

    study = load_study(spec, folder, storage)
    unit = bound_unit(open_dataset(spec.base.get("data", "embedded")).meta.modality)
    print_report(spec, study, folder, unit, as_json)


def print_report(spec, study, folder: Path, unit: str, as_json: bool) -> None:
    from ..sweep import SweepError, build_report, configurations
    from ..sweep.plot import CURVES_STEM, write_sweep_curves

    result = build_report(spec, study, folder, unit)
    if not result["configurations"]:
        raise SweepError(f"No configuration of the sweep {spec.name!r} has finished yet.", f"Run it: zforcing sweep SPEC --out {folder}")
    written = write_sweep_curves(configurations(study, folder), spec.metric.key, f"{spec.metric.phrase.removeprefix('the ')} ({unit})", folder / CURVES_STEM)
    if as_json:
        stdout.print_json(json.dumps(result, allow_nan=False, default=str))
    else:
        stdout.print(report_table(result))
        for line in report_sentences(result):
            stdout.print(escape(line), soft_wrap=True)
    if written:
        stderr.print(escape(f"Wrote the validation curves to {written[0]} (and .svg)"), soft_wrap=True)


def report_table(result: dict) -> Table:
    from ..stats import number
    from ..sweep.report import describe_params

    table = Table(title=f"{result['metric']} ({result['unit']}), over seeds", title_justify="left", header_style="bold")
    for column in ("trial", "configuration", "state", "seeds", "mean ± SD", "95% CI"):
        table.add_column(column, justify="right" if column in ("trial", "seeds") else "left")
    for config in result["configurations"]:
        low, high = (math.nan if config[key] is None else config[key] for key in ("ci_low", "ci_high"))
        sd = math.nan if config["sd"] is None else config["sd"]
        table.add_row(str(config["trial"]), escape(describe_params(config["params"])), config["state"], str(config["n"]),
                      f"{number(config['mean'])} ± {number(sd)}", f"[{number(low)}, {number(high)}]")
    return table


def report_sentences(result: dict) -> list[str]:
    from ..sweep.report import describe_params

    if not result["reference"]:
        return ["No reference in the spec ([sweep] reference = { ... }): no paired differences."]
    if not result["reference_found"]:
        return [f"The reference ({describe_params(result['reference'])}) has not finished yet: no paired differences."]
    return [f"Against {describe_params(result['reference'])}:"] + [f"  {row['sentence']}" for row in result["differences"]]
