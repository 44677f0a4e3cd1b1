"""Data kinds: reading raw corpora once into prepared datasets, and opening those."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError, UsageError
from .audio import ProgressCallback, prepare_audio_folder
from .mnist import (
    EMBEDDED,
    embedded_arrays,
    mnist_meta,
    open_embedded,
    read_amat_folder,
)
from .prepared import (
    Batch,
    DatasetMeta,
    PreparedDataset,
    PreparedSplit,
    open_prepared,
    write_prepared,
)
from .timit import prepare_timit

AVAILABLE_KINDS = ("mnist", "timit", "blizzard", "wav")
PLANNED_KINDS = ("imdb", "text")
AUDIO_KINDS = ("timit", "blizzard", "wav")
WAV_OPTIONS = ("sample_rate", "frame_size", "sequence_length", "split")


def prepare(
    kind: str, source: str, out: Path, force: bool = False, progress: ProgressCallback | None = None, **options,
) -> PreparedDataset:
    """Read raw data of the given kind from source and write a prepared dataset folder at out.

    progress(files_done, files_total, seconds_of_audio_done) follows the audio kinds; options
    (sample_rate, frame_size, sequence_length, split) apply to `wav` only. The returned dataset's
    `warnings` say what preparing noticed (a partial TIMIT, skipped files).
    """
    if kind in PLANNED_KINDS:
        raise DataError(
            f"Preparing {kind!r} data is not available in this version of zforcing yet.",
            f"Available now: {', '.join(AVAILABLE_KINDS)}. Text support is on the roadmap.",
        )
    if kind not in AVAILABLE_KINDS:
        raise UsageError(
            f"Unknown data kind {kind!r}.",
            f"Choose one of: {', '.join(AVAILABLE_KINDS + PLANNED_KINDS)}.",
        )
    options = wav_options(kind, options)
    if kind == "timit":
        return prepare_timit(Path(source), out, force=force, progress=progress)
    if kind in ("blizzard", "wav"):
        return prepare_audio_folder(Path(source), out, kind=kind, force=force, progress=progress, **options)
    return prepare_mnist(source, out, force)


def wav_options(kind: str, options: dict) -> dict:
    """The options actually given (None means not given); only `wav` takes any."""
    given = {name: value for name, value in options.items() if value is not None}
    unknown = sorted(set(given) - set(WAV_OPTIONS))
    if unknown:
        raise TypeError(f"prepare() got unexpected options: {', '.join(unknown)}")
    if given and kind != "wav":
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UsageError(
            f"{flags} applies only to `zforcing prepare wav`; {kind} has a fixed protocol.",
            "Leave it out, or prepare your own audio with `zforcing prepare wav DIR`.",
        )
    return given


def prepare_mnist(source: str, out: Path, force: bool) -> PreparedDataset:
    if source == EMBEDDED:
        packed, protocol = embedded_arrays(), "binarized-mnist-embedded"
    else:
        packed, protocol = read_amat_folder(Path(source)), "binarized-mnist-larochelle"
        source = str(Path(source).resolve())
    meta = mnist_meta({split: len(rows) for split, rows in packed.items()}, source, protocol)
    write_prepared(out, meta, {split: {"pixels": rows} for split, rows in packed.items()}, force=force)
    return open_prepared(out)


def open_dataset(location: str | Path) -> PreparedDataset:
    """A prepared dataset folder, or `embedded` for the binarized MNIST inside the package."""
    if str(location) == EMBEDDED:
        return open_embedded()
    return open_prepared(Path(location))


__all__ = [
    "AUDIO_KINDS",
    "AVAILABLE_KINDS",
    "Batch",
    "EMBEDDED",
    "PLANNED_KINDS",
    "DatasetMeta",
    "PreparedDataset",
    "PreparedSplit",
    "ProgressCallback",
    "open_dataset",
    "prepare",
]
