"""`zforcing evaluate`: the paper's bounds on a split."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..checkpoint import load_model, resolve_checkpoint
from ..console import results_table, simple_progress, stderr, stdout
from ..data import PreparedDataset, open_dataset
from ..device import resolve_device
from ..errors import DataError, ZForcingError
from ..evaluate import evaluate_split
from .common import RUNS_ROOT, CheckpointArgument, DeviceOption, usage_error

EPILOG = "**Examples:** `zforcing evaluate runs/latest --iwae 50`; `zforcing evaluate --split valid --json`"


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
