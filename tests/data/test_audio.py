"""Folders of audio (`prepare blizzard`, `prepare wav`): decoding any format and rate to 16 kHz
mono, 40x200 sequences with a one-frame shift, the in-order 90/5/5 split, skipped files, errors,
and a writer that streams file by file."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import soundfile
import soxr

from zforcing_cli.data import open_dataset, prepare
from zforcing_cli.data.audio import default_frame_size, split_counts
from zforcing_cli.errors import DataError, UsageError

from conftest import assert_clean_error, invoke, plain, random_speech

FRAME, STEPS = 200, 40


def can_write_mp3() -> bool:
    return "MP3" in soundfile.available_formats() and "MPEG_LAYER_III" in soundfile.available_subtypes("MP3")


def write_corpus(folder, with_mp3: bool = True) -> list:
    """Three files of other rates and formats, named so that sorting by path puts them in the
    order written; returns the paths in that order."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    stereo = np.stack([random_speech(3.0, rng, 22050), random_speech(3.0, rng, 22050)], axis=1)
    paths = [folder / "a_chapter.wav", folder / "b" / "chapter.flac"]
    soundfile.write(paths[0], stereo, 22050, subtype="PCM_16")
    paths[1].parent.mkdir()
    soundfile.write(paths[1], random_speech(2.5, rng, 44100), 44100)
    if with_mp3:
        paths.append(folder / "c_chapter.mp3")
        soundfile.write(paths[2], random_speech(2.0, rng, 16000).astype(np.float32) / 32768, 16000, format="MP3")
    return paths


def reference_stream(paths, rate: int = 16000) -> np.ndarray:
    """What the pipeline should produce: each file decoded, averaged to mono, resampled with
    soxr, as int16, one after another (tiny, so the test may concatenate)."""
    pieces = []
    for path in paths:
        data, source_rate = soundfile.read(path, dtype="float32", always_2d=True)
        mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
        if source_rate != rate:
            mono = soxr.resample(mono, source_rate, rate)
        pieces.append(np.clip(np.rint(mono * 32768), -32768, 32767).astype(np.int16))
    return np.concatenate(pieces)


