"""`zforcing train`: parse the options, set up or reopen the run, report progress, stop cleanly
on Ctrl-C or SIGTERM. Started by torchrun, every process runs this; rank 0 settles the run and
reports (distributed.py)."""

from __future__ import annotations

import math
import shlex
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, Optional

import typer
from rich.markup import escape

from ..checkpoint import resolve_latest
from ..console import JobProgress, plural, stderr, stdout, training_progress
from ..cores import capped_threads
from ..data import EMBEDDED, check_prepared_folder, open_dataset
from ..errors import DataError, TrainingError
from ..humanize import duration
from ..launch import launched_rank
from ..modelconfig import AUX_COSTS, BACKWARD_FIRST, INITS, LSTM_BIASES, OUTPUT_HEADS, ZForcingConfig
from ..presets import PRESETS, check_preset, describe_model, describe_training, presets_table
from ..runconfig import (KL_ANNEAL_ON_SKIP, SKIP_RULES, RunConfig, TrainConfig, data_description, dataset_differences,
                         latent_free_training, load_run_config)
from ..settings import AUX_CONDITIONS
from ..version import __version__
from .common import (MAX_SEED, RUNS_ROOT, DeviceOption, ThreadsOption, announce_loop_builds, check_real, exit_on_signal,
                     usage_error, warn)

if TYPE_CHECKING:  # the core is imported once the options and paths are checked: it loads torch
    import torch

    from ..data import PreparedDataset
    from ..distributed import Group
    from ..train import StopRequest, TrainEvent, TrainResult

EPILOG = (
    "**Examples:** `zforcing train` (binarized MNIST, small preset: 3½ to 13 minutes on 2 CPU cores by machine, "
    "3 min 24 s on an idle Intel Xeon, about 8 on an AMD EPYC; docs/performance.md); "
    "`zforcing train --preset paper --device cuda --epochs 50`; "
    "`zforcing train --resume` continues runs/latest. Ctrl-C stops after the current update and "
    "writes a checkpoint that `--resume` continues. Several GPUs: `torchrun --nproc-per-node 4 -m zforcing_cli train ...` "
    "(docs/training.md).\n\n"
    "**Defaults by data kind and preset** (an option given on the command line replaces its default; "
    "a run prints the settings it trains with as it starts):\n\n" + presets_table()
)
BY_PRESET = "the preset's: table below"
SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
# What a second signal does, told to whoever sent the first: a scheduler or `kill` sends SIGTERM,
# and has no Ctrl-C to press.
SECOND_SIGNAL = {"SIGINT": "Ctrl-C again abandons it", "SIGTERM": "a second signal abandons it"}
# The model options that keep the authors' form one value away (docs/protocols.md, "Departures"): ZForcingConfig fields.
DEPARTURE_MODEL_OPTIONS = ("output_head", "backward_first", "init", "lstm_biases", "cond_ln", "backward_layers", "aux_cost")
# The ZForcingConfig fields set as they are (no choice to check, no option of another name): the sizes, and what
# only a --config file sets (latent_clamp, ...).
PLAIN_MODEL_SETTINGS = tuple(field.name for field in fields(ZForcingConfig)
                             if field.name not in (*DEPARTURE_MODEL_OPTIONS, "modality", "input_size", "start_index",
                                                   "embed_dropout", "aux_on_hidden"))
TRAINING_SETTINGS = tuple(field.name for field in fields(TrainConfig))
RUN_LENGTH_SETTINGS = ("epochs", "max_steps", "checkpoint_every", "checkpoint_minutes")  # what --resume may change
CHOICES = {"output_head": OUTPUT_HEADS, "backward_first": BACKWARD_FIRST, "init": INITS, "lstm_biases": LSTM_BIASES,
           "aux_cost": AUX_COSTS, "kl_anneal_on_skip": KL_ANNEAL_ON_SKIP, "skip_rule": SKIP_RULES}


