"""`zforcing prepare`: raw corpus to prepared dataset."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape

from ..console import JobProgress, duration, plural, stderr, stdout
from .common import MAX_SEED
from ..data import AUDIO_KINDS, AVAILABLE_KINDS, TEXT_KINDS, prepare

if TYPE_CHECKING:  # the readers and writers of data are imported by prepare(), with numpy and torch
    from ..data import PreparedDataset, ProgressCallback

EPILOG = (
    "**Examples:** `zforcing prepare mnist ~/data/binarized_mnist --out data/mnist` reads "
    "Larochelle's three .amat files; `zforcing prepare mnist embedded` writes out the copy in the package; "
    "`zforcing prepare timit ~/corpora/TIMIT --out data/timit` reads the LDC tree (TRAIN and TEST folders of "
    ".WAV files) by SRNN's protocol; `zforcing prepare wav ~/recordings --frame-size 160 --split 80,10,10` "
    "takes a folder of your own audio; `zforcing prepare imdb ~/corpora/imdb_reviews.jsonl` tokenizes reviews by "
    "the paper's protocol; `zforcing prepare text book.txt --max-tokens 30 --vocab-size 10000` takes any text."
)
SOURCE_HELP = (
    "Raw data: for mnist, the folder of Larochelle's .amat files, or `embedded`; for timit, the TIMIT root "
    "(TRAIN and TEST folders); for blizzard and wav, a folder of audio files (wav, flac, mp3, ogg, ...; searched "
    "recursively, any sample rate); for imdb and text, a JSON-lines, CSV, JSON or parquet file with a text column, "
    "the aclImdb folder, a plain text file or folder of .txt files, or `hf:NAME[:SPLIT]` (a Hugging Face dataset, "
    "online only)."
)


def prepare_cli(
    kind: Annotated[str, typer.Argument(help=f"Data kind: {', '.join(AVAILABLE_KINDS)}.")],
    source: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write. Default: data/KIND.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    sample_rate: Annotated[Optional[int], typer.Option("--sample-rate", help="wav only: resample to this rate in Hz, 1000 to 384000. Default: 16000.")] = None,
    frame_size: Annotated[Optional[int], typer.Option("--frame-size", help="wav only: samples per frame, at most one second's (--sample-rate). Default: 12.5 ms of audio, the paper's 200 samples at 16 kHz (100 at 8 kHz).")] = None,
    sequence_length: Annotated[Optional[int], typer.Option("--sequence-length", help="wav only: frames per training sequence. Default: 40.")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="wav and text: train,valid,test percentages. wav: of the sequences, in order (default 90,5,5); text: of the sentences, shuffled (default 85,5,10).")] = None,
    text_column: Annotated[Optional[str], typer.Option("--text-column", help="imdb and text: the column that holds the text in a CSV, JSON or parquet file. Default: text, review, content, ... or the only text column.")] = None,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="imdb and text: the encoding of a plain text, CSV or TSV file, e.g. latin-1 or cp1252 (JSON is UTF-8). Default: utf-8.")] = None,
    min_tokens: Annotated[Optional[int], typer.Option("--min-tokens", help="text only: keep sentences of at least this many word tokens. Default: 5.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="text only: keep sentences of at most this many word tokens. Default: 15.")] = None,
    vocab_size: Annotated[Optional[int], typer.Option("--vocab-size", help="text only: the most frequent train words kept; the rest become `<unk>`. Default: 16000.")] = None,
    case: Annotated[Optional[str], typer.Option("--case", help="text only: `lower` (lower-case every token) or `keep`. Default: lower.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, max=MAX_SEED, help="text only: seeds the shuffle before the split. Default: 0.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="wav and blizzard: stop at the first file that cannot be read. Default: skip such files and list them at the end.")] = False,
) -> None:
    """Read a raw corpus once into a prepared dataset folder (meta.json + memory-mapped arrays)."""
    out = out or Path("data") / kind
    options = {"sample_rate": sample_rate, "frame_size": frame_size, "sequence_length": sequence_length, "split": split,
               "text_column": text_column, "encoding": encoding, "min_tokens": min_tokens, "max_tokens": max_tokens, "vocab_size": vocab_size,
               "case": case, "seed": seed, "strict": strict or None}
    started = time.perf_counter()
    if kind in AUDIO_KINDS:
        with JobProgress(f"Preparing {kind}") as progress:
            dataset = prepare(kind, source, out, force=force, progress=audio_progress(progress), **options)
    elif kind in TEXT_KINDS:
        with JobProgress(f"Preparing {kind}") as progress:
            dataset = prepare(kind, source, out, force=force, progress=text_progress(progress), **options)
    else:
        with stderr.status(escape(f"Preparing {kind} from {source} ...")):
            dataset = prepare(kind, source, out, force=force, **options)
    stdout.print(escape(f"Prepared {kind} at {out} ({split_summary(dataset)}) in {time.perf_counter() - started:.1f} s."), soft_wrap=True)
    if dataset.meta.text:
        from ..data.text import describe_vocabulary

        stdout.print(escape(describe_vocabulary(dataset.meta)), soft_wrap=True)
    for warning in dataset.warnings:
        stderr.print(f"[yellow]Warning:[/] {escape(warning)}", soft_wrap=True)


def audio_progress(progress: JobProgress) -> ProgressCallback:
    """prepare's progress over audio files, with the hours of audio read so far."""
    return lambda done, total, seconds: progress(done, total, f"{done:,} of {plural(total, 'file')}, {seconds / 3600:.2f} h of audio")


def text_progress(progress: JobProgress):
    """prepare's progress over a corpus (its share done, when its size is known), with the
    documents read and the sentences kept so far."""

    def update(documents: int, sentences: int, fraction: float | None) -> None:
        progress(fraction or 0.0, None if fraction is None else 1.0, f"{documents:,} documents, {sentences:,} sentences kept")

    return update


def split_summary(dataset: PreparedDataset) -> str:
    """'train 24, valid 8, test 8', with each split's hours for audio."""
    seconds = (dataset.meta.audio or {}).get("seconds", {})
    return ", ".join(
        f"{split} {count:,}" + (f" ({duration(seconds[split])})" if split in seconds else "")
        for split, count in dataset.meta.counts.items()
    )
