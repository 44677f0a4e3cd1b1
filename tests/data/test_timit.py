"""TIMIT by SRNN's protocol: finding utterances in LDC trees of any case, the seeded validation
split, framing with a one-frame shift, normalisation, whole test utterances, and clean errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from zforcing_cli.data import open_dataset, prepare, timit
from zforcing_cli.errors import DataError, ZForcingError

from conftest import assert_clean_error, invoke, plain, write_timit_tree

FRAME, STEPS = 200, 40


def expected_valid_ids(train_ids: list[str]) -> list[str]:
    """The protocol: max(1, int(n * 0.05)) ids drawn by a seeded permutation of the sorted ids."""
    ordered = sorted(train_ids)
    count = max(1, int(len(ordered) * 0.05))
    return sorted(ordered[i] for i in np.random.default_rng(seed=1234).permutation(len(ordered))[:count])


def split_ids(written: dict[str, np.ndarray]) -> tuple[list[str], list[str], list[str]]:
    train = sorted(name for name in written if name.startswith("train/"))
    valid = expected_valid_ids(train)
    test = sorted(name for name in written if name.startswith("test/"))
    return [name for name in train if name not in valid], valid, test


def normalised(samples: np.ndarray, meta) -> np.ndarray:
    return ((samples.astype(np.float32) / 32768 - np.float32(meta.audio["mean"])) / np.float32(meta.audio["std"]))


def leftovers(parent, name):
    return sorted(path.name for path in parent.iterdir() if path.name.startswith(name) or path.name.startswith(f".{name}"))


# -- the protocol ----------------------------------------------------------------------------------


def test_meta_counts_and_valid_list(timit_tree, timit_data):
    _, written = timit_tree
    train, valid, test = split_ids(written)
    dataset = open_dataset(timit_data)
    meta = dataset.meta
    assert (meta.kind, meta.protocol, meta.modality, meta.sequence_length) == ("timit", "timit-srnn", "frames", STEPS)
    assert meta.input_size == FRAME
    assert meta.audio["sample_rate"] == 16000 and meta.audio["frame_size"] == FRAME
    assert meta.audio["layout"] == {"train": "stream", "valid": "stream", "test": "utterances"}
    assert (timit_data / "valid_files.txt").read_text().splitlines() == valid
    assert len(valid) == 1  # max(1, int(12 * 0.05))
    train_frames = sum(len(written[name]) for name in train) // FRAME
    assert meta.counts == {"train": (train_frames - 1) // STEPS, "valid": 1, "test": len(test)}
    for split in ("train", "valid", "test"):
        assert len(dataset.split(split)) == meta.counts[split]
        assert meta.audio["seconds"][split] == pytest.approx(len(dataset.split(split).arrays["samples"]) / 16000)


def test_full_corpus_split_sizes():
    ids = sorted(f"train/dr1/spk{i // 10}/u{i % 10}" for i in range(4620))  # as find_utterances gives them
    kept, held_out = timit.hold_out_valid([timit.Utterance(name, None) for name in ids])
    assert (len(kept), len(held_out)) == (4620 - 231, 231)
    assert [u.id for u in held_out] == expected_valid_ids(ids)


def test_partial_copy_warning(timit_tree, tmp_path):
    dataset = prepare("timit", str(timit_tree[0]), tmp_path / "out")
    (warning,) = dataset.warnings
    assert "12 train and 6 test" in warning and "4620" in warning and "partial copy?" in warning
    assert timit.partial_copy_warnings(4620, 1680) == []


def test_train_stream_is_the_files_in_order_with_a_one_frame_shift(timit_tree, timit_data):
    _, written = timit_tree
    train, _, _ = split_ids(written)
    dataset = open_dataset(timit_data)
    split = dataset.split("train")
    stream = np.concatenate([written[name] for name in train])  # the test's own reference, tiny
    samples = np.asarray(split.arrays["samples"])
    assert len(samples) % FRAME == 0 and len(samples) == (len(split) * STEPS + 1) * FRAME
    np.testing.assert_array_equal(samples, stream[: len(samples)])
    frames = normalised(stream[: len(samples)], dataset.meta).reshape(-1, FRAME)
    for index in range(len(split)):
        context, targets = split.sequence(index)
        assert context.dtype == np.float32 and targets.shape == (STEPS, FRAME)
        np.testing.assert_array_equal(context, frames[index * STEPS])
        np.testing.assert_array_equal(targets, frames[index * STEPS + 1:(index + 1) * STEPS + 1])
        if index:
            np.testing.assert_array_equal(context, split.sequence(index - 1)[1][-1])


def test_offsets_mark_where_files_start(timit_tree, timit_data):
    _, written = timit_tree
    train, _, _ = split_ids(written)
    offsets = open_dataset(timit_data).split("train").arrays["offsets"]
    starts = np.cumsum([0] + [len(written[name]) for name in train])
    assert offsets[0] == 0 and set(offsets[1:-1]) <= set(starts.tolist())


def test_normalisation_uses_the_train_split(timit_data):
    dataset = open_dataset(timit_data)
    train = dataset.split("train")
    values = train.normalise(train.arrays["samples"]).astype(np.float64)
    assert abs(values.mean()) < 1e-4 and values.std() == pytest.approx(1.0, abs=1e-4)
    valid = dataset.split("valid").normalise(dataset.split("valid").arrays["samples"])
    assert abs(valid.mean()) < 0.2 and 0.7 < valid.std() < 1.3  # the same statistics, not its own


def test_test_utterances_are_whole_with_t_minus_one_targets(timit_tree, timit_data):
    _, written = timit_tree
    _, _, test = split_ids(written)
    dataset = open_dataset(timit_data)
    split = dataset.split("test")
    assert len(split) == len(test)
    for index, name in enumerate(test):
        frames = len(written[name]) // FRAME
        context, targets = split.sequence(index)
        assert targets.shape == (frames - 1, FRAME)
        expected = normalised(written[name][: frames * FRAME], dataset.meta).reshape(frames, FRAME)
        np.testing.assert_array_equal(context, expected[0])
        np.testing.assert_array_equal(targets, expected[1:])
    with pytest.raises(IndexError):
        split.sequence(len(test))


# -- trees of every shape ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant", ["lower", "riff-beside-sphere", "riff-only", "nested"],
)
def test_every_layout_gives_the_same_dataset(variant, timit_data, tmp_path):
    root = tmp_path / "copy"
    if variant == "nested":  # a TIMIT/ folder on top, as on the LDC disc
        write_timit_tree(root / "TIMIT")
    else:
        write_timit_tree(root, lower=variant == "lower", sphere=variant != "riff-only", riff_copies=variant != "lower")
    dataset = prepare("timit", str(root), tmp_path / "out")
    reference = open_dataset(timit_data)
    assert dataset.meta.counts == reference.meta.counts  # every utterance counted once
    assert dataset.meta.fingerprint == reference.meta.fingerprint  # the SPHERE files were read
    assert (tmp_path / "out" / "valid_files.txt").read_text() == (timit_data / "valid_files.txt").read_text()


def test_split_does_not_depend_on_the_file_system_order(timit_tree, timit_data, tmp_path, monkeypatch):
    walk = timit.list_files
    monkeypatch.setattr(timit, "list_files", lambda folder: walk(folder)[::-1])
    dataset = prepare("timit", str(timit_tree[0]), tmp_path / "out")
    assert (tmp_path / "out" / "valid_files.txt").read_text() == (timit_data / "valid_files.txt").read_text()
    assert dataset.meta.fingerprint == open_dataset(timit_data).meta.fingerprint


def test_force_replaces_a_prepared_dataset_only(timit_tree, tmp_path):
    out = tmp_path / "out"
    prepare("timit", str(timit_tree[0]), out)
    prepare("timit", str(timit_tree[0]), out, force=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ZForcingError, match="not a prepared dataset"):
        prepare("timit", str(timit_tree[0]), mine, force=True)
    assert (mine / "notes.txt").read_text() == "keep" and len(list(mine.iterdir())) == 1


# -- errors ----------------------------------------------------------------------------------------


def fake_shorten_sphere(path):
    header = b"NIST_1A\n   1024\nsample_count -i 16000\nsample_rate -i 16000\nchannel_count -i 1\n" \
             b"sample_coding -s26 pcm,embedded-shorten-v2.00\nend_head\n"
    path.write_bytes(header.ljust(1024, b" ") + bytes(range(256)) * 8)


def damage(tree, case):
    """Break a fresh copy of the tiny tree; returns the path the error must name."""
    some_file = tree / "TRAIN" / "DR1" / "FSPK10" / "SA1.WAV"
    if case == "missing-root":
        shutil.rmtree(tree)
        return tree
    if case == "root-is-a-file":
        shutil.rmtree(tree)
        tree.write_text("not a folder")
        return tree
    if case == "not-timit":
        shutil.rmtree(tree)
        (tree / "music").mkdir(parents=True)
        return tree
    if case == "missing-test":
        shutil.rmtree(tree / "TEST")
        return tree
    if case == "8khz":
        import soundfile

        soundfile.write(some_file, np.ones(8000, dtype=np.int16), 8000, format="NIST", subtype="PCM_16")
    elif case == "shorten":
        fake_shorten_sphere(some_file)
    elif case == "garbage":
        some_file.write_bytes(b"\x13\x37 this is not audio " * 50)
    return some_file


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing-root", "does not exist"),
        ("root-is-a-file", "is a file"),
        ("not-timit", "is not a TIMIT tree"),
        ("missing-test", "no TEST folder"),
        ("8khz", "8000 Hz"),
        ("shorten", "shorten"),
        ("garbage", "Cannot read"),
    ],
)
def test_errors_name_the_culprit_and_leave_nothing(case, fragment, timit_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(timit_tree[0], tree)
    culprit = damage(tree, case)
    with pytest.raises(DataError, match=fragment) as caught:
        prepare("timit", str(tree), tmp_path / "outputs" / "timit")
    assert str(culprit) in caught.value.message
    assert caught.value.hint
    if case == "shorten":
        assert "sph2pipe -f wav" in caught.value.hint
    assert not (tmp_path / "outputs").exists()


# -- the command line --------------------------------------------------------------------------------


def test_cli_prints_counts_hours_and_the_warning(cwd, timit_tree):
    result = invoke("prepare", "timit", timit_tree[0], "--out", "d")
    assert result.exit_code == 0, plain(result.output)
    meta = json.loads((cwd / "d" / "meta.json").read_text())
    out = plain(result.stdout)
    assert f"train {meta['counts']['train']} (" in out and f"test {meta['counts']['test']} (" in out
    assert f"({meta['audio']['seconds']['test']:.1f} s)" in out
    assert "partial copy?" in plain(result.stderr) and "partial copy?" not in out


@pytest.mark.parametrize("option", [["--split", "80,10,10"], ["--frame-size", "160"]])
def test_cli_wav_options_on_timit_are_usage_errors(cwd, timit_tree, option):
    assert_clean_error(invoke("prepare", "timit", timit_tree[0], *option, "--out", "d"), 2, option[0], "only")
    assert not (cwd / "d").exists()


def test_cli_shorten_is_a_clean_error(cwd, timit_tree):
    tree = cwd / "tree"
    shutil.copytree(timit_tree[0], tree)
    fake_shorten_sphere(tree / "TEST" / "DR2" / "FSPK20" / "SX37.WAV")
    line = assert_clean_error(invoke("prepare", "timit", tree, "--out", "d"), 1, "SX37.WAV", "shorten")
    assert "Traceback" not in line
    assert leftovers(cwd, "d") == []
