"""Comparing runs: their curves overlaid (like the paper's Figure 2), each labelled by what
differs in its configuration, and a table of their validation bounds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import METRICS_FILE, is_run_folder, read_config
from .errors import CheckpointError
from .fileio import write_bytes
from .plots import CURVE_PANELS, draw_metric, figure_bytes, new_figure, read_metrics

METRICS = {key: (title, ylabel) for title, key, ylabel in CURVE_PANELS if key != "lr"}
# Settings that say how a run was kept, not what it learnt: never used as labels.
BOOKKEEPING = {"checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "log_every", "eval_batch_size",
               "max_consecutive_skips", "location", "fingerprint", "counts", "text", "audio", "image_shape"}
SHORT_NAMES = {"aux_weight": "α", "bwd_weight": "β", "kl_anneal": "KL anneal", "hidden_size": "units",
               "latent_size": "z", "embed_size": "embedding", "mlp_size": "MLP", "embed_dropout": "dropout",
               "aux_on_hidden": "aux on h", "batch_size": "batch", "max_steps": "updates"}
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


@dataclass
class RunSummary:
    folder: Path
    settings: dict  # flattened config: "model.aux_weight" -> value, ...
    records: list[dict]
    sequence: str  # what one sequence of its data holds: "8,000 samples (40 frames of 200)", "784 pixels"
    parts: list[str] = field(default_factory=list)  # what sets it apart ("α=β=0", "KL anneal"), or its folder's name

    @property
    def label(self) -> str:
        return ", ".join(self.parts)

    def validations(self) -> list[dict]:
        return [r for r in self.records if r.get("type") == "valid" and is_finite(r.get("nll_bound"))]

    def summary(self, differing: list[str]) -> dict:
        """The run's final and best validation bounds, and the settings that tell it apart."""
        valid = self.validations()
        steps = [r["step"] for r in self.records if isinstance(r.get("step"), int)]
        return {
            "run": str(self.folder.resolve()),
            "label": self.label,
            "settings": {name.split(".", 1)[1]: self.settings.get(name) for name in differing},
            "steps": max(steps, default=0),
            "final_valid_nll": valid[-1]["nll_bound"] if valid else None,
            "best_valid_nll": min(r["nll_bound"] for r in valid) if valid else None,
            "final_valid_kl": valid[-1]["kl"] if valid else None,
        }


def is_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def load_run(folder: Path) -> RunSummary:
    folder = Path(folder)
    if not folder.is_dir() or not is_run_folder(folder):
        raise CheckpointError(f"{folder} is not a run folder (no config.json written by `zforcing train`).",
                              "Pass run folders such as runs/20261125-101500 or runs/latest.")
    config = with_every_field(read_config(folder))
    settings = {}
    for section in ("model", "train", "data"):
        for name, value in (config.get(section) or {}).items():
            if name not in BOOKKEEPING:
                settings[f"{section}.{name}"] = value
    settings["train.preset"] = config.get("preset") or None
    return RunSummary(folder, settings, read_metrics(folder / METRICS_FILE), sequence_extent(config.get("data") or {}))


def with_every_field(config: dict) -> dict:
    """The config with its model and train sections complete: a field added to zforcing after the
    run was written takes its default, the value the run trained with, so that it does not read
    as a difference from newer runs."""
    from dataclasses import asdict

    from .modelconfig import ZForcingConfig
    from .runconfig import TrainConfig

    try:
        return {**config, "model": ZForcingConfig.from_dict(config["model"]).to_dict(), "train": asdict(TrainConfig(**config["train"]))}
    except (KeyError, TypeError, ValueError):  # written by another version: compared as it is
        return config


def sequence_extent(data: dict) -> str:
    """What one sequence of a run's data holds, which its bounds per sequence are per: samples
    for audio, the most tokens for text (sentences vary), pixels for images."""
    audio = data.get("audio") or {}
    if data.get("modality") == "frames" and audio:
        frames, size = audio.get("sequence_frames"), audio.get("frame_size")
        return f"{frames * size:,} samples ({frames} frames of {size})" if frames and size else "frames of unknown size"
    if data.get("modality") == "tokens":
        return f"sentences of at most {data.get('sequence_length')} tokens"
    return f"{data.get('sequence_length')} pixels"


def mixed_sequences(runs: list[RunSummary]) -> str | None:
    """A warning when the runs' sequences differ, so that their bounds per sequence do not compare."""
    extents = {run.sequence for run in runs}
    if len(extents) < 2:
        return None
    listed = "; ".join(f"{run.folder.name}: {run.sequence}" for run in runs)
    return (f"The runs' sequences differ ({listed}): their bounds per sequence do not compare. Compare their "
            "`zforcing evaluate` figures per sample (nll_elbo_per_sample) instead.")


def differing_settings(runs: list[RunSummary]) -> list[str]:
    """The settings whose values are not the same in every run, in a stable order."""
    names = sorted({name for run in runs for name in run.settings})
    return [name for name in names if len({repr(run.settings.get(name)) for run in runs}) > 1]


def describe(name: str, value) -> str:
    """'α=0.0025', 'KL anneal', 'no KL anneal', 'units=1024'."""
    short = SHORT_NAMES.get(name.split(".", 1)[1], name.split(".", 1)[1])
    if isinstance(value, bool):
        return short if value else f"no {short}"
    if isinstance(value, float):
        return f"{short}={value:g}"
    return f"{short}={value}"


def run_description(run: RunSummary, differing: list[str]) -> list[str]:
    """What sets the run apart; equal α and β (the paper's Table 2 runs) read as one 'α=β=...'."""
    names = list(differing)
    parts = []
    alpha, beta = run.settings.get("train.aux_weight"), run.settings.get("train.bwd_weight")
    if "train.aux_weight" in names and "train.bwd_weight" in names and alpha == beta:
        names = [name for name in names if name not in ("train.aux_weight", "train.bwd_weight")]
        parts.append(f"α=β={alpha:g}")
    return parts + [describe(name, run.settings.get(name)) for name in names]


def label_runs(runs: list[RunSummary]) -> list[str]:
    """Each run's label: what differs in its configuration, or its folder's name when nothing
    does (or first, when two runs would get the same label)."""
    differing = differing_settings(runs)
    for run in runs:
        run.parts = run_description(run, differing) or [run.folder.name]
    if len({run.label for run in runs}) < len(runs):
        for run in runs:
            if run.parts != [run.folder.name]:
                run.parts = [f"{run.folder.name}: {run.parts[0]}", *run.parts[1:]]
    return differing


def compare_figure(runs: list[RunSummary], metric: str, unit: str):
    """One metric of every run against updates: training as a line, validation as dots, one
    colour per run."""
    title, ylabel = METRICS[metric]
    figure = new_figure(9, 5.5)
    axes = figure.subplots()
    for index, run in enumerate(runs):
        draw_metric(axes, run.records, metric, label=run.label, colour=COLOURS[index % len(COLOURS)])
    axes.set(title=f"{title}: {len(runs)} runs", xlabel="updates", ylabel=f"{ylabel} ({unit.removeprefix('nats ')})")
    axes.grid(True, alpha=0.3)
    if axes.has_data():
        axes.legend(loc="best", fontsize=8)
    return figure


def write_comparison(runs: list[RunSummary], metric: str, unit: str, out: Path) -> None:
    """The figure as PNG or SVG, by out's suffix."""
    write_bytes(out, figure_bytes(compare_figure(runs, metric, unit), out.suffix.lower().lstrip(".")))
