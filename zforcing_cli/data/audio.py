"""Audio corpora into the prepared format: framing, streaming writers, and the pipeline for a
folder of audio files (`prepare blizzard` and `prepare wav`).

Memory stays bounded by one decoded file. Each file is decoded, made mono, resampled and
appended as int16 to a headerless stream file in the staging folder; the split arrays are then
copied out of that stream in chunks (the `.npy` header first, then the bytes), and the train
split's mean and std are accumulated during that copy. Nothing concatenates the corpus in memory.

A stream split of n frames holds (n - 1) // S sequences of S + 1 frames: sequence i is frames
i*S .. (i+1)*S, the first its context (the model's first input, a real frame, as SRNN's
preprocessing does) and the S after it the targets, so targets are always the context's own
continuation shifted by one frame, never the next stored segment (REFERENCE.md, defect 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import soxr

from ..errors import DataError, UsageError
from ..fileio import files_under
from ..humanize import duration
from .prepared import (
    SAMPLE_SCALE,
    SPLITS,
    DatasetMeta,
    PreparedDataset,
    open_prepared,
    parse_split,
    prepared_staging,
    seal_prepared,
)

# progress(files_done, files_total, seconds_of_audio_done), called once before the first file
# and once after each file.
ProgressCallback = Callable[[int, int, float], None]

AUDIO_EXTENSIONS = (
    ".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64", ".sph", ".nist",
)
COPY_CHUNK = 1 << 18  # samples copied (and counted into the statistics) at a time: 512 KB, 2 MB as float64
STREAM_FILE = "stream.raw"
BLIZZARD_PROTOCOL = "blizzard-16k-0.5s-90-5-5"
BLIZZARD_ATTRIBUTION = "Blizzard Challenge 2013 audiobook speech (Lessac Technologies); used under its own licence"
DEFAULT_SPLIT = (90.0, 5.0, 5.0)
UNREADABLE_HINT = "Check that the file is complete and in a format libsndfile reads (WAV, FLAC, MP3, OGG, SPHERE, ...), or remove it."
# The rates --sample-rate takes, in Hz: from telephone speech's 8 kHz down to 1 kHz, and up to
# 384 kHz, the highest rate audio interfaces record at. Beyond them lies a typo, not audio.
SAMPLE_RATES = (1_000, 384_000)
LISTED_UNREADABLE = 5  # in the error when no file at all can be read; a warning lists every one


@dataclass(frozen=True)
class Framing:
    """How a waveform is cut: frames of frame_size samples, sequences of sequence_frames targets."""

    sample_rate: int = 16000
    frame_size: int = 200
    sequence_frames: int = 40

    @property
    def sequence_samples(self) -> int:
        """Samples one stream sequence spans: its context frame and its targets."""
        return (self.sequence_frames + 1) * self.frame_size

    def stream_sequences(self, samples: int) -> int:
        """Sequences in a stream of this many samples (consecutive ones share a frame)."""
        return max(0, (samples // self.frame_size - 1) // self.sequence_frames)

    def stream_range(self, first_sequence: int, count: int) -> tuple[int, int]:
        """Samples [start, stop) that sequences first_sequence .. first_sequence + count - 1 span."""
        start = first_sequence * self.sequence_frames * self.frame_size
        return start, start + (count * self.sequence_frames + 1) * self.frame_size

    def check(self) -> None:
        for name, value in (("--sample-rate", self.sample_rate), ("--frame-size", self.frame_size),
                            ("--sequence-length", self.sequence_frames)):
            if value < 1:
                raise UsageError(f"{name} must be a positive number, not {value}.")
        low, high = SAMPLE_RATES
        if not low <= self.sample_rate <= high:
            raise UsageError(f"--sample-rate {self.sample_rate:,} Hz is outside {low:,} to {high:,} Hz.",
                             "Speech is recorded at 8,000 or 16,000 Hz and music at 44,100 or 48,000; audio interfaces "
                             f"record at {high // 1000} kHz at most, and below {low // 1000} kHz no speech is left.")
        if self.frame_size > self.sample_rate:
            raise UsageError(f"--frame-size {self.frame_size:,} is more than one second of audio at {self.sample_rate:,} Hz "
                             f"(a frame is at most --sample-rate samples).",
                             "A frame is one step's input: the paper's is 200 samples (12.5 ms at 16 kHz).")


@dataclass
class Moments:
    """Running sum and sum of squares (float64) of waveform samples: the mean and std of a
    split without holding it in memory."""

    count: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, samples: np.ndarray) -> None:
        waveform = samples.astype(np.float64) / SAMPLE_SCALE
        self.count += waveform.size
        self.total += float(waveform.sum())
        self.squares += float(np.dot(waveform, waveform))

    def mean_std(self) -> tuple[float, float]:
        mean = self.total / max(self.count, 1)
        return mean, math.sqrt(max(self.squares / max(self.count, 1) - mean * mean, 0.0))


class RawStream:
    """int16 samples appended to a headerless file, and the position where each piece starts."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by close(), e.g. through contextlib.closing
        self.length = 0
        self.starts: list[int] = []

    def append(self, samples: np.ndarray) -> None:
        self.starts.append(self.length)
        self.handle.write(np.ascontiguousarray(samples, dtype="<i2").tobytes())
        self.length += len(samples)

    def close(self) -> None:
        self.handle.close()