@pytest.fixture(scope="module")
def blizzard(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blizzard") / "raw"
    paths = write_corpus(folder, with_mp3=can_write_mp3())
    calls = []
    dataset = prepare("blizzard", str(folder), tmp_path_factory.mktemp("prepared") / "blizzard",
                      progress=lambda *args: calls.append(args))
    return dataset, reference_stream(paths), paths, calls


def test_blizzard_meta_and_counts(blizzard):
    dataset, stream, paths, _ = blizzard
    meta = dataset.meta
    assert (meta.kind, meta.protocol, meta.modality) == ("blizzard", "blizzard-16k-0.5s-90-5-5", "frames")
    assert meta.audio["sample_rate"] == 16000 and meta.audio["sequence_frames"] == STEPS
    assert meta.audio["layout"] == dict.fromkeys(("train", "valid", "test"), "stream")
    sequences = (len(stream) // FRAME - 1) // STEPS
    assert meta.counts == split_counts(sequences, (90, 5, 5))
    assert sum(meta.counts.values()) == sequences and min(meta.counts.values()) >= 1
    seconds = 3.0 + 2.5 + (2.0 if len(paths) == 3 else 0)
    assert len(stream) == pytest.approx(seconds * 16000, abs=2000)  # resampled to 16 kHz (mp3 adds padding)


def test_blizzard_splits_are_consecutive_ranges_of_the_stream(blizzard):
    dataset, stream, _, _ = blizzard
    first = 0
    for name in ("train", "valid", "test"):
        split = dataset.split(name)
        start = first * STEPS * FRAME
        samples = np.asarray(split.arrays["samples"])
        assert len(samples) == (len(split) * STEPS + 1) * FRAME
        np.testing.assert_array_equal(samples, stream[start:start + len(samples)])
        first += len(split)


def test_blizzard_targets_are_the_sequence_shifted_by_one_frame(blizzard):
    dataset, stream, _, _ = blizzard
    train = dataset.split("train")
    frames = train.normalise(stream[: len(stream) // FRAME * FRAME]).reshape(-1, FRAME)
    for index in range(len(train)):
        context, targets = train.sequence(index)
        np.testing.assert_array_equal(context, frames[index * STEPS])
        np.testing.assert_array_equal(targets, frames[index * STEPS + 1:(index + 1) * STEPS + 1])
    # valid continues the stream: its first context is train's last target frame
    np.testing.assert_array_equal(dataset.split("valid").sequence(0)[0], train.sequence(len(train) - 1)[1][-1])
    np.testing.assert_array_equal(dataset.split("test").sequence(0)[0], dataset.split("valid").sequence(len(dataset.split("valid")) - 1)[1][-1])


def test_blizzard_normalisation_is_the_train_split(blizzard):
    train = blizzard[0].split("train")
    values = train.normalise(train.arrays["samples"]).astype(np.float64)
    assert abs(values.mean()) < 1e-4 and values.std() == pytest.approx(1.0, abs=1e-4)


def test_progress_is_reported_per_file(blizzard):
    _, stream, paths, calls = blizzard
    assert [call[:2] for call in calls] == [(done, len(paths)) for done in range(len(paths) + 1)]
    assert calls[-1][2] == pytest.approx(len(stream) / 16000)


def test_offsets_mark_where_each_file_starts(blizzard):
    dataset, _, paths, _ = blizzard
    if paths[-1].suffix != ".mp3":
        pytest.skip("this libsndfile cannot write MP3")
    starts = np.cumsum([len(reference_stream([path])) for path in paths])[:-1]  # where b and c start
    train = dataset.split("train")
    inside = [int(start) for start in starts if start < len(train.arrays["samples"])]
    assert inside and list(train.arrays["offsets"]) == [0, *inside, len(train.arrays["samples"])]


# -- wav: the user's own audio -------------------------------------------------------------------------


def test_wav_with_custom_framing_and_split(tmp_path):
    paths = write_corpus(tmp_path / "raw", with_mp3=False)
    dataset = prepare("wav", str(tmp_path / "raw"), tmp_path / "out", sample_rate=8000, frame_size=100,
                      sequence_length=10, split="80,10,10")
    stream = reference_stream(paths, rate=8000)
    sequences = (len(stream) // 100 - 1) // 10
    assert dataset.meta.protocol == "wav-8000-100x10" and dataset.meta.input_size == 100
    assert dataset.meta.counts == split_counts(sequences, (80, 10, 10))
    assert dataset.meta.counts["valid"] == int(sequences * 0.1)
    context, targets = dataset.split("test").sequence(0)
    assert context.shape == (100,) and targets.shape == (10, 100)


def test_silent_and_short_files_are_skipped_and_counted(tmp_path):
    raw = tmp_path / "raw"
    write_corpus(raw, with_mp3=False)
    soundfile.write(raw / "d_silence.wav", np.zeros(16000, dtype=np.int16), 16000)
    soundfile.write(raw / "e_short.wav", random_speech(0.3, np.random.default_rng(0)), 16000)
    dataset = prepare("wav", str(raw), tmp_path / "out")
    assert dataset.meta.audio["skipped_files"] == 2
    (warning,) = dataset.warnings
    assert "Skipped 2 of 4" in warning and "1 silent" in warning and "e_short.wav" in warning
    reference = prepare("wav", str(tmp_path / "raw"), tmp_path / "again", frame_size=200)  # options as defaults
    assert reference.meta.fingerprint == dataset.meta.fingerprint


def test_thirty_files_stream_through_bounded_memory(tmp_path):
    """30 files of 12 s: the corpus is 11.5 MB of int16; preparing must never hold more than about
    one file and one copy chunk in memory, far less than the corpus."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(5)
    for index in range(30):
        soundfile.write(raw / f"{index:02d}.wav", random_speech(12.0, rng), 16000, subtype="PCM_16")
    calls = []
    tracemalloc.start()
    try:
        dataset = prepare("wav", str(raw), tmp_path / "out", progress=lambda *args: calls.append(args))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    corpus_bytes = 30 * 12 * 16000 * 2
    assert peak < corpus_bytes / 2, f"peak {peak / 1e6:.1f} MB for a {corpus_bytes / 1e6:.1f} MB corpus"
    assert [call[0] for call in calls] == list(range(31))
    assert len(dataset.split("train").arrays["offsets"]) > 25  # where each file starts, and the end


# -- errors ----------------------------------------------------------------------------------------


def test_no_audio_lists_the_extensions(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("no audio here")
    with pytest.raises(DataError, match="No audio files") as caught:
        prepare("blizzard", str(tmp_path / "raw"), tmp_path / "out")
    assert ".wav" in caught.value.message and ".flac" in caught.value.message and ".mp3" in caught.value.message
    assert not (tmp_path / "out").exists()


def test_strict_stops_at_an_unreadable_file_and_leaves_nothing(tmp_path):
    raw = tmp_path / "raw"
    write_corpus(raw, with_mp3=False)
    (raw / "b" / "broken.flac").write_bytes(b"fLaC but not really" * 30)
    with pytest.raises(DataError, match="Cannot read") as caught:
        prepare("blizzard", str(raw), tmp_path / "outputs" / "blizzard", strict=True)
    assert str(raw / "b" / "broken.flac") in caught.value.message and "--strict" in caught.value.hint
    assert not (tmp_path / "outputs").exists()


def test_unreadable_files_are_skipped_and_all_listed(tmp_path):
    raw = tmp_path / "raw"
    write_corpus(raw, with_mp3=False)
    (raw / "b" / "broken.flac").write_bytes(b"fLaC but not really" * 30)
    (raw / "c_empty.wav").write_bytes(b"")
    dataset = prepare("blizzard", str(raw), tmp_path / "out")
    assert dataset.meta.audio["skipped_files"] == 2
    (warning,) = dataset.warnings
    lines = warning.splitlines()
    assert lines[0].startswith("Skipped 2 unreadable audio file(s) of 4") and "--strict" in lines[0]
    assert [line.split(": ")[0].strip() for line in lines[1:]] == [str(raw / "b" / "broken.flac"), str(raw / "c_empty.wav")]


def test_a_folder_where_nothing_can_be_read_is_an_error(tmp_path):
    (tmp_path / "raw").mkdir()
    for name in ("a.wav", "b.flac"):
        (tmp_path / "raw" / name).write_bytes(b"not audio" * 10)
    with pytest.raises(DataError, match="None of the 2 audio files") as caught:
        prepare("wav", str(tmp_path / "raw"), tmp_path / "out")
    assert "a.wav" in caught.value.message and "b.flac" in caught.value.message
    assert not (tmp_path / "out").exists()


def test_too_little_audio(tmp_path):
    (tmp_path / "raw").mkdir()
    soundfile.write(tmp_path / "raw" / "a.wav", random_speech(0.6, np.random.default_rng(0)), 16000)
    with pytest.raises(DataError, match="too little usable audio"):
        prepare("wav", str(tmp_path / "raw"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_too_little_audio_counts_what_was_read_and_names_what_was_dropped(tmp_path):
    """Sequences longer than every file: the audio was read, all of it dropped as too short."""
    (tmp_path / "raw").mkdir()
    for index in range(3):
        soundfile.write(tmp_path / "raw" / f"{index}.wav", random_speech(2.0, np.random.default_rng(index)), 16000)
    with pytest.raises(DataError) as caught:
        prepare("wav", str(tmp_path / "raw"), tmp_path / "out", sequence_length=100_000)
    assert "0.0 s usable of 6.0 s read; dropped: 3 file(s) shorter than one sequence (6.0 s)" in caught.value.message
    assert "--sequence-length" in caught.value.hint


def write_8khz_prompts(folder, seconds=(0.6, 0.7, 0.8, 2.0, 2.5, 3.0)) -> None:
    """Telephone prompts: 8 kHz, some shorter than a 41-frame sequence at that rate (1.025 s)."""
    folder.mkdir()
    for index, length in enumerate(seconds):
        soundfile.write(folder / f"{index}.wav", random_speech(length, np.random.default_rng(index), 8000), 8000)


def test_upsampling_is_a_warning_that_names_the_files_own_rate(tmp_path):
    write_8khz_prompts(tmp_path / "raw")
    dataset = prepare("wav", str(tmp_path / "raw"), tmp_path / "out")
    (upsampled,) = [warning for warning in dataset.warnings if "upsampled" in warning]
    assert "8000 Hz" in upsampled and "--sample-rate 8000" in upsampled and "2×" in upsampled
    native = prepare("wav", str(tmp_path / "raw"), tmp_path / "native", sample_rate=8000, sequence_length=20)
    assert not [warning for warning in native.warnings if "upsampled" in warning]


def test_files_shorter_than_a_sequence_come_with_the_length_that_keeps_them(tmp_path):
    write_8khz_prompts(tmp_path / "raw")
    dataset = prepare("wav", str(tmp_path / "raw"), tmp_path / "out", sample_rate=8000, frame_size=200)
    (skipped,) = [warning for warning in dataset.warnings if warning.startswith("Skipped")]
    assert "Skipped 3 of 6 audio files: 3 shorter than one sequence of 1.025 s" in skipped
    assert "--sequence-length 27 (0.7 s) keeps 2 of these 3" in skipped and "--frame-size" in skipped
    kept = prepare("wav", str(tmp_path / "raw"), tmp_path / "kept", sample_rate=8000, frame_size=200, sequence_length=27)
    assert kept.meta.audio["skipped_files"] == 1


@pytest.mark.parametrize(
    "options, fragment",
    [({"split": "90,10"}, "--split"), ({"split": "a,b,c"}, "--split"), ({"split": "90,10,0"}, "--split"),
     ({"frame_size": 0}, "--frame-size"), ({"sequence_length": -1}, "--sequence-length"),
     ({"sample_rate": 10**12}, "--sample-rate 1,000,000,000,000 Hz is outside 1,000 to 384,000 Hz"),
     ({"sample_rate": 999}, "--sample-rate 999 Hz is outside"),
     ({"sample_rate": 8000, "frame_size": 8001}, "--frame-size 8,001 is more than one second of audio at 8,000 Hz")],
)
def test_bad_wav_options_are_usage_errors(tmp_path, options, fragment):
    with pytest.raises(UsageError, match=fragment):
        prepare("wav", str(tmp_path), tmp_path / "out", **options)


def test_blizzard_takes_no_options(tmp_path):
    with pytest.raises(UsageError, match="--sample-rate applies only to `zforcing prepare wav`"):
        prepare("blizzard", str(tmp_path), tmp_path / "out", sample_rate=8000)


# -- the command line --------------------------------------------------------------------------------


def test_cli_prepare_wav(cwd):
    write_corpus(cwd / "raw", with_mp3=False)
    result = invoke("prepare", "wav", "raw", "--out", "d", "--sequence-length", "20", "--split", "80,10,10")
    assert result.exit_code == 0, plain(result.output)
    meta = json.loads((cwd / "d" / "meta.json").read_text())
    assert meta["protocol"] == "wav-16000-200x20" and open_dataset(cwd / "d").meta.counts == meta["counts"]
    assert f"valid {meta['counts']['valid']} (" in plain(result.stdout)


def test_cli_bad_split_is_a_usage_error(cwd):
    write_corpus(cwd / "raw", with_mp3=False)
    assert_clean_error(invoke("prepare", "wav", "raw", "--split", "50,50"), 2, "--split")


def test_cli_an_absurd_sample_rate_is_named_before_any_work(cwd, monkeypatch):
    write_corpus(cwd / "raw", with_mp3=False)
    monkeypatch.setattr("zforcing_cli.data.audio.find_audio_files", lambda folder: pytest.fail("read the folder"))
    line = assert_clean_error(invoke("prepare", "wav", "raw", "--sample-rate", "1000000000000"), 2, "--sample-rate 1,000,000,000,000 Hz")
    assert "memory" not in line and not (cwd / "data").exists()


def test_cli_skips_an_unreadable_file_unless_strict(cwd):
    write_corpus(cwd / "raw", with_mp3=False)
    (cwd / "raw" / "broken.wav").write_bytes(b"RIFF but not really" * 30)
    result = invoke("prepare", "wav", "raw", "--out", "d")
    assert result.exit_code == 0, plain(result.output)
    stderr = plain(result.stderr)
    assert "Warning: Skipped 1 unreadable audio file(s) of 3" in stderr and "  raw/broken.wav: " in stderr.replace(str(cwd) + "/", "")
    line = assert_clean_error(invoke("prepare", "wav", "raw", "--out", "e", "--strict"), 1, "Cannot read", "broken.wav")
    assert line and not (cwd / "e").exists()
    assert_clean_error(invoke("prepare", "mnist", "embedded", "--strict"), 2, "--strict applies only to")


def test_cli_prints_a_line_every_log_seconds_off_a_terminal(cwd, monkeypatch):
    from zforcing_cli.console import JobProgress

    monkeypatch.setattr(JobProgress, "LOG_SECONDS", 0.0)
    write_corpus(cwd / "raw", with_mp3=False)
    result = invoke("prepare", "wav", "raw", "--out", "d")
    assert result.exit_code == 0, plain(result.output)
    assert "Preparing wav: 100%, 2 of 2 files, 0.00 h of audio" in plain(result.stderr)


def test_a_frame_is_12_5_ms_by_default_at_any_rate(tmp_path):
    """The paper's 200 samples at 16 kHz; 100 at 8 kHz, unless --frame-size says otherwise."""
    write_8khz_prompts(tmp_path / "raw")
    assert [default_frame_size(rate) for rate in (8000, 16000, 22050, 1000)] == [100, 200, 276, 12]
    low = prepare("wav", str(tmp_path / "raw"), tmp_path / "low", sample_rate=8000)
    assert low.meta.audio["frame_size"] == 100 and low.meta.protocol == "wav-8000-100x40"
    given = prepare("wav", str(tmp_path / "raw"), tmp_path / "given", sample_rate=8000, frame_size=200, sequence_length=4)
    assert given.meta.audio["frame_size"] == 200
