"""`zforcing train`: parse the options, set up or reopen the run, report progress, stop cleanly
on Ctrl-C or SIGTERM. Started by torchrun, every process runs this; rank 0 settles the run and
reports (distributed.py)."""

from __future__ import annotations

import math
import shlex
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.markup import escape

from ..version import __version__
from ..checkpoint import resolve_latest
from ..console import plural, stderr, stdout, training_progress
from ..data import EMBEDDED, PreparedDataset, open_dataset
from ..device import check_precision, resolve_device
from ..distributed import Group, from_main, joined
from ..errors import DataError, TrainingError
from ..evaluate import bound_unit
from ..presets import PRESETS, describe_model, describe_training, preset_configs, presets_table
from ..threads import ThreadPolicy
from ..runconfig import RunConfig, data_description, dataset_differences, load_run_config
from ..train import StopRequest, TrainEvent, TrainingStopped, train
from .common import MAX_SEED, RUNS_ROOT, DeviceOption, ThreadsOption, check_real, exit_on_signal, usage_error

EPILOG = (
    "**Examples:** `zforcing train` (binarized MNIST, small preset, 8 to 13 minutes on 2 CPU cores); "
    "`zforcing train --preset paper --device cuda --epochs 50`; "
    "`zforcing train --resume` continues runs/latest. Ctrl-C stops after the current update and "
    "writes a checkpoint that `--resume` continues. Several GPUs: `torchrun --nproc-per-node 4 -m zforcing_cli train ...` "
    "(docs/training.md).\n\n"
    "**Defaults by data kind and preset** (an option given on the command line replaces its default; "
    "a run prints the settings it trains with as it starts):\n\n" + presets_table()
)
BY_PRESET = "the preset's: table below"
SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def train_cli(
    data: Annotated[Optional[str], typer.Option("--data", help="Prepared dataset folder, or `embedded` (binarized MNIST in the package). With --resume: the run's dataset in a new place.", show_default="embedded")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help=f"Model and training sizes: {' or '.join(PRESETS)}.", show_default="small")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder. Default: a new folder under runs/; with --resume, runs/latest.", show_default=False)] = None,
    device: DeviceOption = "auto",
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Passes over the training split; lifts the preset's update limit.", show_default=BY_PRESET)] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many updates; takes more epochs when it needs them.", show_default=BY_PRESET)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Sequences per update.", show_default=BY_PRESET)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Adam learning rate (finite, > 0).", show_default=BY_PRESET)] = None,
    aux_weight: Annotated[Optional[float], typer.Option("--aux-weight", help="α: weight of the auxiliary cost -log p(b_t|z_t).", show_default=BY_PRESET)] = None,
    aux_start: Annotated[Optional[float], typer.Option("--aux-start", help="α's first value: α then moves linearly to --aux-weight by --aux-increment per update, as in the authors' code. Without it (and with --aux-weight given), α is constant.", show_default=BY_PRESET)] = None,
    aux_increment: Annotated[Optional[float], typer.Option("--aux-increment", help="With --aux-start: how far α moves per update.", show_default=BY_PRESET)] = None,
    bwd_weight: Annotated[Optional[float], typer.Option("--bwd-weight", help="β: weight of the backward prediction -log p(u_t|b_t).", show_default=BY_PRESET)] = None,
    kl_anneal: Annotated[Optional[bool], typer.Option("--kl-anneal/--no-kl-anneal", help="KL weight from 0.2 to 1 by 5e-5 per update.", show_default="off")] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="Dropout on the input embeddings, in [0, 1).", show_default="text: 0.2, others: 0")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="L2 weight decay in Adam.", show_default="text: 1e-6, others: 0")] = None,
    aux_condition: Annotated[Optional[str], typer.Option("--aux-condition", help="Condition the auxiliary head on `z` (the paper's Eq. 8) or `hz` (h_{t-1} and z_t, the original code).", show_default="z")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, max=MAX_SEED, help="Seeds the weights, the data order and the noise of every update.", show_default="0")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", min=1, help="Also checkpoint every N updates.", show_default="paper presets: 1,000 (2,000 for text); small: none")] = None,
    checkpoint_minutes: Annotated[Optional[float], typer.Option("--checkpoint-minutes", help="Also checkpoint when this many minutes have passed since the last checkpoint (0: never).", show_default="10")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="Arithmetic of the forward pass: `fp32`; `tf32` (float32, with matrix products on TensorFloat-32 tensor cores: GPUs from NVIDIA Ampere on); `bf16` (autocast to bfloat16: GPUs from Ampere on, or the CPU); `fp16` (autocast to float16 with a gradient scaler; GPUs only). The weights, Adam and the sums of the loss stay fp32. A resumed run keeps its precision.", show_default="fp32")] = None,
    threads: ThreadsOption = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also log the metrics, and samples at each validation, for TensorBoard in RUN/tensorboard (needs `pip install 'zforcing[tensorboard]'`).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run's newest complete checkpoint (or restart it from step 0 if it has none). Options that repeat the run's own values are accepted.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out run folder (only a run folder written by zforcing).")] = False,
) -> None:
    """Train Z-Forcing; progress on stderr, checkpoints and metrics in the run folder."""
    check_real("--lr", lr, example="0.001", above=True)
    check_real("--aux-increment", aux_increment, example="5e-5", above=True)
    for option, value in (("--aux-weight", aux_weight), ("--aux-start", aux_start), ("--bwd-weight", bwd_weight), ("--checkpoint-minutes", checkpoint_minutes), ("--weight-decay", weight_decay)):
        check_real(option, value)
    check_real("--dropout", dropout)
    if dropout is not None and dropout >= 1:
        raise usage_error(f"--dropout must be below 1, not {dropout:g}.", "Use a probability such as --dropout 0.2.")
    if precision is not None:
        check_precision(precision)
    settings = dict(preset=preset, batch_size=batch_size, lr=lr, aux_weight=aux_weight, aux_start=aux_start,
                    aux_increment=aux_increment, bwd_weight=bwd_weight,
                    kl_anneal=kl_anneal, seed=seed, weight_decay=weight_decay, aux_condition=aux_condition, dropout=dropout,
                    precision=precision)
    with joined(device) as group:
        main = group is None or group.is_main
        torch_device = resolve_device(device) if group is None else group.device
        opened: list[PreparedDataset] = []

        def settle() -> tuple[Path, dict]:  # rank 0's: the run folder and its configuration
            run_dir, run_config, dataset = resumed_run(out, data, settings) if resume else new_run(out, data, settings)
            run_config.train = fitted_batch(run_config.train, len(dataset.split("train")))
            run_config.train = with_lengths(run_config, len(dataset.split("train")), epochs, max_steps)
            run_config.train = replace(run_config.train, **given(checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes))
            opened.append(dataset)
            return run_dir, run_config.to_dict()

        run_dir, config_values = from_main(group, settle)
        run_config = RunConfig.from_dict(config_values)
        dataset = opened[0] if opened else rank_dataset(run_config, group)
        unit = bound_unit(dataset.meta.modality)
        if main:
            processes = "1 process" if group is None or group.world_size == 1 else f"{group.world_size:,} processes"
            where = f"on {torch_device}" if group is None else f"on {processes} ({group.backend}, {torch_device.type})"
            stderr.print(escape(f"zforcing {__version__} training on {dataset.meta.kind} ({dataset.location}) {where}; run folder {run_dir}"),
                         soft_wrap=True)
            stderr.print(escape(f"Settings: {run_config.preset or 'custom'} preset, {describe_model(run_config.model)}; "
                                f"{describe_training(run_config.train)}"), soft_wrap=True)
        stop = StopRequest()
        with ThreadPolicy(threads) as policy, training_progress() if main else nullcontext() as progress, \
                stop_on_signals(stop, progress.console if main else None, group is not None):
            reporter = TrainReporter(progress, policy, unit) if main else None
            try:
                result = train(run_dir, run_config, dataset, torch_device, reporter, resume=resume, force=force, stop=stop,
                               latest_link=RUNS_ROOT, tensorboard=tensorboard, group=group)
            except TrainingStopped as stopped:
                if main:
                    progress.stop()
                    command = continue_command(run_dir, runtime_options(device, threads, tensorboard), group)
                    stderr.print(escape(f"{stopped.message}\nTo continue: {command}"), soft_wrap=True)
                if group is not None:
                    group.barrier()  # rank 0 has said so before any rank ends
                raise typer.Exit(SIGNAL_EXIT_CODES.get(stopped.reason, 1)) from None
        if main:
            report_result(result, run_dir, unit)