# The options (those several commands share are common.py's).
DataOption = Annotated[
    Optional[str],
    typer.Option(
        "--data", show_default="embedded",
        help=(
            "Prepared dataset folder, or `embedded` (binarized MNIST in the package). With --resume: the run's "
            "dataset in a new place."
        ),
    ),
]
PresetOption = Annotated[
    Optional[str],
    typer.Option(
        "--preset", show_default="small",
        help=f"Model and training sizes: {' or '.join(PRESETS)}.",
    ),
]
OutOption = Annotated[
    Optional[Path],
    typer.Option(
        "--out", show_default=False,
        help="Run folder. Default: a new folder under runs/; with --resume, runs/latest.",
    ),
]
EpochsOption = Annotated[
    Optional[int],
    typer.Option(
        "--epochs", min=1, show_default=BY_PRESET,
        help="Passes over the training split; lifts the preset's update limit.",
    ),
]
MaxStepsOption = Annotated[
    Optional[int],
    typer.Option(
        "--max-steps", min=1, show_default=BY_PRESET,
        help="Stop after this many updates; takes more epochs when it needs them.",
    ),
]
BatchSizeOption = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size", min=1, show_default=BY_PRESET,
        help="Sequences per update.",
    ),
]
LrOption = Annotated[
    Optional[float],
    typer.Option(
        "--lr", show_default=BY_PRESET,
        help="Adam learning rate (finite, > 0).",
    ),
]
AuxWeightOption = Annotated[
    Optional[float],
    typer.Option(
        "--aux-weight", show_default=BY_PRESET,
        help="α: weight of the auxiliary cost -log p(b_t|z_t).",
    ),
]
AuxStartOption = Annotated[
    Optional[float],
    typer.Option(
        "--aux-start", show_default=BY_PRESET,
        help=(
            "α's first value: α then moves linearly to --aux-weight by --aux-increment per update, as in the "
            "authors' code. Without it (and with --aux-weight given), α is constant."
        ),
    ),
]
AuxIncrementOption = Annotated[
    Optional[float],
    typer.Option(
        "--aux-increment", show_default=BY_PRESET,
        help="With --aux-start: how far α moves per update.",
    ),
]
LrPatienceOption = Annotated[
    Optional[int],
    typer.Option(
        "--lr-patience", min=1, show_default="3",
        help="Halve the learning rate after N validations in a row (one at each epoch's end) without a better bound.",
    ),
]
BwdWeightOption = Annotated[
    Optional[float],
    typer.Option(
        "--bwd-weight", show_default=BY_PRESET,
        help="β: weight of the backward prediction -log p(u_t|b_t).",
    ),
]
KlAnnealOption = Annotated[
    Optional[bool],
    typer.Option(
        "--kl-anneal/--no-kl-anneal", show_default="speech paper presets: on; others: off",
        help="KL weight from 0.2 to 1 by 5e-5 per update.",
    ),
]
DropoutOption = Annotated[
    Optional[float],
    typer.Option(
        "--dropout", show_default="text: 0.2, others: 0",
        help="Dropout on the input embeddings, in [0, 1).",
    ),
]
WeightDecayOption = Annotated[
    Optional[float],
    typer.Option(
        "--weight-decay", show_default="text: 1e-6, others: 0",
        help="L2 weight decay in Adam.",
    ),
]
ClipNormOption = Annotated[
    Optional[float],
    typer.Option(
        "--clip-norm", show_default="100, as in the authors' code",
        help="Clip the gradient's norm, over all parameters, to this before each update.",
    ),
]
AuxConditionOption = Annotated[
    Optional[str],
    typer.Option(
        "--aux-condition", show_default="z",
        help=(
            "Condition the auxiliary head on `z` (the paper's Eq. 8) or `hz` (h_{t-1} and z_t, the original "
            "code)."
        ),
    ),
]
AUTHORS = "(the authors' code: {})"
OutputHeadOption = Annotated[
    Optional[str],
    typer.Option(
        "--output-head", show_default="small: mlp; paper: linear",
        help="f(o) and the backward head: `mlp` (one hidden layer, as the paper's other MLPs) or `linear` "
             + AUTHORS.format("linear") + ".",
    ),
]
BackwardFirstOption = Annotated[
    Optional[str],
    typer.Option(
        "--backward-first", show_default="skip; speech paper presets: data",
        help="Backward cost at t = 1: `skip`, or `data`: b_1 also predicts u_1 when it is data (speech's context "
             "frame) " + AUTHORS.format("data") + ". Speech only: u_1 of images and text is the start symbol.",
    ),
]
InitOption = Annotated[
    Optional[str],
    typer.Option(
        "--init", show_default="small: torch; paper: authors",
        help="Initialisation: `torch`'s defaults, or `authors` (orthogonal recurrent weights, forward LSTM input "
             "weights uniform in ±1/√H and biases zero).",
    ),
]
LstmBiasesOption = Annotated[
    Optional[str],
    typer.Option(
        "--lstm-biases", show_default="small: one; paper: two",
        help="Bias vectors of the forward LSTM's gates: `one`, or `two` summed " + AUTHORS.format("two")
             + ": the same forward pass, but Adam and the clipping norm see two parameters.",
    ),
]
CondLnOption = Annotated[
    Optional[bool],
    typer.Option(
        "--cond-ln/--no-cond-ln", show_default="off",
        help="z_t conditions the forward LSTM through the gains and biases of a layer norm of its recurrent gates, "
             "not as an input (the authors' cond_ln). Runs the autograd loop (slower).",
    ),
]
BackwardLayersOption = Annotated[
    Optional[int],
    typer.Option(
        "--backward-layers", min=1, show_default="1",
        help="Layers of the backward LSTM (the authors' nlayers).",
    ),
]
AuxCostOption = Annotated[
    Optional[str],
    typer.Option(
        "--aux-cost", show_default="gaussian",
        help="Auxiliary cost: `gaussian`, -log p(b_t|z_t), or `l2`, the squared error to its mean (the authors' use_l2).",
    ),
]
KlAnnealOnSkipOption = Annotated[
    Optional[str],
    typer.Option(
        "--kl-anneal-on-skip", show_default="small: freeze; paper: advance",
        help="With --kl-anneal, a skipped update: `freeze` the KL weight, or `advance` it " + AUTHORS.format("advance") + ".",
    ),
]
LatentOption = Annotated[
    Optional[bool],
    typer.Option(
        "--latent/--no-latent", show_default="latent",
        help="--no-latent: the same network without z, the deterministic baseline of the paper's RNN rows: the "
             "embedding, forward LSTM and output head alone, trained on the NLL, which `evaluate` reports exactly. "
             "Takes no --aux-weight, --aux-start, --bwd-weight or --kl-anneal (docs/protocols.md).",
    ),
]
SkipRuleOption = Annotated[
    Optional[str],
    typer.Option(
        "--skip-rule", show_default="small: loss-and-grad; paper: loss",
        help="Skip an update whose `loss-and-grad` is not finite, or only whose `loss` is not " + AUTHORS.format("loss")
             + "; with `loss`, a non-finite gradient reaches Adam and stops the run.",
    ),
]
SkipKlAboveOption = Annotated[
    Optional[float],
    typer.Option(
        "--skip-kl-above", show_default="blizzard paper preset: 10,000; others: none",
        help="Also skip an update whose KL per sequence (batch mean) reaches this.",
    ),
]
TrainSeedOption = Annotated[
    Optional[int],
    typer.Option(
        "--seed", min=0, max=MAX_SEED, show_default="0",
        help="Seeds the weights, the data order and the noise of every update.",
    ),
]
CheckpointEveryOption = Annotated[
    Optional[int],
    typer.Option(
        "--checkpoint-every", min=1, show_default="paper presets: 1,000 (2,000 for text); small: none",
        help="Also checkpoint every N updates.",
    ),
]
CheckpointMinutesOption = Annotated[
    Optional[float],
    typer.Option(
        "--checkpoint-minutes", show_default="10",
        help="Also checkpoint when this many minutes have passed since the last checkpoint (0: never).",
    ),
]
PrecisionOption = Annotated[
    Optional[str],
    typer.Option(
        "--precision", show_default="fp32",
        help=(
            "Arithmetic of the forward pass: `fp32`; `tf32` (float32, with matrix products on TensorFloat-32 "
            "tensor cores: GPUs from NVIDIA Ampere on); `bf16` (autocast to bfloat16: GPUs from Ampere on, or the "
            "CPU); `fp16` (autocast to float16 with a gradient scaler; GPUs only). The weights, Adam and the sums "
            "of the loss stay fp32. A resumed run keeps its precision."
        ),
    ),
]
TensorboardOption = Annotated[
    bool,
    typer.Option(
        "--tensorboard",
        help=(
            "Also log the metrics, and samples at each validation, for TensorBoard in RUN/tensorboard (needs `pip "
            "install 'zforcing[tensorboard]'`)."
        ),
    ),
]


