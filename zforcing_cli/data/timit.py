"""TIMIT (LDC93S1) into the prepared format, by the protocol of SRNN's preprocessing script,
which the Z-Forcing speech results use (REFERENCE.md):

- every train utterance (4620, SA sentences included); 5% of them (231) held out for
  validation; every test utterance (1680), whole;
- train and valid: each split's files concatenated in order into one stream, cut into 200-sample
  frames and 40-frame sequences that may cross utterance boundaries, as SRNN does;
- test: each utterance on its own, its first frame the context of the other T - 1;
- one scalar mean and std, of the train split's waveform, for every split.

SRNN chose the validation files by shuffling an `os.walk` list, which differs between file
systems; here they are drawn from the *sorted* utterance ids with a fixed seed, so every copy of
TIMIT gets the same split, and the list is written beside the arrays (valid_files.txt).
"""

from __future__ import annotations

import os
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .audio import (
    Framing,
    Moments,
    ProgressCallback,
    ProgressCounter,
    RawStream,
    audio_meta,
    offsets_within,
    open_prepared_with,
    read_audio,
    to_int16,
    to_mono,
    write_split,
)
from .prepared import PreparedDataset, prepared_staging, seal_prepared

TIMIT_FRAMING = Framing(sample_rate=16000, frame_size=200, sequence_frames=40)
FULL_COUNTS = {"train": 4620, "test": 1680}
VALID_FRACTION = 0.05
VALID_SEED = 1234
VALID_LIST = "valid_files.txt"
PROTOCOL = "timit-srnn"
ATTRIBUTION = "TIMIT Acoustic-Phonetic Continuous Speech Corpus, LDC93S1 (Garofolo et al., 1993), under the LDC's licence"
SPLIT_FOLDERS = ("train", "test")
WAV_ENDINGS = (".wav.wav", ".wav")  # the longer first: `SA1.WAV.wav` is a RIFF copy of `SA1.WAV`
SPHERE_MAGIC = b"NIST_1A"
SPHERE_HEADER_BYTES = 1024
TREE_HINT = (
    "ROOT must be a TIMIT copy in the LDC layout: TRAIN and TEST folders holding "
    "DR1..DR8/<speaker>/<utterance>.WAV (upper or lower case)."
)


@dataclass(frozen=True)
class Utterance:
    id: str  # the lower-cased path from the tree's root without extensions: train/dr1/fcjf0/sa1
    path: Path


def prepare_timit(root: Path, out: Path, force: bool = False, progress: ProgressCallback | None = None) -> PreparedDataset:
    """Read a TIMIT tree at root into a prepared dataset at out (see the module docstring)."""
    tree, folders = locate_tree(Path(root))
    everything = {split: find_utterances(tree, folder) for split, folder in folders.items()}
    train, valid = hold_out_valid(everything["train"])
    framing, moments = TIMIT_FRAMING, Moments()
    counter = ProgressCounter(len(everything["train"]) + len(everything["test"]), framing.sample_rate, progress)
    with prepared_staging(out, force) as staging:
        files, counts, seconds = {}, {}, {}
        for split, utterances in (("train", train), ("valid", valid)):
            files[split], counts[split], seconds[split] = write_stream(
                staging, split, utterances, counter, moments if split == "train" else None)
        files["test"], counts["test"], seconds["test"] = write_utterances(staging, "test", everything["test"], counter)
        (staging / VALID_LIST).write_text("".join(f"{utterance.id}\n" for utterance in valid))
        layout = {"train": "stream", "valid": "stream", "test": "utterances"}
        meta = audio_meta("timit", PROTOCOL, framing, counts, layout, seconds, moments, str(tree.resolve()), ATTRIBUTION)
        meta.files = files
        seal_prepared(staging, meta)
    return open_prepared_with(out, partial_copy_warnings(len(everything["train"]), len(everything["test"])))


# -- finding the utterances --------------------------------------------------------------------------


