"""`zforcing train`: parse the options, set up or reopen the run, report progress."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .. import __version__
from ..checkpoint import resolve_latest
from ..console import stderr, stdout, training_progress
from ..data import EMBEDDED, PreparedDataset, open_dataset
from ..device import resolve_device
from ..presets import PRESETS, preset_configs
from ..train import RunConfig, TrainEvent, data_description, load_run_config, train
from .common import RUNS_ROOT, DeviceOption, usage_error

EPILOG = (
    "**Examples:** `zforcing train` (binarized MNIST, small preset, under 10 minutes on 2 CPU cores); "
    "`zforcing train --preset paper --device cuda --epochs 50`; "
    "`zforcing train --resume` continues runs/latest."
)


def train_cli(
    data: Annotated[Optional[str], typer.Option("--data", help="Prepared dataset folder, or `embedded` (binarized MNIST in the package).", show_default="embedded")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help=f"Model and training sizes: {' or '.join(PRESETS)}.", show_default="small")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder. Default: a new folder under runs/; with --resume, runs/latest.")] = None,
    device: DeviceOption = "auto",
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Passes over the training split.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many updates.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", min=0.0, help="Adam learning rate.")] = None,
    aux_weight: Annotated[Optional[float], typer.Option("--aux-weight", min=0.0, help="α: weight of the auxiliary cost -log p(b_t|z_t).")] = None,
    bwd_weight: Annotated[Optional[float], typer.Option("--bwd-weight", min=0.0, help="β: weight of the backward prediction -log p(u_t|b_t).")] = None,
    kl_anneal: Annotated[Optional[bool], typer.Option("--kl-anneal/--no-kl-anneal", help="KL weight from 0.2 to 1 by 5e-5 per update.", show_default="off")] = None,
    aux_condition: Annotated[Optional[str], typer.Option("--aux-condition", help="Condition the auxiliary head on `z` (the paper's Eq. 8) or `hz` (h_{t-1} and z_t, the original code).", show_default="z")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", min=1, help="Also checkpoint every N updates.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run's newest complete checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out folder.")] = False,
) -> None:
    """Train Z-Forcing; progress on stderr, checkpoints and metrics in the run folder."""
    torch_device = resolve_device(device)
    settings = dict(preset=preset, batch_size=batch_size, lr=lr, aux_weight=aux_weight, bwd_weight=bwd_weight,
                    kl_anneal=kl_anneal, seed=seed, data=data, aux_condition=aux_condition)
    if resume:
        run_dir, run_config, dataset = resumed_run(out, settings)
    else:
        run_dir, run_config, dataset = new_run(out, settings)
    lengths = {name: value for name, value in dict(epochs=epochs, max_steps=max_steps, checkpoint_every=checkpoint_every).items() if value is not None}
    if epochs is not None and max_steps is None:
        lengths["max_steps"] = None  # asking for epochs lifts a preset's update budget
    run_config.train = replace(run_config.train, **lengths)

    stderr.print(
        escape(f"zforcing {__version__} training on {dataset.meta.kind} ({dataset.location}) on {torch_device}; run folder {run_dir}"),
        soft_wrap=True,
    )
    with training_progress() as progress:
        result = train(run_dir, run_config, dataset, torch_device, TrainReporter(progress), resume=resume, force=force)
    best = result.state.best_seen
    stdout.print(
        f"Best validation bound: NLL ≤ {float('nan') if best is None else -best:.2f} nats per sequence; "
        f"checkpoint {escape(str(result.best_checkpoint))}", soft_wrap=True,
    )
    stdout.print(escape(f"Next: zforcing evaluate {run_dir}  or  zforcing sample {run_dir}"), soft_wrap=True)


def resumed_run(out: Path | None, settings: dict) -> tuple[Path, RunConfig, PreparedDataset]:
    """The run to continue; a resumed run keeps every setting but its length and device."""
    changed = [name for name, value in settings.items() if value is not None]
    if changed:
        raise usage_error(
            f"--{changed[0].replace('_', '-')} cannot change when resuming.",
            "A resumed run keeps its configuration; only --epochs, --max-steps, --checkpoint-every and --device may be given.",
        )
    run_dir = out or resolve_latest(RUNS_ROOT)
    run_config = load_run_config(run_dir)
    return run_dir, run_config, open_dataset(run_config.data["location"])


def new_run(out: Path | None, settings: dict) -> tuple[Path, RunConfig, PreparedDataset]:
    """A new run: the preset's sizes for the dataset, with the options given on top."""
    dataset = open_dataset(settings.pop("data") or EMBEDDED)
    model_config, train_config = preset_configs(settings.pop("preset") or "small", dataset.meta)
    model_config = apply_model_options(model_config, settings.pop("aux_condition"))
    train_config = replace(train_config, **{name: value for name, value in settings.items() if value is not None})
    return out or new_run_dir(), RunConfig(model_config, train_config, data_description(dataset)), dataset