def size_option(flag: str, what: str):
    return Annotated[Optional[int], typer.Option(flag, min=1, show_default=BY_PRESET, help=what)]


HiddenSizeOption = size_option("--hidden-size", "Units of the forward and of the backward LSTM.")
LatentSizeOption = size_option("--latent-size", "Size of z_t.")
MlpSizeOption = size_option("--mlp-size", "Hidden units of every one-hidden-layer MLP (prior, posterior, heads).")
EmbedSizeOption = size_option("--embed-size", "Size of the input embedding.")
ConfigOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config", show_default=False,
        help=(
            "TOML file of settings, named as these options with underscores (`hidden_size = 128`), or a run "
            "folder's config.json, which replays that run bit for bit; an option given here replaces the file's "
            "value, and the file's replaces the preset's (docs/runs.md)."
        ),
    ),
]
ResumeOption = Annotated[
    bool,
    typer.Option(
        "--resume",
        help=(
            "Continue the run's newest complete checkpoint (or restart it from step 0 if it has none). Options "
            "that repeat the run's own values are accepted."
        ),
    ),
]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace an existing --out run folder (only a run folder written by zforcing).",
    ),
]


def train_cli(
    data: DataOption = None,
    preset: PresetOption = None,
    out: OutOption = None,
    device: DeviceOption = "auto",
    epochs: EpochsOption = None,
    max_steps: MaxStepsOption = None,
    batch_size: BatchSizeOption = None,
    lr: LrOption = None,
    lr_patience: LrPatienceOption = None,
    aux_weight: AuxWeightOption = None,
    aux_start: AuxStartOption = None,
    aux_increment: AuxIncrementOption = None,
    bwd_weight: BwdWeightOption = None,
    kl_anneal: KlAnnealOption = None,
    dropout: DropoutOption = None,
    weight_decay: WeightDecayOption = None,
    clip_norm: ClipNormOption = None,
    aux_condition: AuxConditionOption = None,
    output_head: OutputHeadOption = None,
    backward_first: BackwardFirstOption = None,
    init: InitOption = None,
    lstm_biases: LstmBiasesOption = None,
    cond_ln: CondLnOption = None,
    backward_layers: BackwardLayersOption = None,
    aux_cost: AuxCostOption = None,
    latent: LatentOption = None,
    kl_anneal_on_skip: KlAnnealOnSkipOption = None,
    skip_rule: SkipRuleOption = None,
    skip_kl_above: SkipKlAboveOption = None,
    seed: TrainSeedOption = None,
    checkpoint_every: CheckpointEveryOption = None,
    checkpoint_minutes: CheckpointMinutesOption = None,
    precision: PrecisionOption = None,
    threads: ThreadsOption = None,
    hidden_size: HiddenSizeOption = None,
    latent_size: LatentSizeOption = None,
    mlp_size: MlpSizeOption = None,
    embed_size: EmbedSizeOption = None,
    config: ConfigOption = None,
    tensorboard: TensorboardOption = False,
    resume: ResumeOption = False,
    force: ForceOption = False,
) -> None:
    """Train Z-Forcing; progress on stderr, checkpoints and metrics in the run folder."""
    check_options(lr=lr, aux_increment=aux_increment, clip_norm=clip_norm, aux_weight=aux_weight, aux_start=aux_start,
                  bwd_weight=bwd_weight, checkpoint_minutes=checkpoint_minutes, weight_decay=weight_decay, dropout=dropout,
                  preset=preset, aux_condition=aux_condition)
    departures = dict(output_head=output_head, backward_first=backward_first, init=init, lstm_biases=lstm_biases,
                      cond_ln=cond_ln, backward_layers=backward_layers, aux_cost=aux_cost, kl_anneal_on_skip=kl_anneal_on_skip,
                      skip_rule=skip_rule, skip_kl_above=skip_kl_above)
    settings = dict(preset=preset, batch_size=batch_size, lr=lr, lr_patience=lr_patience, aux_weight=aux_weight, aux_start=aux_start,
                    aux_increment=aux_increment, bwd_weight=bwd_weight, kl_anneal=kl_anneal, seed=seed,
                    weight_decay=weight_decay, clip_norm=clip_norm, aux_condition=aux_condition, dropout=dropout, precision=precision,
                    hidden_size=hidden_size, latent_size=latent_size, mlp_size=mlp_size, embed_size=embed_size, latent=latent,
                    **departures)
    lengths = dict(epochs=epochs, max_steps=max_steps, checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes)
    from_file: dict[str, Path] = {}  # the settings the --config file gave, and the file
    if config is not None:
        data, threads, settings, lengths, from_file = with_settings_file(config, data, threads, settings, lengths)
        precision = settings["precision"]
    check_departures({name: settings[name] for name in departures})
    check_latent_free(settings)
    if launched_rank() is None:  # under torchrun, rank 0 finds the run for all
        check_paths(resume, out, data)
    announce_loop_builds()
    from ..device import check_precision, resolve_device
    from ..distributed import joined

    if precision is not None:
        check_precision(precision)
    with joined(device) as group:
        main = group is None or group.is_main
        torch_device = resolve_device(device) if group is None else group.device
        run_dir, run_config, dataset = settled_run(group, resume, out, data, settings, lengths, from_file)
        if main:
            print_start(run_dir, run_config, dataset, torch_device, group)
        result = run_training(run_dir, run_config, dataset, torch_device, group, resume=resume, force=force,
                              tensorboard=tensorboard, threads=threads, device_spec=device)
        if main:
            report_result(result, run_dir, dataset, run_config)