class ProgressCounter:
    """Files and seconds of audio done, reported to an optional progress callback."""

    def __init__(self, total: int, sample_rate: int, callback: ProgressCallback | None):
        self.total, self.sample_rate, self.callback = total, sample_rate, callback
        self.files, self.seconds = 0, 0.0
        if callback:
            callback(0, total, 0.0)

    def add_audio(self, samples: int) -> None:
        self.seconds += samples / self.sample_rate

    def file_done(self) -> None:
        self.files += 1
        if self.callback:
            self.callback(self.files, self.total, self.seconds)


def copy_to_npy(raw: Path, npy: Path, start: int, stop: int, moments: Moments | None = None) -> None:
    """Samples [start, stop) of a raw int16 stream as a 1-D .npy file, copied in chunks."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<i2")), "fortran_order": False, "shape": (stop - start,)}
    with open(raw, "rb") as source, open(npy, "wb") as target:
        np.lib.format.write_array_header_1_0(target, header)
        source.seek(start * 2)
        for position in range(start, stop, COPY_CHUNK):
            chunk = np.fromfile(source, dtype="<i2", count=min(COPY_CHUNK, stop - position))
            target.write(chunk.tobytes())
            if moments is not None:
                moments.add(chunk)


def offsets_within(starts: Sequence[int], start: int, stop: int) -> list[int]:
    """Where pieces (files) begin inside samples [start, stop), relative to start: 0 first (a
    split may begin inside a file), the length last. Informational for stream splits."""
    return [0, *(position - start for position in starts if start < position < stop), stop - start]


def write_split(staging: Path, split: str, stream: RawStream, start: int, stop: int, offsets: list[int],
                moments: Moments | None = None) -> dict[str, str]:
    """Write <split>.samples.npy and <split>.offsets.npy; returns the field -> file names."""
    files = {"samples": f"{split}.samples.npy", "offsets": f"{split}.offsets.npy"}
    copy_to_npy(stream.path, staging / files["samples"], start, stop, moments)
    np.save(staging / files["offsets"], np.asarray(offsets, dtype=np.int64))
    return files


def to_int16(waveform: np.ndarray) -> np.ndarray:
    """A float waveform in [-1, 1) as int16 samples (x * 32768, rounded, clipped)."""
    return np.clip(np.rint(waveform * SAMPLE_SCALE), -32768, 32767).astype(np.int16)


def read_audio(path: Path, dtype: str = "float32") -> tuple[np.ndarray, int]:
    """(samples (N, channels), sample rate) of one file, or a DataError naming it."""
    try:
        data, rate = soundfile.read(str(path), dtype=dtype, always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as error:
        reason = getattr(error, "error_string", "") or str(error)
        raise DataError(f"Cannot read {path}: {reason.rstrip('.')}.", UNREADABLE_HINT) from None
    return data, rate


def to_mono(data: np.ndarray) -> np.ndarray:
    """(N, channels) -> (N,): the average of the channels."""
    return data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)


def decode_file(path: Path, sample_rate: int) -> np.ndarray:
    """One file as mono int16 at sample_rate (resampled with soxr when it differs)."""
    return decode_with_rate(path, sample_rate)[0]


def decode_with_rate(path: Path, sample_rate: int) -> tuple[np.ndarray, int]:
    """decode_file's samples, and the rate the file was recorded at."""
    data, rate = read_audio(path)
    waveform = to_mono(data)
    if rate != sample_rate:
        waveform = soxr.resample(waveform, rate, sample_rate)
    return to_int16(waveform), rate


