"""`zforcing prepare`: raw corpus to prepared dataset."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from ..console import duration, stderr, stdout
from ..data import (
    AUDIO_KINDS,
    AVAILABLE_KINDS,
    PLANNED_KINDS,
    PreparedDataset,
    ProgressCallback,
    prepare,
)

EPILOG = (
    "**Examples:** `zforcing prepare mnist ~/data/binarized_mnist --out data/mnist` reads "
    "Larochelle's three .amat files; `zforcing prepare mnist embedded` writes out the copy in the package; "
    "`zforcing prepare timit ~/corpora/TIMIT --out data/timit` reads the LDC tree (TRAIN and TEST folders of "
    ".WAV files) by SRNN's protocol; `zforcing prepare wav ~/recordings --frame-size 160 --split 80,10,10` "
    "takes a folder of your own audio."
)
SOURCE_HELP = (
    "Raw data: for mnist, the folder of Larochelle's .amat files, or `embedded`; for timit, the TIMIT root "
    "(TRAIN and TEST folders); for blizzard and wav, a folder of audio files (wav, flac, mp3, ogg, ...; searched "
    "recursively, any sample rate)."
)


def prepare_cli(
    kind: Annotated[str, typer.Argument(help=f"Data kind: {', '.join(AVAILABLE_KINDS)} (coming: {', '.join(PLANNED_KINDS)}).")],
    source: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write. Default: data/KIND.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    sample_rate: Annotated[Optional[int], typer.Option("--sample-rate", help="wav only: resample to this rate in Hz. Default: 16000.")] = None,
    frame_size: Annotated[Optional[int], typer.Option("--frame-size", help="wav only: samples per frame. Default: 200.")] = None,
    sequence_length: Annotated[Optional[int], typer.Option("--sequence-length", help="wav only: frames per training sequence. Default: 40.")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="wav only: train,valid,test percentages of the sequences, in order. Default: 90,5,5.")] = None,
) -> None:
    """Read a raw corpus once into a prepared dataset folder (meta.json + memory-mapped arrays)."""
    out = out or Path("data") / kind
    options = {"sample_rate": sample_rate, "frame_size": frame_size, "sequence_length": sequence_length, "split": split}
    started = time.perf_counter()
    if kind in AUDIO_KINDS:
        with audio_progress(f"Preparing {kind}") as progress:
            dataset = prepare(kind, source, out, force=force, progress=progress, **options)
    else:
        with stderr.status(escape(f"Preparing {kind} from {source} ...")):
            dataset = prepare(kind, source, out, force=force, **options)
    stdout.print(escape(f"Prepared {kind} at {out} ({split_summary(dataset)}) in {time.perf_counter() - started:.1f} s."), soft_wrap=True)
    for warning in dataset.warnings:
        stderr.print(f"[yellow]Warning:[/] {escape(warning)}", soft_wrap=True)


@contextmanager
def audio_progress(description: str) -> Iterator[ProgressCallback]:
    """A progress bar on stderr over files, with the hours of audio read so far (on a terminal
    only: elsewhere rich would leave an empty line behind)."""
    columns = (TextColumn(f"[bold]{escape(description)}"), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
               TextColumn("{task.fields[audio]}"), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
        task = bar.add_task(description, total=None, audio="")

        def update(files_done: int, files_total: int, seconds: float) -> None:
            bar.update(task, completed=files_done, total=files_total, audio=f"{seconds / 3600:.2f} h of audio")

        yield update


def split_summary(dataset: PreparedDataset) -> str:
    """'train 24, valid 8, test 8', with each split's hours for audio."""
    seconds = (dataset.meta.audio or {}).get("seconds", {})
    return ", ".join(
        f"{split} {count:,}" + (f" ({duration(seconds[split])})" if split in seconds else "")
        for split, count in dataset.meta.counts.items()
    )
