"""The `zforcing` command: thin wrappers that parse options, call the core and print."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from . import __version__
from .checkpoint import load_model, resolve_checkpoint, resolve_latest
from .console import handle_errors, print_error, results_table, simple_progress, stderr, stdout, training_progress
from .data import AVAILABLE_KINDS, EMBEDDED, PLANNED_KINDS, PreparedDataset, open_dataset, prepare
from .device import resolve_device
from .errors import DataError, ZForcingError
from .evaluate import evaluate_split
from .fileio import check_can_write
from .generate import sample_images
from .presets import PRESETS, preset_configs
from .train import RunConfig, TrainEvent, data_description, load_run_config, train

app = typer.Typer(
    name="zforcing",
    help="Train, evaluate and sample the Z-Forcing stochastic recurrent model (Goyal et al., NIPS 2017).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

RUNS_ROOT = Path("runs")
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
CheckpointArgument = Annotated[
    Optional[Path],
    typer.Argument(help="A run folder or a checkpoint folder. Default: runs/latest.", show_default=False),
]


def version_callback(value: bool) -> None:
    if value:
        stdout.print(f"zforcing {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Z-Forcing: stochastic recurrent networks trained with an auxiliary cost."""


def usage_error(message: str, hint: str = "") -> typer.Exit:
    print_error(message, hint)
    return typer.Exit(2)


# -- prepare -------------------------------------------------------------------------------------