def audio_meta(kind: str, protocol: str, framing: Framing, counts: dict[str, int], layout: dict[str, str],
               seconds: dict[str, float], train_moments: Moments, source: str, attribution: str,
               skipped_files: int = 0) -> DatasetMeta:
    mean, std = train_moments.mean_std()
    if std == 0.0:
        raise DataError(
            f"The train split of {source} is silent (every sample is the same), so it cannot be normalised.",
            "Check the audio files: they hold no sound.",
        )
    audio = {
        "sample_rate": framing.sample_rate, "frame_size": framing.frame_size, "sequence_frames": framing.sequence_frames,
        "mean": mean, "std": std, "layout": layout, "seconds": seconds, "skipped_files": skipped_files,
    }
    return DatasetMeta(
        kind=kind, protocol=protocol, modality="frames", sequence_length=framing.sequence_frames,
        counts=counts, source=source, attribution=attribution, audio=audio,
    )


# -- a folder of audio files: blizzard and wav -------------------------------------------------------


@dataclass
class StreamReport:
    """What reading a folder's files into the stream found: the audio read, the rates the files
    were recorded at, and the files left out, by reason (too short: with its length in samples;
    unreadable: with why)."""

    files: int
    framing: Framing
    kind: str
    read_samples: int = 0  # every decoded file's, at the framing's rate
    kept_samples: int = 0
    highest_rate: int = 0  # the highest rate a file was recorded at
    silent: list[Path] = field(default_factory=list)
    too_short: list[tuple[Path, int]] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        """The files left out."""
        return len(self.silent) + len(self.too_short) + len(self.unreadable)

    def seconds(self, samples: int) -> str:
        return duration(samples / self.framing.sample_rate)

    def warnings(self) -> list[str]:
        return [warning for warning in (self.upsampled(), self.skipped(), self.unread()) if warning]

    def upsampled(self) -> str | None:
        """Every file was recorded below the rate asked for: upsampling it adds nothing."""
        rate = self.framing.sample_rate
        if not 0 < self.highest_rate < rate:
            return None
        advice = (f"prepare with --sample-rate {self.highest_rate} to keep the audio as it is" if self.kind == "wav" else
                  f"the {self.kind} protocol is {rate} Hz; `zforcing prepare wav --sample-rate {self.highest_rate}` keeps the audio as it is")
        return (f"The audio was recorded at {self.highest_rate} Hz at most and was upsampled to {rate} Hz, which adds no "
                f"information, only {rate / self.highest_rate:g}× the data and the work: {advice}.")

    def skipped(self) -> str | None:
        if not (self.silent or self.too_short):
            return None
        reasons = []
        if self.silent:
            reasons.append(f"{len(self.silent)} silent (e.g. {self.silent[0]})")
        if self.too_short:
            shortest = self.framing.sequence_samples / self.framing.sample_rate
            reasons.append(f"{len(self.too_short)} shorter than one sequence of {shortest:g} s "
                           f"({self.framing.sequence_frames + 1} frames of {self.framing.frame_size} samples; e.g. {self.too_short[0][0]})")
        return f"Skipped {len(self.silent) + len(self.too_short)} of {self.files} audio files: {'; '.join(reasons)}.{self.shorter_sequences()}"

    def shorter_sequences(self) -> str:
        """How to keep the too-short files: the sequence length that keeps half of them."""
        if not self.too_short:
            return ""
        if self.kind != "wav":
            return " `zforcing prepare wav` with a smaller --frame-size or --sequence-length keeps shorter files."
        frame = self.framing.frame_size
        frames = int(np.median([length for _, length in self.too_short])) // frame - 1
        if frames < 1:
            return " A smaller --frame-size keeps shorter files."
        kept = sum(length >= (frames + 1) * frame for _, length in self.too_short)
        seconds = (frames + 1) * frame / self.framing.sample_rate
        return (f" Shorter sequences keep them: --sequence-length {frames} ({seconds:g} s) keeps {kept} of these "
                f"{len(self.too_short)}; a smaller --frame-size works too.")

    def unread(self) -> str | None:
        """Every unreadable file, named with why."""
        if not self.unreadable:
            return None
        listed = "\n".join(f"  {path}: {reason}" for path, reason in self.unreadable)
        return f"Skipped {len(self.unreadable)} unreadable audio file(s) of {self.files} (--strict stops at the first):\n{listed}"

    def too_little(self, folder: Path) -> DataError:
        """The error for a folder whose usable audio makes fewer than three sequences, saying
        what was read and what was dropped."""
        sequence = self.framing.sequence_samples / self.framing.sample_rate
        dropped = []
        if self.too_short:
            dropped.append(f"{len(self.too_short)} file(s) shorter than one sequence ({self.seconds(sum(n for _, n in self.too_short))})")
        if self.silent:
            dropped.append(f"{len(self.silent)} silent")
        if self.unreadable:
            dropped.append(f"{len(self.unreadable)} unreadable")
        dropped_text = f"; dropped: {', '.join(dropped)}" if dropped else ""
        longest = max((length for _, length in self.too_short), default=0) // self.framing.frame_size - 1
        fits = f" (the longest file holds {longest} frames)" if longest >= 1 else ""
        return DataError(
            f"{folder} holds too little usable audio for a train, a valid and a test sequence of {sequence:g} s each: "
            f"{self.seconds(self.kept_samples)} usable of {self.seconds(self.read_samples)} read{dropped_text}.",
            f"Use a shorter --sequence-length{fits} or --frame-size, or add audio." if self.kind == "wav" else
            "Add audio, or use `zforcing prepare wav` with a shorter --sequence-length or --frame-size.",
        )

    def nothing_readable(self, folder: Path) -> DataError:
        listed = "; ".join(f"{path}: {reason}" for path, reason in self.unreadable[:LISTED_UNREADABLE])
        more = f"; and {len(self.unreadable) - LISTED_UNREADABLE} more" if len(self.unreadable) > LISTED_UNREADABLE else ""
        return DataError(f"None of the {self.files} audio files in {folder} could be read: {listed}{more}.", UNREADABLE_HINT)