def rank_dataset(run_config: RunConfig, group: Group) -> PreparedDataset:
    """The dataset of rank 0's run, opened on another rank: the same path on every machine."""
    location = run_config.data["location"]
    hint = "Every machine needs the prepared dataset at the same path as rank 0's."
    try:
        dataset = open_dataset(location)
    except DataError as error:
        raise DataError(f"Rank {group.rank} cannot open the run's dataset: {error.message}", hint) from None
    differences = dataset_differences(run_config.data, dataset)
    if differences:
        raise DataError(f"Rank {group.rank}: {location} is not rank 0's dataset ({'; '.join(differences)}).", hint)
    return dataset


def continue_command(run_dir: Path, options: list[str], group: Group | None) -> str:
    """The command that continues a stopped run (a distributed one on any number of ranks)."""
    arguments = ["train", "--resume", "--out", str(run_dir), *options]
    if group is None:
        return shlex.join(["zforcing", *arguments])
    if group.single_node:
        return shlex.join(["torchrun", "--nproc-per-node", str(group.world_size), "-m", "zforcing_cli", *arguments])
    return f"the same torchrun command on every machine, with: -m zforcing_cli {shlex.join(arguments)}"


def report_result(result, run_dir: Path, unit: str) -> None:
    best = result.state.best_seen
    if best is None:
        raise TrainingError(
            f"Training ended without a finite validation bound, so {run_dir} has no best checkpoint.",
            "The run diverged; start a new one with a lower --lr.",
        )
    stdout.print(escape(f"Best validation bound: NLL ≤ {-best:.2f} {unit}; checkpoint {result.best_checkpoint.resolve()}"), soft_wrap=True)
    quoted = shlex.quote(str(run_dir))
    stdout.print(escape(f"Next: zforcing evaluate {quoted}  or  zforcing sample {quoted}"), soft_wrap=True)