def locate_tree(root: Path) -> tuple[Path, dict[str, Path]]:
    """The folder holding TRAIN and TEST (root itself, or its one subfolder that does, as in
    copies with a TIMIT/ or data/ folder on top), and those two folders."""
    if not root.exists():
        raise DataError(f"{root} does not exist.", TREE_HINT)
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a TIMIT folder.", TREE_HINT)
    tree, folders = root, split_folders(root)
    if not folders:
        inner = [child for child in sorted(root.iterdir()) if child.is_dir() and split_folders(child)]
        if len(inner) == 1:
            tree, folders = inner[0], split_folders(inner[0])
    if not folders:
        raise DataError(f"{root} is not a TIMIT tree: it has no TRAIN or TEST folder.", TREE_HINT)
    for split in SPLIT_FOLDERS:
        if split not in folders:
            present = next(iter(folders.values())).name
            raise DataError(f"{tree} has a {present} folder but no {split.upper()} folder: a partial copy?", TREE_HINT)
    return tree, folders


def split_folders(folder: Path) -> dict[str, Path]:
    """{"train": ..., "test": ...} for the subfolders named so, in any case."""
    return {
        child.name.lower(): child for child in sorted(folder.iterdir())
        if child.name.lower() in SPLIT_FOLDERS and child.is_dir()
    }


def list_files(folder: Path) -> list[Path]:
    """Every file under folder, in the file system's own order (sorted later)."""
    return [Path(parent) / name for parent, _, names in os.walk(folder) for name in names]


def find_utterances(tree: Path, folder: Path) -> list[Utterance]:
    """The utterances under one split folder, sorted by id, each counted once: where a SPHERE
    `.WAV` and a RIFF `.WAV.wav` copy of it both exist, the SPHERE file is read."""
    candidates: dict[str, list[Path]] = {}
    for path in list_files(folder):
        utterance = utterance_id(path, tree)
        if utterance is not None and not path.name.startswith("."):
            candidates.setdefault(utterance, []).append(path)
    if not candidates:
        raise DataError(f"{folder} holds no .WAV files.", TREE_HINT)
    return [Utterance(utterance, preferred_file(paths)) for utterance, paths in sorted(candidates.items())]


def utterance_id(path: Path, tree: Path) -> str | None:
    """train/dr1/fcjf0/sa1 for TRAIN/DR1/FCJF0/SA1.WAV or .../sa1.wav.wav; None for other files."""
    relative = path.relative_to(tree).as_posix().lower()
    for ending in WAV_ENDINGS:
        if relative.endswith(ending):
            return relative[: -len(ending)]
    return None


def preferred_file(paths: list[Path]) -> Path:
    if len(paths) == 1:
        return paths[0]
    return min(paths, key=lambda path: (not is_sphere(path), path.name.lower().endswith(".wav.wav"), path.as_posix()))


def is_sphere(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(SPHERE_MAGIC)) == SPHERE_MAGIC


def hold_out_valid(train: list[Utterance]) -> tuple[list[Utterance], list[Utterance]]:
    """(train, valid): int(n * 0.05) utterances (at least one) drawn with a fixed seed from the
    id-sorted list, so that the split does not depend on the file system's order."""
    count = max(1, int(len(train) * VALID_FRACTION))
    if len(train) - count < 1:
        raise DataError(f"Only {len(train)} train utterance found; at least 2 are needed to hold one out for validation.", TREE_HINT)
    chosen = set(np.random.default_rng(seed=VALID_SEED).permutation(len(train))[:count].tolist())
    kept = [utterance for index, utterance in enumerate(train) if index not in chosen]
    return kept, [utterance for index, utterance in enumerate(train) if index in chosen]


def partial_copy_warnings(train: int, test: int) -> list[str]:
    if train == FULL_COUNTS["train"] and test == FULL_COUNTS["test"]:
        return []
    warning = (
        f"Found {train} train and {test} test utterances; the full TIMIT has {FULL_COUNTS['train']} and "
        f"{FULL_COUNTS['test']}: a partial copy? Results will not compare with published ones."
    )
    return [warning]