def split_counts(sequences: int, split: tuple[float, float, float]) -> dict[str, int]:
    """Sequences per split, in order: valid and test get their share (at least one each),
    train the rest."""
    valid = max(1, int(sequences * split[1] / 100))
    test = max(1, int(sequences * split[2] / 100))
    return {"train": sequences - valid - test, "valid": valid, "test": test}


def find_audio_files(folder: Path) -> list[Path]:
    """Every audio file under folder (recursively, hidden files and folders left out), sorted
    by relative path so that the stream's order, hence the split, is the same everywhere."""
    hint = "SOURCE must be a folder of audio files (searched recursively)."
    if not folder.exists():
        raise DataError(f"{folder} does not exist.", hint)
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder of audio files.", hint)
    found = files_under(folder, AUDIO_EXTENSIONS)
    if not found:
        raise DataError(
            f"No audio files in {folder} (looked for {', '.join(AUDIO_EXTENSIONS)}, in every subfolder).", hint,
        )
    return found


def stream_files(files: list[Path], stream: RawStream, framing: Framing, progress: ProgressCallback | None,
                 kind: str = "wav", strict: bool = False) -> StreamReport:
    """Decode each file in turn and append it to stream; silent and too-short files are left
    out, and so are unreadable ones unless strict (then the first stops everything)."""
    report, counter = StreamReport(len(files), framing, kind), ProgressCounter(len(files), framing.sample_rate, progress)
    for path in files:
        try:
            samples, rate = decode_with_rate(path, framing.sample_rate)
        except DataError as error:
            if strict:
                raise DataError(error.message, f"{UNREADABLE_HINT} Without --strict, unreadable files are skipped and listed.") from None
            report.unreadable.append((path, unreadable_reason(error.message, path)))
            counter.file_done()
            continue
        report.read_samples += len(samples)
        report.highest_rate = max(report.highest_rate, rate)
        if not samples.any():
            report.silent.append(path)
        elif len(samples) < framing.sequence_samples:
            report.too_short.append((path, len(samples)))
        else:
            stream.append(samples)
            report.kept_samples += len(samples)
            counter.add_audio(len(samples))
        counter.file_done()
    return report