def check_options(lr: float | None, aux_increment: float | None, clip_norm: float | None, dropout: float | None,
                  preset: str | None, aux_condition: str | None, **non_negative: float | None) -> None:
    """Usage errors for values typer lets through: non-finite numbers, negative weights, a
    dropout of 1 or more, an unknown preset or aux condition (the precision is checked with
    torch loaded)."""
    check_real("--lr", lr, example="0.001", above=True)
    check_real("--aux-increment", aux_increment, example="5e-5", above=True)
    check_real("--clip-norm", clip_norm, example="100", above=True)
    for name, value in non_negative.items():
        check_real("--" + name.replace("_", "-"), value)
    check_real("--dropout", dropout)
    if dropout is not None and dropout >= 1:
        raise usage_error(f"--dropout must be below 1, not {dropout:g}.", "Use a probability such as --dropout 0.2.")
    if preset is not None:
        check_preset(preset)
    if aux_condition not in (None, *AUX_CONDITIONS):
        raise usage_error(f"--aux-condition must be z or hz, not {aux_condition!r}.", "z: p(b_t|z_t) as in the paper; hz: p(b_t|h_{t-1},z_t).")


def with_settings_file(path: Path, data: str | None, threads: int | None, settings: dict,
                       lengths: dict) -> tuple[str | None, int | None, dict, dict, dict[str, Path]]:
    """The options with a --config file's settings where no option was given (the file is read
    and checked without torch: a bad file is one usage error before anything loads), and the
    settings taken from the file (for messages that name them as the file does)."""
    from ..settings import read_settings_file

    values = read_settings_file(path)  # canonical names: embed_dropout, aux_on_hidden
    if "embed_dropout" in values:
        values["dropout"] = values.pop("embed_dropout")
    if "aux_on_hidden" in values:
        values["aux_condition"] = "hz" if values.pop("aux_on_hidden") else "z"
    file_lengths = {name: values.pop(name) for name in RUN_LENGTH_SETTINGS if name in values}
    file_data, file_threads = values.pop("data", None), values.pop("threads", None)
    merged = {**values, **given(**settings)}
    from_file = {name: path for name in values if settings.get(name) is None}
    lengths = {name: file_lengths.get(name) if value is None else value for name, value in lengths.items()}
    return (data if data is not None else file_data, threads if threads is not None else file_threads,
            {name: merged.get(name) for name in {**settings, **merged}}, lengths, from_file)


