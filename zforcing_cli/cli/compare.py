"""`zforcing compare`: several runs' curves on one figure, and their validation bounds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..compare import METRICS, RunSummary, label_runs, load_run, mixed_sequences, write_comparison
from ..console import plural, stderr, stdout
from ..errors import ZForcingError
from ..fileio import check_can_write, json_record
from .common import usage_error

EPILOG = ("**Examples:** `zforcing compare runs/a0 runs/a25 --out kl.png` overlays the KL curves of two runs, labelled "
          "by what differs in their configs (\"α=0\", \"α=0.0025\"); `zforcing compare runs/* --metric elbo --json` "
          "prints each run's final and best validation bounds.")
FORMATS = (".png", ".svg")


def compare_cli(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (written by `zforcing train`).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The figure: .png or .svg.")] = Path("compare.png"),
    metric: Annotated[str, typer.Option("--metric", help=f"What to plot: {', '.join(METRICS)}.")] = "kl",
    as_json: Annotated[bool, typer.Option("--json", help="Print the table of bounds as JSON on stdout.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Overlay the training curves of several runs (like the paper's Figure 2), each labelled by what differs in its configuration; print their final and best validation bounds."""
    if metric not in METRICS:
        raise usage_error(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}.", "For example --metric kl.")
    if out.suffix.lower() not in FORMATS:
        raise usage_error(f"--out {out.name!r} is not a .png or .svg file.", "For example --out compare.png.")
    summaries = [load_run(run) for run in runs]  # the runs first: a missing one matters more than the figure
    modalities = {run.settings.get("data.modality") for run in summaries}
    if len(modalities) > 1:
        raise ZForcingError(f"The runs model different kinds of data ({', '.join(sorted(map(str, modalities)))}).",
                            "Compare runs on the same data.")
    check_can_write(out, force)
    if warning := mixed_sequences(summaries):
        stderr.print(f"[yellow]Warning:[/] {escape(warning)}", soft_wrap=True)
    differing = label_runs(summaries)
    from ..evaluate import bound_unit  # loads torch: the runs and options are checked

    modality = modalities.pop()
    unit = bound_unit(modality)
    write_comparison(summaries, metric, unit, out)
    rows = [json_record(run.summary(differing)) for run in summaries]
    if as_json:
        stdout.print_json(json.dumps(rows, allow_nan=False))
    else:
        stdout.print(bounds_table(rows, summaries, modality))
    stderr.print(escape(f"Wrote the {metric} curves of {plural(len(summaries), 'run')} to {out}"), soft_wrap=True)


def bounds_table(rows: list[dict], runs: list[RunSummary], modality: str) -> Table:
    """One row per run; its label one part per line, so that a narrow table never breaks a
    label after a comma. The bounds in the sign the paper's tables use for the data (bound_sign)."""
    from ..evaluate import bound_sign, bound_unit

    label, sign = bound_sign(modality)
    table = Table(title=f"validation bounds, {label} ({bound_unit(modality)})", title_justify="left", show_lines=True)
    for name, justify in (("run", "left"), ("label", "left"), ("updates", "right"), ("final", "right"),
                          ("best", "right"), ("final KL", "right")):
        table.add_column(name, justify=justify)
    for row, run in zip(rows, runs):
        bounds = [f"{-sign * row[key]:.2f}" if row[key] is not None else "—" for key in ("final_valid_nll", "best_valid_nll")]
        figures = [*bounds, "—" if row["final_valid_kl"] is None else f"{row['final_valid_kl']:.2f}"]
        table.add_row(escape(Path(row["run"]).name), escape("\n".join(run.parts)), f"{row['steps']:,}", *figures)
    return table