def unreadable_reason(message: str, path: Path) -> str:
    """read_audio's message without the 'Cannot read PATH: ' that a listing by path repeats."""
    return message.removeprefix(f"Cannot read {path}: ").rstrip(".")


# A frame is 12.5 ms of audio by default, the paper's 200 samples at 16 kHz at any rate: a
# Gaussian over a frame has to predict all of its samples from the frames before it, and at 8
# kHz 200 samples (25 ms) left its mean too blurred to sound like speech (docs/speech.md,
# "Samples": the median spectral flatness of the output means was 0.14 at 25 ms, 0.018 at 12.5 ms).
FRAME_SECONDS = 0.0125


def default_frame_size(sample_rate: int) -> int:
    """Samples in FRAME_SECONDS at sample_rate: 200 at 16 kHz, 100 at 8 kHz."""
    return max(1, round(FRAME_SECONDS * sample_rate))


def prepare_audio_folder(
    folder: Path, out: Path, kind: str = "wav", force: bool = False, progress: ProgressCallback | None = None,
    sample_rate: int = 16000, frame_size: int | None = None, sequence_length: int = 40,
    split: str | Sequence[float] = DEFAULT_SPLIT, strict: bool = False,
) -> PreparedDataset:
    """Every audio file under folder, in order, as one mono stream at sample_rate, cut into
    sequences of sequence_length frames of frame_size samples (default: 12.5 ms' worth) and split in order (the first
    90% of the sequences are train, then valid, then test, by default). Files that cannot be
    read are skipped and listed in a warning (strict: the first one is an error)."""
    frame_size = default_frame_size(sample_rate) if frame_size is None else frame_size
    framing, shares = Framing(sample_rate, frame_size, sequence_length), parse_split(split)
    framing.check()
    folder = Path(folder)
    files = find_audio_files(folder)
    source = str(folder.resolve())
    with prepared_staging(out, force) as staging:
        with closing(RawStream(staging / STREAM_FILE)) as stream:
            report = stream_files(files, stream, framing, progress, kind, strict)
        if len(report.unreadable) == len(files):
            raise report.nothing_readable(folder)
        counts = split_counts(framing.stream_sequences(stream.length), shares)
        if counts["train"] < 1:
            raise report.too_little(folder)
        meta = write_stream_splits(staging, stream, framing, counts, kind, source, len(report))
        stream.path.unlink()
        seal_prepared(staging, meta)
    return open_prepared_with(out, report.warnings())


def write_stream_splits(staging: Path, stream: RawStream, framing: Framing, counts: dict[str, int], kind: str,
                        source: str, skipped_files: int) -> DatasetMeta:
    """Cut the stream into consecutive ranges of sequences, one per split, each with its own
    context frame (the frame before its first target: valid continues where train ends)."""
    moments, files, seconds, first = Moments(), {}, {}, 0
    for split in SPLITS:
        start, stop = framing.stream_range(first, counts[split])
        offsets = offsets_within(stream.starts, start, stop)
        files[split] = write_split(staging, split, stream, start, stop, offsets, moments if split == "train" else None)
        seconds[split] = (stop - start) / framing.sample_rate
        first += counts[split]
    if kind == "blizzard":
        protocol, attribution = BLIZZARD_PROTOCOL, BLIZZARD_ATTRIBUTION
    else:
        protocol, attribution = f"wav-{framing.sample_rate}-{framing.frame_size}x{framing.sequence_frames}", ""
    meta = audio_meta(kind, protocol, framing, counts, dict.fromkeys(SPLITS, "stream"), seconds, moments, source,
                      attribution, skipped_files)
    meta.files = files
    return meta


def open_prepared_with(out: Path, warnings: list[str]) -> PreparedDataset:
    dataset = open_prepared(Path(out))
    dataset.warnings = warnings
    return dataset
