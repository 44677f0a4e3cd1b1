"""The prepared-dataset format (DESIGN.md §4): meta.json plus numpy arrays, memory-mapped.

A prepared dataset folder holds

    meta.json                 kind, protocol, modality, splits with counts and array files, ...
    <split>.<field>.npy       arrays; memory-mapped when training, so a batch reads only its rows

Binary images are stored bit-packed (`pixels`, uint8 rows of ceil(784 / 8) bytes). Audio
(modality "frames") is stored as int16 `samples` with int64 `offsets`, normalised on the fly (see
`PreparedSplit.sequence` and audio.py). Text (modality "tokens") is stored as word ids (`tokens`,
uint16 for vocabularies that fit) with int64 sentence `offsets`; the targets add </s> (text.py).
`PreparedSplit.batch` turns stored rows into model targets.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, UsageError
from ..fileio import atomic_directory, holds_json_object, write_json
from .location import META_FILE, check_prepared_folder

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
SAMPLE_SCALE = 32768.0  # an int16 sample is the float waveform (in [-1, 1)) times this
# Every text vocabulary starts with these four, at these ids (text.py builds the rest).
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, START, END, UNKNOWN = range(len(SPECIALS))
HASH_CHUNK = 1 << 20  # bytes hashed at a time (1 MB): fingerprinting a corpus holds one chunk


@dataclass
class DatasetMeta:
    kind: str  # mnist, timit, imdb, ...
    protocol: str  # a name for the split/preprocessing protocol
    modality: str  # binary | frames | tokens: selects the model's output distribution
    sequence_length: int  # steps per sequence (the maximum, for variable-length data)
    counts: dict[str, int]  # sequences per split
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> field -> file
    image_shape: list[int] | None = None
    source: str = ""
    attribution: str = ""
    fingerprint: str = ""  # sha256 of the arrays: the same data wherever the folder moves
    format_version: int = FORMAT_VERSION
    # modality "frames" only: sample_rate, frame_size, sequence_frames, mean, std (of the train
    # split's float waveform), layout {split: "stream"|"utterances"}, seconds {split: ...},
    # skipped_files
    audio: dict | None = None
    # modality "tokens" only: vocabulary (ids in order, the four specials first), specials,
    # lowercase, min_tokens, max_tokens, split, seed, tokenizer and corpus statistics (text.py)
    text: dict | None = None

    @property
    def input_size(self) -> int:
        """What the model's `input_size` must be for this data."""
        if self.modality == "binary":
            return 2
        if self.modality == "frames" and self.audio:
            return int(self.audio["frame_size"])
        if self.modality == "tokens" and self.text:
            return len(self.text["vocabulary"])
        raise DataError(f"Datasets of modality {self.modality!r} are not supported by this version.")

    @classmethod
    def from_dict(cls, values: dict) -> "DatasetMeta":
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in values.items() if key in known})


def normalise_samples(samples: np.ndarray, mean: float, std: float) -> np.ndarray:
    """int16 samples -> float32 (samples / 32768 - mean) / std: how every audio model sees its
    data, with the training split's mean and std."""
    waveform = np.asarray(samples, dtype=np.float32) / np.float32(SAMPLE_SCALE)
    return (waveform - np.float32(mean)) / np.float32(std)


class Batch(NamedTuple):
    """What the model takes for a set of sequences."""

    targets: torch.Tensor  # (B, T) pixels or token ids, or (B, T, F) normalised audio frames
    mask: torch.Tensor  # (B, T): 1 on real steps, 0 on padding after a sequence's end
    first_input: torch.Tensor | None = None  # (B, F): u_1 when the data has a real one (audio's context frame)

    def to(self, device: torch.device | str) -> "Batch":
        """The batch on device. To a GPU, the tensors go through pinned (page-locked) memory so
        that the copies run asynchronously, without the host waiting for them."""
        pin = torch.device(device).type == "cuda"
        return Batch(*(None if t is None else (t.pin_memory() if pin else t).to(device, non_blocking=True) for t in self))

    def repeat_interleave(self, repeats: int) -> "Batch":
        """Each sequence `repeats` times in a row (the K samples of an importance-weighted bound)."""
        return Batch(*(None if t is None else t.repeat_interleave(repeats, dim=0) for t in self))