def check_paths(resume: bool, out: Path | None, data: str | None) -> None:
    """The errors about paths that need no torch: a --data folder that holds no prepared
    dataset, a run to resume that is not there."""
    if data is not None and data != EMBEDDED:
        check_prepared_folder(data)
    if resume:
        load_run_config(out or resolve_latest(RUNS_ROOT))


def check_departures(departures: dict) -> None:
    """Usage errors for the options of docs/protocols.md's departures that contradict
    themselves: an unknown choice, a KL limit that is not a positive number, --cond-ln with
    two LSTM biases (its gates have none: the layer norms' biases take their place)."""
    for name, choices in CHOICES.items():
        value = departures[name]
        if value is not None and value not in choices:
            option = "--" + name.replace("_", "-")
            raise usage_error(f"{option} must be one of {', '.join(choices)}, not {value!r}.", f"For example {option} {choices[-1]}.")
    check_real("--skip-kl-above", departures["skip_kl_above"], example="10000", above=True)
    if departures["cond_ln"] and departures["lstm_biases"] == "two":
        raise usage_error("--cond-ln has no LSTM biases to split in two: its gates take the layer norms' biases.",
                          "Drop --lstm-biases, or drop --cond-ln.")


def check_latent_free(settings: dict) -> None:
    """Usage errors for a model without latent (--no-latent) given what only z has: --cond-ln,
    or a weight of the KL, auxiliary or backward cost (latent_free_training)."""
    if settings.get("latent") is not False:
        return
    if settings["cond_ln"]:
        raise usage_error("--cond-ln conditions the forward LSTM on z_t, which a model without latent (--no-latent) has not.",
                          "Drop --cond-ln, or drop --no-latent.")
    latent_free_training(TrainConfig(), settings)


def settled_run(group: Group | None, resume: bool, out: Path | None, data: str | None, settings: dict,
                lengths: dict, from_file: dict[str, Path]) -> tuple[Path, RunConfig, PreparedDataset]:
    """The run folder, its configuration and its dataset, the same on every rank: rank 0 settles
    them (the run to resume, or a new one) and prints the notes on how it took the settings; the
    other ranks take its folder and configuration, and open the dataset where rank 0 found it."""
    from ..distributed import from_main

    def settle() -> tuple[Path, RunConfig, PreparedDataset | None]:
        if resume:
            run_dir, run_config, dataset = resumed_run(out, data, settings, from_file)
            run_config, notes = with_lengths(run_config, len(dataset.split("train")), lengths)
        else:
            run_dir, run_config, dataset, notes = new_run(out, data, {**settings, **lengths})
        for note in notes:
            stderr.print(escape(f"Note: {note}"))
        return run_dir, run_config, dataset

    run_dir, run_config, dataset = from_main(group, settle, shared=lambda settled: (*settled[:2], None))
    return run_dir, run_config, dataset or rank_dataset(run_config, group)


def print_start(run_dir: Path, run_config: RunConfig, dataset: PreparedDataset, device: torch.device, group: Group | None) -> None:
    """What trains on what, where, and with which settings."""
    processes = "1 process" if group is None or group.world_size == 1 else f"{group.world_size:,} processes"
    where = f"on {device}" if group is None else f"on {processes} ({group.backend}, {device.type})"
    stderr.print(escape(f"zforcing {__version__} training on {dataset.meta.kind} ({dataset.location}) {where}; run folder {run_dir}"),
                 soft_wrap=True)
    stderr.print(escape(f"Settings: {run_config.preset or 'custom'} preset, {describe_model(run_config.model)}; "
                        f"{describe_training(run_config.train)}"), soft_wrap=True)