@app.command(
    "prepare",
    epilog="**Examples:** `zforcing prepare mnist ~/data/binarized_mnist --out data/mnist` reads "
    "Larochelle's three .amat files; `zforcing prepare mnist embedded` writes out the copy in the package.",
)
@handle_errors
def prepare_cli(
    kind: Annotated[str, typer.Argument(help=f"Data kind: {', '.join(AVAILABLE_KINDS)} (coming: {', '.join(PLANNED_KINDS)}).")],
    source: Annotated[str, typer.Argument(help="Raw data: for mnist, the folder of Larochelle's .amat files, or `embedded`.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write. Default: data/KIND.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Read a raw corpus once into a prepared dataset folder (meta.json + memory-mapped arrays)."""
    out = out or Path("data") / kind
    started = time.perf_counter()
    with stderr.status(escape(f"Preparing {kind} from {source} ...")):
        dataset = prepare(kind, source, out, force=force)
    counts = ", ".join(f"{split} {count:,}" for split, count in dataset.meta.counts.items())
    stdout.print(escape(f"Prepared {kind} at {out} ({counts}) in {time.perf_counter() - started:.1f} s."), soft_wrap=True)


# -- train ---------------------------------------------------------------------------------------


@app.command(
    "train",
    epilog="**Examples:** `zforcing train` (binarized MNIST, small preset, under 10 minutes on 2 CPU cores); "
    "`zforcing train --preset paper --device cuda --epochs 50`; "
    "`zforcing train --resume` continues runs/latest.",
)
@handle_errors
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


# -- evaluate ------------------------------------------------------------------------------------


@app.command(
    "evaluate",
    epilog="**Examples:** `zforcing evaluate runs/latest --iwae 50`; `zforcing evaluate --split valid --json`",
)
@handle_errors
def evaluate_cli(
    checkpoint: CheckpointArgument = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Prepared dataset; default: the one the model was trained on.")] = None,
    split: Annotated[str, typer.Option("--split", help="test or valid.")] = "test",
    iwae: Annotated[int, typer.Option("--iwae", min=0, help="Also report the importance-weighted bound with K samples.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences (times K samples) per forward pass.")] = 500,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Evaluate only the first N sequences (0: all).")] = 0,
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Report the paper's bounds on a split: ELBO, KL and (with --iwae K) the IWAE bound, in nats."""
    if split not in ("test", "valid"):
        raise usage_error(f"--split must be test or valid, not {split!r}.", "Use --split test (the default) or --split valid.")
    torch_device = resolve_device(device)
    folder = resolve_checkpoint(checkpoint, RUNS_ROOT)
    model, config = load_model(folder, torch_device)
    dataset = open_training_data(config) if data is None else open_dataset(data)
    if dataset.meta.modality != model.config.modality:
        raise ZForcingError(
            f"The dataset holds {dataset.meta.modality} data but the model models {model.config.modality} data.",
            "Pass the --data the model was trained on.",
        )
    with simple_progress(f"Evaluating {split}") as progress:
        task = progress.add_task("eval", total=None)
        result = evaluate_split(
            model, dataset.split(split), batch_size=batch_size, device=torch_device, seed=seed,
            limit=limit or None, iwae_samples=iwae,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    report = {"checkpoint": str(folder), "split": split, "data": dataset.location, **result.to_dict(),
              "nll_elbo": -result.elbo, "nll_iwae": None if result.iwae is None else -result.iwae}
    if as_json:
        stdout.print_json(json.dumps(report))
        return
    unit = "nats per image" if dataset.meta.modality == "binary" else "nats per sequence"
    rows = [
        ("sequences", f"{result.sequences:,}"),
        (f"NLL ≤ (ELBO), {unit}", f"{-result.elbo:.2f}"),
        ("KL per sequence", f"{result.kl:.2f}"),
    ]
    if result.iwae is not None:
        rows.insert(2, (f"NLL ≤ (IWAE, K={iwae}), {unit}", f"{-result.iwae:.2f}"))
    stderr.print(escape(f"checkpoint {folder}"), soft_wrap=True)
    stdout.print(results_table(f"{dataset.meta.kind}, {split} split", rows))


def open_training_data(config: dict) -> PreparedDataset:
    """The dataset a checkpoint was trained on, with a hint when it has moved."""
    location = config["data"]["location"]
    try:
        return open_dataset(location)
    except DataError as error:
        raise DataError(
            f"The model was trained on {location}, which cannot be opened: {error.message}",
            "Pass the prepared dataset with --data DIR.",
        ) from None


# -- sample --------------------------------------------------------------------------------------


@app.command(
    "sample",
    epilog="**Example:** `zforcing sample --out digits.png --num 64 --seed 1`",
)
@handle_errors
def sample_cli(
    checkpoint: CheckpointArgument = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output file: .png for images (.wav audio, .txt text in later versions).", show_default="samples.png")] = None,
    num: Annotated[int, typer.Option("--num", min=1, help="How many samples.")] = 64,
    seconds: Annotated[Optional[float], typer.Option("--seconds", min=0.0, help="Audio length (audio models).")] = None,
    length: Annotated[Optional[int], typer.Option("--length", min=1, help="Steps per sample (audio and text models).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=1e-3, help="Sharpen (<1) or flatten (>1) the output distribution.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same samples.")] = 0,
    device: DeviceOption = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Generate from the prior, free-running, and write what the model models (a PNG grid for images)."""
    torch_device = resolve_device(device)
    folder = resolve_checkpoint(checkpoint, RUNS_ROOT)
    model, config = load_model(folder, torch_device)
    data = config["data"]
    out = out or Path("samples.png")
    if data["modality"] == "binary" and (seconds is not None or length is not None):
        raise usage_error("--seconds and --length do not apply to an image model.", "Images are always 28x28 = 784 pixels.")
    check_can_write(out, force)
    with stderr.status(f"Sampling {num} sequences ..."):
        sample_images(model, data, out, num=num, temperature=temperature, seed=seed)
    stdout.print(escape(f"Wrote {num} samples to {out}"), soft_wrap=True)


# -- interpolate ---------------------------------------------------------------------------------


@app.command(
    "interpolate",
    epilog='**Example:** `zforcing interpolate runs/imdb "this movie was great ." "i hated every minute ."`',
)
@handle_errors
def interpolate_cli(
    checkpoint: Annotated[Path, typer.Argument(help="A run or checkpoint folder of a text model.")],
    sentence_a: Annotated[str, typer.Argument(help="First sentence.")],
    sentence_b: Annotated[str, typer.Argument(help="Second sentence.")],
    points: Annotated[int, typer.Option("--points", min=2, help="Mixing points from α=0 to α=1.")] = 11,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Walk the latent space between two sentences (the paper's Table 3) with a text model."""
    folder = resolve_checkpoint(checkpoint, RUNS_ROOT)
    model, config = load_model(folder, "cpu")
    raise ZForcingError(
        f"Interpolation needs a text model; {folder} models {config['data']['kind']} ({model.config.modality} data).",
        "Text models (zforcing prepare imdb / text) are not available in this version yet.",
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