# -- reading and writing -----------------------------------------------------------------------------


def read_utterance(utterance: Utterance) -> np.ndarray:
    """One utterance as int16 samples at 16 kHz (bit-exact for TIMIT's 16-bit PCM)."""
    refuse_shorten(utterance.path)
    data, rate = read_audio(utterance.path)
    if rate != TIMIT_FRAMING.sample_rate:
        raise DataError(
            f"{utterance.path} is sampled at {rate} Hz; TIMIT is 16 kHz, and this protocol does not resample.",
            "Use an original 16 kHz copy of TIMIT, or `zforcing prepare wav` for audio at other rates.",
        )
    return to_int16(to_mono(data))


def refuse_shorten(path: Path) -> None:
    """libsndfile cannot read shorten-compressed SPHERE (some TIMIT copies are): say how to
    decompress it instead of reporting an unreadable file."""
    coding = sphere_sample_coding(path)
    if coding is not None and "shorten" in coding.lower():
        raise DataError(
            f"{path} is shorten-compressed NIST SPHERE ({coding}), which libsndfile cannot read.",
            "Decompress the copy first, e.g. `sph2pipe -f wav IN.WAV OUT.WAV` for every file "
            "(or sox built with SPHERE support), then prepare again.",
        )


def sphere_sample_coding(path: Path) -> str | None:
    """The `sample_coding` field of a NIST SPHERE header, None for other files."""
    with open(path, "rb") as handle:
        header = handle.read(SPHERE_HEADER_BYTES)
    if not header.startswith(SPHERE_MAGIC):
        return None
    for line in header.decode("latin-1").splitlines():
        fields = line.split(None, 2)
        if fields and fields[0] == "end_head":
            break
        if len(fields) == 3 and fields[0] == "sample_coding":
            return fields[2].strip()
    return None


def write_stream(staging: Path, split: str, utterances: list[Utterance], counter: ProgressCounter,
                 moments: Moments | None) -> tuple[dict[str, str], int, float]:
    """A train or valid split: its files as one stream, cut to whole sequences."""
    framing = TIMIT_FRAMING
    with closing(RawStream(staging / f"{split}.raw")) as stream:
        for utterance in utterances:
            samples = read_utterance(utterance)
            stream.append(samples)
            counter.add_audio(len(samples))
            counter.file_done()
    count = framing.stream_sequences(stream.length)
    if count < 1:
        raise DataError(
            f"The {split} split ({len(utterances)} utterances, {stream.length / framing.sample_rate:.2f} s) is "
            f"shorter than one sequence of {framing.sequence_samples / framing.sample_rate:g} s.",
            "A partial copy of TIMIT? The full corpus has 4620 train utterances.",
        )
    start, stop = framing.stream_range(0, count)
    files = write_split(staging, split, stream, start, stop, offsets_within(stream.starts, start, stop), moments)
    stream.path.unlink()
    return files, count, (stop - start) / framing.sample_rate


def write_utterances(staging: Path, split: str, utterances: list[Utterance],
                     counter: ProgressCounter) -> tuple[dict[str, str], int, float]:
    """The test split: every utterance whole, cut to whole frames, with N + 1 offsets."""
    frame_size = TIMIT_FRAMING.frame_size
    with closing(RawStream(staging / f"{split}.raw")) as stream:
        for utterance in utterances:
            samples = read_utterance(utterance)
            frames = len(samples) // frame_size
            if frames < 2:
                raise DataError(
                    f"{utterance.path} holds {len(samples)} samples, less than two frames of {frame_size}.",
                    "TIMIT utterances last seconds; the file may be truncated.",
                )
            stream.append(samples[: frames * frame_size])
            counter.add_audio(len(samples))
            counter.file_done()
    files = write_split(staging, split, stream, 0, stream.length, [*stream.starts, stream.length])
    stream.path.unlink()
    return files, len(utterances), stream.length / TIMIT_FRAMING.sample_rate
