"""`zforcing compare`: several runs' curves on one figure, and their validation bounds; or a sweep
folder's report (cli/sweep.py prints it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..checkpoint import SWEEP_FILE, is_sweep_folder
from ..compare import METRICS, RunSummary, label_runs, load_run, mixed_sequences, write_comparison
from ..console import plural, stderr, stdout
from ..errors import ZForcingError
from ..fileio import check_can_write, json_record
from .common import usage_error

EPILOG = ("**Examples:** `zforcing compare runs/a0 runs/a25 --out kl.png` overlays the KL curves of two runs, labelled "
          "by what differs in their configs (\"α=0\", \"α=0.0025\"); `zforcing compare runs/* --metric elbo --json` "
          "prints each run's final and best validation bounds; `zforcing compare sweeps/aux` prints a sweep's report, "
          "as `zforcing sweep aux.toml --report` does, without its spec.")
FORMATS = (".png", ".svg")
DEFAULT_OUT = Path("compare.png")
DEFAULT_METRIC = "kl"


def compare_cli(
    runs: Annotated[list[Path], typer.Argument(
        help="Run folders (written by `zforcing train`), or one sweep folder (written by `zforcing sweep`).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", help="The figure: .png or .svg.", show_default=str(DEFAULT_OUT))] = None,
    metric: Annotated[Optional[str], typer.Option(
        "--metric", help=f"What to plot: {', '.join(METRICS)}.", show_default=DEFAULT_METRIC)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table of bounds (or the sweep's report) as JSON on stdout.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Overlay the training curves of several runs (like the paper's Figure 2), each labelled by what differs in its configuration; print their final and best validation bounds. Given a sweep folder, print its report: each configuration's mean ± SD and 95% CI over its seeds, the paired differences against the reference, and its curves with a band over the seeds."""
    sweeps = [run for run in runs if is_sweep_folder(run)]
    if sweeps:
        compare_sweep(sweeps[0], runs, out, metric, as_json)
        return
    out, metric = out or DEFAULT_OUT, metric or DEFAULT_METRIC
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


def compare_sweep(folder: Path, arguments: list[Path], out: Path | None, metric: str | None, as_json: bool) -> None:
    """A sweep folder's report, as `zforcing sweep SPEC --report` prints it, from what the folder
    records of its spec: the copy of the spec, and the reference of the sweep's latest start."""
    if len(arguments) > 1:
        others = list(map(str, arguments))
        others.remove(str(folder))
        raise usage_error(f"{folder} is a sweep folder, which compare reports alone, not beside {', '.join(others)}.",
                          f"Compare the sweep alone (zforcing compare {folder}), or its runs ({folder}/trials/*/seed-*) alone.")
    if out is not None or metric is not None:
        given = " and ".join(name for name, value in (("--out", out), ("--metric", metric)) if value is not None)
        raise usage_error(f"{given} {'are' if ' and ' in given else 'is'} for run folders: a sweep's report uses its spec's metric "
                          f"and draws {folder}/curves.png.", f"Drop {given}.")
    from .sweep import report_sweep, require_sweep_packages

    require_sweep_packages()
    from ..sweep import recorded_sweep
    from ..sweep.study import SPEC_COPY

    spec, storage, reference_recorded = recorded_sweep(folder)
    if not reference_recorded:
        stderr.print(escape(f"Note: {folder / SWEEP_FILE} records no reference (the sweep started before zforcing recorded it): "
                            f"the paired differences are against the reference of {folder / SPEC_COPY}, the spec of its first start. "
                            "The next `zforcing sweep SPEC` records the spec's."), soft_wrap=True)
    report_sweep(spec, folder, storage, as_json)


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