def run_training(run_dir: Path, run_config: RunConfig, dataset: PreparedDataset, device: torch.device, group: Group | None, *,
                 resume: bool, force: bool, tensorboard: bool, threads: int | None, device_spec: str) -> TrainResult:
    """train(), its progress shown by rank 0, stopped after an update by the first Ctrl-C or
    SIGTERM: then rank 0 says how to continue, and every rank exits with the signal's code."""
    from ..threads import TRAINING_SETTLE_SECONDS, ThreadPolicy
    from ..train import StopRequest, TrainingStopped, train

    main = group is None or group.is_main
    stop = StopRequest()
    with ThreadPolicy(run_threads(threads, run_config.threads, resume, main), TRAINING_SETTLE_SECONDS) as policy, \
            training_progress() if main else nullcontext() as progress, \
            stop_on_signals(stop, progress.console if main else None, group is not None):
        run_config = replace(run_config, threads=policy.threads)  # decided once: the run keeps and records it
        reporter = TrainReporter(progress, policy.threads, dataset.meta.modality, run_config.model.latent) if main else None
        try:
            return train(run_dir, run_config, dataset, device, reporter, resume=resume, force=force, stop=stop,
                         latest_link=RUNS_ROOT, tensorboard=tensorboard, group=group)
        except TrainingStopped as stopped:
            if main:
                progress.stop()
                command = continue_command(run_dir, runtime_options(device_spec, threads, tensorboard), group)
                stderr.print(escape(f"{stopped.message}\nTo continue: {command}"), soft_wrap=True)
            if group is not None:
                group.barrier()  # rank 0 has said so before any rank ends
            raise typer.Exit(SIGNAL_EXIT_CODES.get(stopped.reason, 1)) from None


def run_threads(given: int | None, recorded: int | None, resume: bool, main: bool) -> int | None:
    """The CPU threads a run trains on, decided once for the whole run: --threads,
    ZFORCING_THREADS or a --config file's (a replayed config.json's) count when given, else the
    count a resumed run recorded; None: the thread policy's share. A recorded count above this
    machine's cores (a run from a bigger one) is held to them, and rank 0 says so."""
    if given is not None:
        if resume and main and recorded not in (None, given):
            warn(f"--threads {given:,} differs from the {recorded:,} the run was trained on: its numbers may differ from "
                 "those of an uninterrupted run.")
        threads, capped = capped_threads(given)  # --threads is capped already; a --config file's count is not
        if capped and main:
            warn(f"The --config file's threads = {given:,} is more than the cores this process may run on: using "
                 f"{threads:,}, so the numbers may differ from those of a run on {given:,}.")
        return threads
    if recorded is None:
        return None
    threads, capped = capped_threads(recorded)
    if capped and main:
        warn(f"The run was trained on {plural(recorded, 'thread')}, more than the cores this process may run on: "
             f"using {threads:,}, so its numbers may differ from those of the run.")
    return threads


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


def report_result(result, run_dir: Path, dataset: PreparedDataset, run_config: RunConfig) -> None:
    from ..evaluate import bound_unit, perplexity, sequence_count, stated_bound, target_tokens

    best = result.state.best_seen
    if best is None:
        raise TrainingError(
            f"Training ended without a finite validation bound, so {run_dir} has no best checkpoint.",
            "The run diverged; start a new one with a lower --lr.",
        )
    modality, exact, valid_limit = dataset.meta.modality, not run_config.model.latent, run_config.train.valid_limit
    bound = stated_bound(modality, best, bound_unit(modality), exact)
    if modality == "tokens":  # text's figure in the paper (Table 2), beside the bound
        valid = dataset.split("valid")
        figure = perplexity(best, sequence_count(valid, valid_limit or None), target_tokens(valid, valid_limit or None))
        bound = f"perplexity {'' if exact else '≤ '}{figure:,.2f} ({bound})"
    stdout.print(escape(f"Best validation {'figure' if exact else 'bound'}: {bound}; checkpoint {result.best_checkpoint.resolve()}"),
                 soft_wrap=True)
    quoted = shlex.quote(str(run_dir))
    stdout.print(escape(f"Next: zforcing evaluate {quoted}  or  zforcing sample {quoted}"), soft_wrap=True)


def given(**values) -> dict:
    return {name: value for name, value in values.items() if value is not None}


def runtime_options(device: str, threads: int | None, tensorboard: bool) -> list[str]:
    """The options a resumed run does not remember, to repeat in the command that continues."""
    return ((["--device", device] if device != "auto" else []) + (["--threads", str(threads)] if threads else [])
            + (["--tensorboard"] if tensorboard else []))