def apply_model_options(config, aux_condition: str | None):
    if aux_condition is None:
        return config
    if aux_condition not in ("z", "hz"):
        raise usage_error(f"--aux-condition must be z or hz, not {aux_condition!r}.", "z: p(b_t|z_t) as in the paper; hz: p(b_t|h_{t-1},z_t).")
    return replace(config, aux_on_hidden=aux_condition == "hz")


def new_run_dir() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, suffix = RUNS_ROOT / stamp, 1
    while run_dir.exists():
        suffix += 1
        run_dir = RUNS_ROOT / f"{stamp}-{suffix}"
    return run_dir


class TrainReporter:
    """Turns TrainEvents into a rich progress bar and validation lines on stderr.

    When stderr is not a terminal (a log file, CI), a plain line every LOG_SECONDS replaces the
    live bar, which rich would only draw at the end.
    """

    LOG_SECONDS = 30.0

    def __init__(self, progress):
        self.progress = progress
        self.task = None
        self.started = time.perf_counter()
        self.last_line = self.started
        self.first_step: int | None = None

    def __call__(self, event: TrainEvent) -> None:
        if event.kind == "start":
            self.task = self.progress.add_task("train", total=event.total_steps, completed=event.step, speed="", metrics="")
            self.first_step = event.step
            stderr.print(f"{event.metrics['parameters']:,} parameters; {event.total_steps:,} updates", highlight=False)
            if event.step >= event.total_steps:
                stderr.print(
                    f"The run already took its {event.total_steps:,} updates; "
                    "pass --epochs N or --max-steps N with --resume to train longer."
                )
        elif event.kind == "step":
            m = event.metrics
            now = time.perf_counter()
            rate = (event.step - self.first_step) / max(now - self.started, 1e-9)
            metrics = f"loss {m['loss']:.1f} KL {m['kl']:.2f} aux {m['aux']:.0f}"
            self.progress.update(self.task, completed=event.step, speed=f"{rate:.2f} steps/s", metrics=metrics)
            if not stderr.is_terminal and now - self.last_line >= self.LOG_SECONDS:
                self.last_line = now
                stderr.print(f"step {event.step}/{event.total_steps} {rate:.2f} steps/s {metrics}")
        elif event.kind == "skip":
            self.progress.update(self.task, completed=event.step)
            self.progress.console.print(f"[yellow]step {event.step}: non-finite loss, update skipped ({event.metrics['skipped_steps']} so far)")
        elif event.kind == "validation":
            m = event.metrics
            note = " [green]best[/]" if m["improved"] else ""
            note += f" [yellow]lr halved to {m['lr']:.2g}[/]" if m["lr_halved"] else ""
            self.progress.console.print(
                f"epoch {event.epoch + 1} step {event.step}: valid NLL ≤ {m['nll_bound']:.2f} nats, KL {m['kl']:.2f}{note}"
            )