class PreparedSplit:
    """One split: stored rows and the conversion of a set of rows into a batch of targets.

    Audio splits come in two layouts (meta.audio["layout"][name]):
    - "stream": one waveform; sequence i is frames i*S .. (i+1)*S (S = sequence_frames), the
      first of them the context (the model's first input, a real frame) and the S after it the
      targets. Consecutive sequences share a frame, so there are (frames - 1) // S of them.
    - "utterances": whole utterances one after another, `offsets` holding the N + 1 start
      positions; utterance j's first frame is its context, the other T - 1 frames the targets.
    """

    def __init__(self, meta: DatasetMeta, arrays: dict[str, np.ndarray], name: str = ""):
        self.meta = meta
        self.arrays = arrays
        self.name = name

    def __len__(self) -> int:
        if "pixels" in self.arrays:
            return len(self.arrays["pixels"])
        if "tokens" in self.arrays or self.layout == "utterances":
            return len(self.arrays["offsets"]) - 1
        frames = len(self.arrays["samples"]) // self.audio["frame_size"]
        return max(0, (frames - 1) // self.audio["sequence_frames"])

    @property
    def audio(self) -> dict:
        if not self.meta.audio:
            raise DataError(f"This dataset holds no audio (modality {self.meta.modality!r}).")
        return self.meta.audio

    @property
    def layout(self) -> str:
        return self.audio["layout"][self.name]

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Context frame (F,) and targets (T, F) of one audio sequence, float32 and normalised:
        (int16 / 32768 - mean) / std with the train split's mean and std."""
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} is out of range for the {self.name} split ({len(self)} sequences)")
        frame_size = self.audio["frame_size"]
        if self.layout == "utterances":
            start, stop = int(self.arrays["offsets"][index]), int(self.arrays["offsets"][index + 1])
        else:
            start = index * self.audio["sequence_frames"] * frame_size
            stop = start + (self.audio["sequence_frames"] + 1) * frame_size
        frames = self.normalise(self.arrays["samples"][start:stop]).reshape(-1, frame_size)
        return frames[0], frames[1:]

    def normalise(self, samples: np.ndarray) -> np.ndarray:
        """int16 samples -> the float32 values the model sees."""
        return normalise_samples(samples, self.audio["mean"], self.audio["std"])

    def batch(self, indices: np.ndarray) -> Batch:
        """The sequences at indices: pixels (B, 784); sentences' word ids and </s>, padded to
        the longest (B, T); or audio frames padded to the longest (B, T, F) with their context
        frames as first inputs."""
        if "tokens" in self.arrays:
            return self.token_batch(indices)
        if "pixels" not in self.arrays:
            return self.audio_batch(indices)
        rows = np.asarray(self.arrays["pixels"][indices])
        bits = np.unpackbits(rows, axis=1, count=self.meta.sequence_length)
        targets = torch.from_numpy(bits.astype(np.float32))
        return Batch(targets, torch.ones_like(targets))

    def steps(self, indices: np.ndarray) -> int:
        """The steps T of batch(indices), from the stored lengths alone: a process that reads only
        its share of a batch still draws the whole batch's noise, which is (B, T, Z)."""
        if "pixels" in self.arrays:
            return self.meta.sequence_length
        if "tokens" not in self.arrays and self.layout == "stream":
            return self.audio["sequence_frames"]
        offsets = self.arrays["offsets"]
        indices = np.asarray(indices, dtype=np.int64)
        longest = int((np.asarray(offsets[indices + 1]) - np.asarray(offsets[indices])).max())
        if "tokens" in self.arrays:
            return longest + 1  # the words and </s>
        return longest // self.audio["frame_size"] - 1  # frames less the context frame

    def sentence(self, index: int) -> np.ndarray:
        """One sentence's word ids (without </s>)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sentence {index} is out of range for the {self.name} split ({len(self)} sentences)")
        offsets = self.arrays["offsets"]
        return np.asarray(self.arrays["tokens"][int(offsets[index]):int(offsets[index + 1])], dtype=np.int64)

    def token_batch(self, indices: np.ndarray) -> Batch:
        """Word ids followed by </s> (id 2), padded with <pad> (id 0) to the longest."""
        sentences = [self.sentence(int(index)) for index in indices]
        steps = max(len(words) for words in sentences) + 1
        targets = np.zeros((len(sentences), steps), dtype=np.int64)
        mask = np.zeros((len(sentences), steps), dtype=np.float32)
        for row, words in enumerate(sentences):
            targets[row, : len(words)] = words
            targets[row, len(words)] = END
            mask[row, : len(words) + 1] = 1.0
        return Batch(torch.from_numpy(targets), torch.from_numpy(mask))

    def audio_batch(self, indices: np.ndarray) -> Batch:
        contexts, sequences = zip(*(self.sequence(int(index)) for index in indices))
        steps = max(len(targets) for targets in sequences)
        targets = np.zeros((len(sequences), steps, self.audio["frame_size"]), dtype=np.float32)
        mask = np.zeros((len(sequences), steps), dtype=np.float32)
        for row, frames in enumerate(sequences):
            targets[row, : len(frames)] = frames
            mask[row, : len(frames)] = 1.0
        return Batch(torch.from_numpy(targets), torch.from_numpy(mask), torch.from_numpy(np.stack(contexts)))


class PreparedDataset:
    def __init__(self, meta: DatasetMeta, splits: dict[str, PreparedSplit], location: str, warnings: list[str] | None = None):
        self.meta = meta
        self.splits = splits
        self.location = location  # a folder path, or "embedded"
        self.warnings = warnings or []  # what preparing noticed (a partial copy, skipped files); not stored

    def split(self, name: str) -> PreparedSplit:
        if name not in self.splits:
            raise DataError(
                f"The dataset at {self.location} has no {name!r} split.",
                f"Available splits: {', '.join(self.splits)}.",
            )
        return self.splits[name]


def parse_split(split: str | tuple[float, ...] | list[float], example: str = "90,5,5") -> tuple[float, float, float]:
    """'90,5,5' (percentages for train, valid, test) -> (90.0, 5.0, 5.0)."""
    hint = f"Give three positive percentages for train, valid and test that sum to 100, e.g. --split {example}."
    try:
        parts = tuple(float(part) for part in (split.split(",") if isinstance(split, str) else split))
    except ValueError:
        raise UsageError(f"--split {split!r} is not a list of numbers.", hint) from None
    if len(parts) != 3 or min(parts) <= 0 or not math.isclose(sum(parts), 100.0):
        raise UsageError(f"--split {split!r} is not three positive percentages that sum to 100.", hint)
    return parts  # type: ignore[return-value]


def arrays_fingerprint(arrays: dict[str, dict[str, np.ndarray]]) -> str:
    """A digest of every array's name, type, shape and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for split in sorted(arrays):
        for name in sorted(arrays[split]):
            array = np.ascontiguousarray(arrays[split][name])
            digest.update(f"{split}.{name}:{array.dtype.str}:{array.shape}".encode())
            data = memoryview(array).cast("B")
            for start in range(0, len(data), HASH_CHUNK):  # the same digest as one update
                digest.update(data[start:start + HASH_CHUNK])
    return "sha256:" + digest.hexdigest()


