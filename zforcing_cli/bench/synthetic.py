"""The prepared datasets the benchmark trains on: synthetic audio (TIMIT's and Blizzard's shape,
Gaussian noise or a sparse file of zeros) and synthetic text (IMDB's), written to a temporary
folder; MNIST's is the embedded set."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..data import EMBEDDED, PreparedDataset, open_dataset, prepare
from ..data.audio import Framing
from ..data.prepared import META_FILE, SAMPLE_SCALE, SPECIALS, DatasetMeta
from ..data.text import IMDB_PROTOCOL
from ..fileio import write_json
from .defaults import SYNTHETIC_SEQUENCES

SYNTHETIC_STD = 0.1  # the synthetic waveform's standard deviation (full scale is 1)
WRITE_CHUNK = 1 << 20  # samples generated and written at a time


def write_samples(path: Path, samples: int, rng: np.random.Generator | None) -> None:
    """A 1-D int16 .npy file of `samples` samples: Gaussian noise of SYNTHETIC_STD drawn from rng,
    or, without one, a hole (a sparse file: only the header is written, the samples read as zeros)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<i2")), "fortran_order": False, "shape": (samples,)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        if rng is None:
            handle.truncate(handle.tell() + 2 * samples)
            return
        for start in range(0, samples, WRITE_CHUNK):
            count = min(WRITE_CHUNK, samples - start)
            noise = rng.normal(0.0, SYNTHETIC_STD * SAMPLE_SCALE, count)
            handle.write(np.clip(np.rint(noise), -32768, 32767).astype("<i2").tobytes())


def write_synthetic_audio(folder: Path, kind: str, sequences: int, rng: np.random.Generator | None) -> PreparedDataset:
    """A prepared audio dataset of `kind` (timit or blizzard: 16 kHz, frames of 200 samples,
    sequences of 40 frames, one "stream" train split) holding `sequences` sequences, written as
    write_samples does (rng None: a sparse file). Returns it opened, memory-mapped."""
    framing = Framing()  # TIMIT's and Blizzard's
    samples = framing.stream_range(0, sequences)[1]
    folder.mkdir(parents=True)
    files = {"samples": "train.samples.npy", "offsets": "train.offsets.npy"}
    write_samples(folder / files["samples"], samples, rng)
    np.save(folder / files["offsets"], np.asarray([0, samples], dtype=np.int64))
    audio = {
        "sample_rate": framing.sample_rate, "frame_size": framing.frame_size, "sequence_frames": framing.sequence_frames,
        "mean": 0.0, "std": SYNTHETIC_STD, "layout": {"train": "stream"}, "seconds": {"train": samples / framing.sample_rate},
        "skipped_files": 0,
    }
    meta = DatasetMeta(kind=kind, protocol=f"synthetic-{kind}", modality="frames", sequence_length=framing.sequence_frames,
                       counts={"train": sequences}, files={"train": files}, source="synthetic", audio=audio)
    write_json(folder / META_FILE, asdict(meta))
    return open_dataset(folder)


def write_synthetic_text(folder: Path, sequences: int, rng: np.random.Generator) -> PreparedDataset:
    """A prepared text dataset of IMDB's shape: a vocabulary of 16,000 words and the four
    specials, `sequences` sentences of the longest kept length (15 words, 16 steps with </s>),
    random word ids; one train split."""
    protocol = IMDB_PROTOCOL
    vocabulary = [*SPECIALS, *(f"word{index}" for index in range(protocol.vocabulary_size))]
    folder.mkdir(parents=True)
    files = {"tokens": "train.tokens.npy", "offsets": "train.offsets.npy"}
    tokens = rng.integers(len(SPECIALS), len(vocabulary), sequences * protocol.max_tokens).astype(np.uint16)
    np.save(folder / files["tokens"], tokens)
    np.save(folder / files["offsets"], np.arange(0, len(tokens) + 1, protocol.max_tokens, dtype=np.int64))
    text = {"vocabulary": vocabulary, "min_tokens": protocol.min_tokens, "max_tokens": protocol.max_tokens}
    meta = DatasetMeta(kind="imdb", protocol="synthetic-imdb", modality="tokens", sequence_length=protocol.max_tokens + 1,
                       counts={"train": sequences}, files={"train": files}, source="synthetic", text=text)
    write_json(folder / META_FILE, asdict(meta))
    return open_dataset(folder)


def bench_dataset(preset: str, folder: Path) -> PreparedDataset:
    """The prepared dataset a preset is measured on, written under folder."""
    rng = np.random.default_rng(0)
    if preset == "mnist":
        return prepare("mnist", EMBEDDED, folder / "mnist")
    if preset == "imdb":
        return write_synthetic_text(folder / preset, SYNTHETIC_SEQUENCES, rng)
    return write_synthetic_audio(folder / preset, preset, SYNTHETIC_SEQUENCES, rng)