def with_lengths(run_config: RunConfig, train_size: int, lengths: dict) -> tuple[RunConfig, list[str]]:
    """A resumed run's config with its length and checkpoints as the options give them, and its
    batch fitted to the training split, as a new run's are (settings.fit_to_split); the notes."""
    from ..settings import fit_to_split

    values = given(**lengths)
    train_config, notes = fit_to_split(replace(run_config.train, **values), values, train_size)
    return replace(run_config, train=train_config), notes


def resumed_run(out: Path | None, data: str | None, settings: dict,
                from_file: dict[str, Path]) -> tuple[Path, RunConfig, PreparedDataset]:
    """The run to continue. It keeps its configuration: options and settings-file entries that
    repeat it are accepted, different values are an error; --data may give the same dataset's
    new place."""
    run_dir = out or resolve_latest(RUNS_ROOT)
    run_config = load_run_config(run_dir)
    recorded = recorded_settings(run_config)
    for name, value in settings.items():
        if value is not None and recorded.get(name) not in (None, value):
            raise changed_setting(name, value, recorded[name], from_file.get(name))
    dataset = open_run_dataset(run_config.data, data)
    if data is not None:  # the same data, perhaps in a new place: the run records where
        run_config = replace(run_config, data={**run_config.data, "location": dataset.location})
    return run_dir, run_config, dataset


def changed_setting(name: str, value, recorded, settings_file: Path | None):
    """The error for a setting that differs from the resumed run's, named where it was given:
    the option, or the key of the --config file (many settings have no option)."""
    keeps = "a resumed run keeps its configuration."
    if settings_file is None:
        option = "--" + name.replace("_", "-")
        return usage_error(f"{option} {value} differs from the run's {recorded}; {keeps}",
                           f"Drop {option} to continue the run, or start a new run with --out NEW.")
    return usage_error(f"{name} = {toml_value(value)} in {settings_file} differs from the run's {toml_value(recorded)}; {keeps}",
                       f"Remove {name} from {settings_file} (or set it to {toml_value(recorded)}) to continue the run, "
                       "or start a new run with --out NEW.")


def toml_value(value) -> str:
    """A value as a settings file writes it: true, 0.001, "hz"."""
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else str(value)


def recorded_settings(run_config: RunConfig) -> dict:
    train_config = run_config.train
    return {
        **{name: getattr(train_config, name) for name in TRAINING_SETTINGS},
        **{name: getattr(run_config.model, name) for name in PLAIN_MODEL_SETTINGS},
        "preset": run_config.preset or None,
        "aux_condition": "hz" if run_config.model.aux_on_hidden else "z", "dropout": run_config.model.embed_dropout,
        **{name: getattr(run_config.model, name) for name in DEPARTURE_MODEL_OPTIONS},
    }


def open_run_dataset(recorded_data: dict, data: str | None) -> PreparedDataset:
    """The dataset a run recorded (data_description), opened where it was, or at `data` (--data)
    when that holds the same data."""
    recorded = recorded_data["location"]
    if data is None:
        try:
            return open_dataset(recorded)
        except DataError as error:
            raise DataError(f"The run's dataset cannot be opened: {error.message}", "If it moved, pass its new place with --data DIR.") from None
    dataset = open_dataset(data)
    if dataset.location == recorded:
        return dataset
    differences = dataset_differences(recorded_data, dataset)
    if differences:
        raise DataError(
            f"{data} is not the dataset the run was trained on ({'; '.join(differences)}).",
            f"Pass the run's dataset (it was at {recorded}), or start a new run with --out NEW.",
        )
    stderr.print(escape(f"The run's dataset now lies at {dataset.location} (it was at {recorded})."), soft_wrap=True)
    return dataset