def given(**values) -> dict:
    return {name: value for name, value in values.items() if value is not None}


def runtime_options(device: str, threads: int | None, tensorboard: bool) -> list[str]:
    """The options a resumed run does not remember, to repeat in the command that continues."""
    return ((["--device", device] if device != "auto" else []) + (["--threads", str(threads)] if threads else [])
            + (["--tensorboard"] if tensorboard else []))


def with_lengths(run_config: RunConfig, train_size: int, epochs: int | None, max_steps: int | None):
    """The run's length: --epochs lifts the update limit; --max-steps takes as many epochs as it
    needs. Both together: the shorter wins, and the note says so."""
    config = run_config.train
    batches = math.ceil(train_size / config.batch_size)
    if epochs is not None and max_steps is None:
        return replace(config, epochs=epochs, max_steps=None)
    if max_steps is not None and epochs is None:
        return replace(config, epochs=max(config.epochs, math.ceil(max_steps / batches)), max_steps=max_steps)
    if epochs is not None and max_steps is not None and epochs * batches < max_steps:
        stderr.print(f"Note: --epochs {epochs} ends the run after {plural(epochs * batches, 'update')}, before --max-steps {max_steps:,}.")
    return replace(config, **given(epochs=epochs, max_steps=max_steps))


def fitted_batch(config, train_size: int):
    """A batch larger than the training split takes the whole split: the run records the batch
    it takes, not the one asked for."""
    if config.batch_size <= train_size:
        return config
    stderr.print(f"Note: a batch of {config.batch_size:,} is more than the {plural(train_size, 'training sequence')}: "
                 f"each update takes all of them, and the run records a batch of {train_size:,}.")
    return replace(config, batch_size=train_size)