def is_prepared_dataset(folder: Path) -> bool:
    """Whether folder is a prepared dataset written by zforcing (for --force)."""
    return holds_json_object(Path(folder) / META_FILE, {"kind", "protocol", "modality"})


def write_prepared(
    out: Path, meta: DatasetMeta, arrays: dict[str, dict[str, np.ndarray]], force: bool = False
) -> Path:
    """Write a prepared dataset atomically. arrays maps split -> field -> array."""
    out = Path(out)
    with atomic_directory(out, force=force, what="prepared dataset", is_ours=is_prepared_dataset) as staging:
        meta.fingerprint = arrays_fingerprint(arrays)
        meta.files = {}
        for split, fields in arrays.items():
            meta.files[split] = {}
            for name, array in fields.items():
                filename = f"{split}.{name}.npy"
                np.save(staging / filename, np.ascontiguousarray(array))
                meta.files[split][name] = filename
        write_json(staging / META_FILE, asdict(meta))
    return out


@contextmanager
def prepared_staging(out: Path, force: bool = False) -> Iterator[Path]:
    """A staging folder for a prepared dataset written piece by piece (audio streams to disk);
    it becomes out only when the block ends without an error. Finish it with seal_prepared."""
    with atomic_directory(Path(out), force=force, what="prepared dataset", is_ours=is_prepared_dataset) as staging:
        yield staging


def seal_prepared(staging: Path, meta: DatasetMeta) -> None:
    """Fingerprint the arrays that meta.files names in staging and write meta.json, last, so
    that a folder with meta.json is complete."""
    meta.fingerprint = files_fingerprint(staging, meta.files)
    write_json(staging / META_FILE, asdict(meta))


def files_fingerprint(folder: Path, files: dict[str, dict[str, str]]) -> str:
    """arrays_fingerprint of .npy files, read a chunk at a time: memory-mapping them would count
    the whole corpus into the process's resident memory."""
    digest = hashlib.sha256()
    for split in sorted(files):
        for name in sorted(files[split]):
            with open(Path(folder) / files[split][name], "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran_order, dtype = read_header(handle)
                if fortran_order:
                    raise DataError(f"{files[split][name]} is not stored in C order.")
                digest.update(f"{split}.{name}:{dtype.str}:{shape}".encode())
                while chunk := handle.read(HASH_CHUNK):
                    digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def open_prepared(folder: Path) -> PreparedDataset:
    """Open a prepared dataset folder with its arrays memory-mapped."""
    folder = check_prepared_folder(folder)
    meta_path = folder / META_FILE
    try:
        values = json.loads(meta_path.read_text())
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        meta = DatasetMeta.from_dict(values)
    except (ValueError, TypeError) as error:
        raise DataError(f"{meta_path} is corrupted ({error}).", "Prepare the dataset again with --force.") from None
    if meta.format_version > FORMAT_VERSION:
        raise DataError(
            f"{folder} was prepared by a newer zforcing (format {meta.format_version}).",
            "Upgrade zforcing, or prepare the dataset again with this version.",
        )
    splits = {}
    for split, fields in meta.files.items():
        try:
            arrays = {name: np.load(folder / file, mmap_mode="r") for name, file in fields.items()}
        except (OSError, ValueError) as error:
            raise DataError(
                f"{folder} is incomplete or corrupted: cannot read {split} arrays ({error}).",
                "Prepare the dataset again with --force.",
            ) from None
        splits[split] = PreparedSplit(meta, arrays, split)
    return PreparedDataset(meta, splits, str(folder.resolve()))