def new_run(out: Path | None, data: str | None, settings: dict) -> tuple[Path, RunConfig, PreparedDataset, list[str]]:
    """A new run: the preset's sizes for the dataset, with the options given on top
    (settings.resolve, as a sweep's runs take theirs); the notes on how it took them."""
    from ..settings import canonical, resolve

    dataset = open_dataset(data or EMBEDDED)
    if settings["backward_first"] == "data" and dataset.meta.modality != "frames":
        raise usage_error("--backward-first data is for speech: the first input of images and text is the start symbol, "
                          "which is not data, so b_1 has nothing to predict.", "Drop --backward-first, or use --backward-first skip.")
    settings = dict(settings)
    loops = settings.pop("loops", None)  # a replayed run's: train() warns when this process runs others
    resolved = resolve(dict(canonical(name, value) for name, value in given(**settings).items()), dataset.meta,
                       len(dataset.split("train")))
    run_config = RunConfig(resolved.model, resolved.train, data_description(dataset), resolved.preset, loops=loops)
    return out or new_run_dir(), run_config, dataset, resolved.notes


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
            name = signal.Signals(number).name
            console.print(f"{name}: stopping {when} to write a checkpoint ({SECOND_SIGNAL[name]}).")

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
    MEASURE_SECONDS = 20.0  # of training, before the estimate of what is left is trusted

    def __init__(self, progress, threads: int, modality: str, latent: bool = True):
        from ..evaluate import bound_unit

        self.progress = progress
        self.threads = threads
        self.latent = latent  # False: a model without latent, whose figures are exact and have no KL or aux
        self.modality, self.unit = modality, bound_unit(modality)
        self.task = None
        self.started = time.perf_counter()
        self.last_line = self.started
        self.first_step: int | None = None
        self.done = 0  # updates taken
        self.estimated = False

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
        self.say(f"{event.metrics['parameters']:,} parameters; {plural(event.total_steps, 'update')}; torch on {plural(self.threads, 'thread')} (fixed for the run, recorded in its config.json); {event.metrics['loops']}")
        if event.metrics["finished"]:
            self.say(
                f"The run already took its {plural(event.total_steps, 'update')}; "
                "pass --epochs N or --max-steps N with --resume to train longer."
            )

    def on_progress(self, event: TrainEvent) -> None:
        """An update taken whose metrics come later (on a GPU): the bar moves, the metrics stay."""
        self.done = event.step
        self.progress.update(self.task, completed=self.done, speed=self.speed(self.done))
        self.warn_if_days(event.total_steps)

    def on_step(self, event: TrainEvent) -> None:
        m = event.metrics
        self.done = max(self.done, event.step)  # on a GPU, steps come after their progress
        # The batch's means of Eq. 10's terms, each summed over a sequence's steps: the auxiliary
        # cost -log p(b_t|z_t) is a density's, negative once b_t is predicted well (docs/training.md).
        latent_terms = f" KL {m['kl']:,.2f} aux {m['aux']:,.0f}" if self.latent else ""
        metrics = f"loss {m['loss']:,.1f}{latent_terms} {self.unit.replace(' per ', '/')}"
        self.progress.update(self.task, completed=self.done, speed=self.speed(self.done), metrics=metrics)
        self.warn_if_days(event.total_steps)
        now = time.perf_counter()
        if not stderr.is_terminal and now - self.last_line >= self.LOG_SECONDS:
            self.last_line = now
            stderr.print(escape(self.log_line(event.step, event.total_steps, metrics, now)), soft_wrap=True)

    def log_line(self, step: int, total_steps: int, metrics: str, now: float) -> str:
        """A progress line for a log file, where no bar is drawn: where the run is, its speed,
        the time so far and to go (once an update was timed), and the batch's metrics."""
        elapsed = now - self.started
        timed = self.done - self.first_step
        to_go = f", about {duration(elapsed / timed * (total_steps - self.done))} to go" if timed > 0 else ""
        return (f"step {step:,} of {total_steps:,} ({100 * step / max(total_steps, 1):.0f}%), {self.speed(self.done)}, "
                f"{duration(elapsed)} so far{to_go}; {metrics}")

    def warn_if_days(self, total_steps: int) -> None:
        """Once, after MEASURE_SECONDS: a warning when what is left would take more than a day."""
        elapsed = time.perf_counter() - self.started
        if self.estimated or elapsed < self.MEASURE_SECONDS or self.done <= self.first_step:
            return
        self.estimated = True
        remaining = elapsed / (self.done - self.first_step) * (total_steps - self.done)
        if remaining > JobProgress.LONG_JOB_SECONDS:
            left = plural(total_steps - self.done, "update")
            message = (f"Training will take about {duration(remaining)} more at its speed so far ({left} left); lower "
                       "--max-steps or --epochs, or stop it with Ctrl-C and resume it later with --resume.")
            self.progress.console.print(f"[yellow]Warning:[/] {escape(message)}", soft_wrap=True)

    def speed(self, step: int) -> str:
        return f"{(step - self.first_step) / max(time.perf_counter() - self.started, 1e-9):.2f} steps/s"

    def on_skip(self, event: TrainEvent) -> None:
        self.done = max(self.done, event.step)
        self.progress.update(self.task, completed=self.done)
        skipped = event.metrics["skipped_steps"]
        self.progress.console.print(f"[yellow]step {event.step}: update skipped ({escape(event.message)}; {plural(skipped, 'skipped update')} so far)")

    def on_validation(self, event: TrainEvent) -> None:
        from ..evaluate import stated_bound

        m = event.metrics
        if math.isfinite(m["elbo"]):
            bound = stated_bound(self.modality, m["elbo"], self.unit, not self.latent)
            relation = "≤ " if self.latent else ""
            bound = f"perplexity {relation}{m['perplexity']:,.2f} ({bound})" if "perplexity" in m else bound
        else:
            bound = f"bound not finite ({m['elbo']}); no best checkpoint"
        note = " [green]best[/]" if m["improved"] else ""
        note += f" [yellow]lr halved to {m['lr']:.2g}[/]" if m["lr_halved"] else ""
        kl = f", KL {m['kl']:.2f}" if self.latent else ""
        self.progress.console.print(f"epoch {event.epoch + 1} step {event.step}: valid {escape(bound)}{kl}{note}")