def resumed_run(out: Path | None, data: str | None, settings: dict) -> tuple[Path, RunConfig, PreparedDataset]:
    """The run to continue. It keeps its configuration: options that repeat it are accepted,
    different values are an error; --data may give the same dataset's new place."""
    run_dir = out or resolve_latest(RUNS_ROOT)
    run_config = load_run_config(run_dir)
    recorded = recorded_settings(run_config)
    for name, value in settings.items():
        if value is not None and recorded.get(name) not in (None, value):
            option = "--" + name.replace("_", "-")
            raise usage_error(
                f"{option} {value} differs from the run's {recorded[name]}; a resumed run keeps its configuration.",
                f"Drop {option} to continue the run, or start a new run with --out NEW.",
            )
    return run_dir, run_config, resumed_dataset(run_config, data)


def recorded_settings(run_config: RunConfig) -> dict:
    train_config = run_config.train
    return {
        "preset": run_config.preset or None, "batch_size": train_config.batch_size, "lr": train_config.lr,
        "aux_weight": train_config.aux_weight, "aux_start": train_config.aux_start, "aux_increment": train_config.aux_increment,
        "bwd_weight": train_config.bwd_weight, "kl_anneal": train_config.kl_anneal,
        "seed": train_config.seed, "weight_decay": train_config.weight_decay,
        "aux_condition": "hz" if run_config.model.aux_on_hidden else "z", "dropout": run_config.model.embed_dropout,
        "precision": train_config.precision,
    }


def resumed_dataset(run_config: RunConfig, data: str | None) -> PreparedDataset:
    recorded = run_config.data["location"]
    if data is None:
        try:
            return open_dataset(recorded)
        except DataError as error:
            raise DataError(f"The run's dataset cannot be opened: {error.message}", "If it moved, pass its new place with --data DIR.") from None
    dataset = open_dataset(data)
    if dataset.location == recorded:
        return dataset
    differences = dataset_differences(run_config.data, dataset)
    if differences:
        raise DataError(
            f"{data} is not the dataset the run was trained on ({'; '.join(differences)}).",
            f"Pass the run's dataset (it was at {recorded}), or start a new run with --out NEW.",
        )
    stderr.print(escape(f"The run's dataset now lies at {dataset.location} (it was at {recorded})."), soft_wrap=True)
    run_config.data = {**run_config.data, "location": dataset.location}
    return dataset


def new_run(out: Path | None, data: str | None, settings: dict) -> tuple[Path, RunConfig, PreparedDataset]:
    """A new run: the preset's sizes for the dataset, with the options given on top."""
    dataset = open_dataset(data or EMBEDDED)
    preset = settings.pop("preset") or "small"
    model_config, train_config = preset_configs(preset, dataset.meta)
    model_config = apply_model_options(model_config, settings.pop("aux_condition"), settings.pop("dropout"))
    if settings["aux_weight"] is not None and settings["aux_start"] is None:
        train_config = replace(train_config, aux_start=None)  # --aux-weight alone: a constant α (the paper's form)
    train_config = replace(train_config, **given(**settings))
    return out or new_run_dir(), RunConfig(model_config, train_config, data_description(dataset), preset), dataset


def apply_model_options(config, aux_condition: str | None, dropout: float | None):
    if dropout is not None:
        config = replace(config, embed_dropout=dropout)
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


@contextmanager
def stop_on_signals(stop: StopRequest, console, distributed: bool = False) -> Iterator[None]:
    """The first Ctrl-C or SIGTERM asks the trainer to stop after the current update (it then
    writes a checkpoint); a second one stops at once, as the default handlers do. Under
    torchrun, which passes a signal on to every rank, the ranks stop together at the next
    update where they compare notes; console None prints nothing (the ranks but 0)."""
    originals = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    when = "once all processes finish the same update" if distributed else "after this update"

    def request_stop(number, frame) -> None:
        stop.set(signal.Signals(number).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, exit_on_signal)
        if console is not None:
            console.print(f"{signal.Signals(number).name}: stopping {when} to write a checkpoint (Ctrl-C again abandons it).")

    for number in originals:
        signal.signal(number, request_stop)
    try:
        yield
    finally:
        for number, handler in originals.items():
            signal.signal(number, handler)


