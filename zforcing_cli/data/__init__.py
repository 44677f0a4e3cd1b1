"""Data kinds: reading raw corpora once into prepared datasets, and opening those.

The modules that read and write data (numpy, torch, audio and text libraries) are imported on
first use: the command line checks its options and paths with this package before they load."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .location import EMBEDDED, check_prepared_folder

AVAILABLE_KINDS = ("mnist", "timit", "blizzard", "wav", "imdb", "text")
AUDIO_KINDS = ("timit", "blizzard", "wav")
TEXT_KINDS = ("imdb", "text")
# The options each kind takes; the others have a fixed protocol.
KIND_OPTIONS = {
    "wav": ("sample_rate", "frame_size", "sequence_length", "split", "strict"),
    "blizzard": ("strict",),
    "text": ("min_tokens", "max_tokens", "vocab_size", "case", "split", "seed", "text_column", "encoding"),
    "imdb": ("text_column", "encoding"),
}
ALL_OPTIONS = sorted({name for names in KIND_OPTIONS.values() for name in names})
CASES = ("lower", "keep")


def prepare(
    kind: str, source: str, out: Path, force: bool = False, progress: ProgressCallback | None = None, **options,
) -> PreparedDataset:
    """Read raw data of the given kind from source and write a prepared dataset folder at out.

    progress follows the audio kinds (files_done, files_total, seconds_of_audio_done) and the
    text kinds (documents_read, sentences_kept, fraction_done or None). Options: sample_rate,
    frame_size, sequence_length, split and strict (stop at the first unreadable file instead of
    skipping it) for `wav`, strict for `blizzard`; min_tokens, max_tokens, vocab_size, case
    (lower|keep), split, seed, text_column and encoding for `text`; text_column and encoding for `imdb`. The returned
    dataset's `warnings` say what preparing noticed (a partial TIMIT, skipped or upsampled files).
    """
    if kind not in AVAILABLE_KINDS:
        raise UsageError(f"Unknown data kind {kind!r}.", f"Choose one of: {', '.join(AVAILABLE_KINDS)}.")
    options = kind_options(kind, options)
    from .audio import prepare_audio_folder
    from .text import prepare_text
    from .timit import prepare_timit

    if kind == "timit":
        return prepare_timit(Path(source), out, force=force, progress=progress)
    if kind in ("blizzard", "wav"):
        return prepare_audio_folder(Path(source), out, kind=kind, force=force, progress=progress, **options)
    if kind in TEXT_KINDS:
        column, encoding = options.pop("text_column", None), options.pop("encoding", None)
        return prepare_text(source, out, kind, text_protocol(options), column, force=force, progress=progress, encoding=encoding)
    return prepare_mnist(source, out, force)


def kind_options(kind: str, options: dict) -> dict:
    """The options actually given (None means not given), checked against what the kind takes."""
    given = {name: value for name, value in options.items() if value is not None}
    unknown = sorted(set(given) - set(ALL_OPTIONS))
    if unknown:
        raise TypeError(f"prepare() got unexpected options: {', '.join(unknown)}")
    refused = [name for name in given if name not in KIND_OPTIONS.get(kind, ())]
    if refused:
        flags = ", ".join("--" + name.replace("_", "-") for name in refused)
        takers = " or ".join(f"`zforcing prepare {taker}`" for taker, names in KIND_OPTIONS.items()
                             if all(name in names for name in refused))
        where = f"applies only to {takers}" if takers else f"does not apply to `zforcing prepare {kind}`"
        raise UsageError(f"{flags} {where}; {kind} has a fixed protocol.", "Leave it out.")
    return given


def text_protocol(options: dict) -> TextProtocol:
    """`prepare text`'s protocol: IMDB's, changed by the options given."""
    from .prepared import parse_split
    from .text import IMDB_PROTOCOL, TextProtocol

    case = options.get("case", "lower")
    if case not in CASES:
        raise UsageError(f"--case must be lower or keep, not {case!r}.", "lower: lower-case every token (the paper); keep: keep the case.")
    split = parse_split(options["split"], example="85,5,10") if "split" in options else IMDB_PROTOCOL.split
    return TextProtocol(
        min_tokens=options.get("min_tokens", IMDB_PROTOCOL.min_tokens),
        max_tokens=options.get("max_tokens", IMDB_PROTOCOL.max_tokens),
        vocabulary_size=options.get("vocab_size", IMDB_PROTOCOL.vocabulary_size),
        lowercase=case == "lower",
        split=split,
        seed=options.get("seed", IMDB_PROTOCOL.seed),
    )


def prepare_mnist(source: str, out: Path, force: bool) -> PreparedDataset:
    from .mnist import embedded_arrays, mnist_meta, read_amat_folder
    from .prepared import open_prepared, write_prepared

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
    from .mnist import open_embedded
    from .prepared import open_prepared

    if str(location) == EMBEDDED:
        return open_embedded()
    return open_prepared(Path(location))


def __getattr__(name: str):
    """The data types, imported on first use (they bring numpy and torch)."""
    if name in ("Batch", "DatasetMeta", "PreparedDataset", "PreparedSplit"):
        from . import prepared

        return getattr(prepared, name)
    if name == "ProgressCallback":
        from .audio import ProgressCallback

        return ProgressCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "check_prepared_folder",
    "AUDIO_KINDS",
    "AVAILABLE_KINDS",
    "Batch",
    "EMBEDDED",
    "TEXT_KINDS",
    "DatasetMeta",
    "PreparedDataset",
    "PreparedSplit",
    "ProgressCallback",
    "open_dataset",
    "prepare",
]