class TrainReporter:
    """Turns TrainEvents into a rich progress bar and validation lines on stderr.

    When stderr is not a terminal (a log file, CI), a plain line every LOG_SECONDS replaces the
    live bar, which rich would only draw at the end.
    """

    LOG_SECONDS = 30.0

    def __init__(self, progress, policy: ThreadPolicy, unit: str):
        self.progress = progress
        self.policy = policy
        self.unit = unit
        self.task = None
        self.started = time.perf_counter()
        self.last_line = self.started
        self.first_step: int | None = None
        self.done = 0  # updates taken

    def say(self, text: str) -> None:
        self.progress.console.print(escape(text), soft_wrap=True)

    def __call__(self, event: TrainEvent) -> None:
        handler = getattr(self, f"on_{event.kind}", None)
        if handler is not None:
            handler(event)

    def on_stale_lock(self, event: TrainEvent) -> None:
        self.say(event.message)

    def on_resume(self, event: TrainEvent) -> None:
        if event.path is None:
            self.say("The run has no training checkpoint yet: starting it again from step 0 with its saved configuration.")
        else:
            self.say(f"Resuming from {event.path} (step {event.step:,} of {event.total_steps:,}).")

    def on_warning(self, event: TrainEvent) -> None:
        self.progress.console.print(f"[yellow]Warning:[/] {escape(event.message)}", soft_wrap=True)

    def on_start(self, event: TrainEvent) -> None:
        self.task = self.progress.add_task("train", total=event.total_steps, completed=event.step, speed="", metrics="")
        self.first_step = self.done = event.step
        self.say(f"{event.metrics['parameters']:,} parameters; {plural(event.total_steps, 'update')}; torch on {plural(self.policy.threads, 'thread')}")
        if event.metrics["finished"]:
            self.say(
                f"The run already took its {plural(event.total_steps, 'update')}; "
                "pass --epochs N or --max-steps N with --resume to train longer."
            )

    def on_progress(self, event: TrainEvent) -> None:
        """An update taken whose metrics come later (on a GPU): the bar moves, the metrics stay."""
        self.policy.refresh()
        self.done = event.step
        self.progress.update(self.task, completed=self.done, speed=self.speed(self.done))

    def on_step(self, event: TrainEvent) -> None:
        self.policy.refresh()
        m = event.metrics
        self.done = max(self.done, event.step)  # on a GPU, steps come after their progress
        metrics = f"loss {m['loss']:.1f} KL {m['kl']:.2f} aux {m['aux']:.0f}"
        self.progress.update(self.task, completed=self.done, speed=self.speed(self.done), metrics=metrics)
        now = time.perf_counter()
        if not stderr.is_terminal and now - self.last_line >= self.LOG_SECONDS:
            self.last_line = now
            stderr.print(f"step {event.step}/{event.total_steps} {self.speed(self.done)} {metrics}")

    def speed(self, step: int) -> str:
        return f"{(step - self.first_step) / max(time.perf_counter() - self.started, 1e-9):.2f} steps/s"

    def on_skip(self, event: TrainEvent) -> None:
        self.done = max(self.done, event.step)
        self.progress.update(self.task, completed=self.done)
        skipped = event.metrics["skipped_steps"]
        self.progress.console.print(f"[yellow]step {event.step}: non-finite loss, update skipped ({plural(skipped, 'skipped update')} so far)")

    def on_validation(self, event: TrainEvent) -> None:
        m = event.metrics
        bound = f"{m['nll_bound']:.2f} {self.unit}" if math.isfinite(m["nll_bound"]) else f"not finite ({m['nll_bound']}); no best checkpoint"
        note = " [green]best[/]" if m["improved"] else ""
        note += f" [yellow]lr halved to {m['lr']:.2g}[/]" if m["lr_halved"] else ""
        self.progress.console.print(f"epoch {event.epoch + 1} step {event.step}: valid NLL ≤ {bound}, KL {m['kl']:.2f}{note}")
