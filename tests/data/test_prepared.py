"""The prepared-dataset format: meta.json plus memory-mapped arrays, and its errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from zforcing_cli.data import DatasetMeta, open_dataset
from zforcing_cli.data.prepared import FORMAT_VERSION, open_prepared, write_prepared
from zforcing_cli.errors import DataError


@pytest.fixture
def copy_of_tiny(tiny_data, tmp_path):
    """A private copy of the tiny prepared dataset, free to damage."""
    return shutil.copytree(tiny_data, tmp_path / "mnist")


def test_meta_json_records_the_format(tiny_data):
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert meta["kind"] == "mnist"
    assert meta["modality"] == "binary"
    assert meta["sequence_length"] == 784
    assert meta["counts"] == {"train": 24, "valid": 8, "test": 8}
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["image_shape"] == [28, 28]
    for split in ("train", "valid", "test"):
        assert (tiny_data / meta["files"][split]["pixels"]).is_file()


def test_arrays_are_memory_mapped(tiny_dataset):
    assert isinstance(tiny_dataset.split("train").arrays["pixels"], np.memmap)


def test_write_prepared_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    pixels = (rng.random((5, 784)) < 0.5).astype(np.uint8)
    meta = DatasetMeta(kind="mnist", protocol="test", modality="binary", sequence_length=784,
                       counts={"train": 5}, image_shape=[28, 28])
    write_prepared(tmp_path / "ds", meta, {"train": {"pixels": np.packbits(pixels, axis=1)}})
    dataset = open_prepared(tmp_path / "ds")
    assert dataset.meta.counts == {"train": 5}
    targets, mask, _ = dataset.split("train").batch(np.arange(5))
    np.testing.assert_array_equal(targets.numpy(), pixels)
    assert bool((mask == 1).all())
    with pytest.raises(DataError, match="no 'test' split"):
        dataset.split("test")


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="No prepared dataset") as caught:
        open_prepared(tmp_path / "nowhere")
    assert "zforcing prepare" in caught.value.hint


def test_open_dataset_on_a_missing_folder(tmp_path):
    with pytest.raises(DataError, match="No prepared dataset"):
        open_dataset(str(tmp_path / "nowhere"))


def test_folder_without_meta_json(copy_of_tiny):
    (copy_of_tiny / "meta.json").unlink()
    with pytest.raises(DataError, match="not a prepared dataset") as caught:
        open_prepared(copy_of_tiny)
    assert "meta.json" in caught.value.message


@pytest.mark.parametrize(
    "content",
    ['{"kind": "mnist", "protocol": ', "\x00\x01garbage", "{}", '{"kind": "mnist"}', "[]", "null"],
    ids=["truncated", "binary", "empty-object", "missing-fields", "list", "null"],
)
def test_corrupted_meta_json(copy_of_tiny, content):
    (copy_of_tiny / "meta.json").write_text(content)
    with pytest.raises(DataError, match="corrupted") as caught:
        open_prepared(copy_of_tiny)
    assert "meta.json" in caught.value.message
    assert "--force" in caught.value.hint


def test_newer_format_is_refused(copy_of_tiny):
    meta = json.loads((copy_of_tiny / "meta.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (copy_of_tiny / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="newer zforcing"):
        open_prepared(copy_of_tiny)


def test_missing_array_file(copy_of_tiny):
    (copy_of_tiny / "valid.pixels.npy").unlink()
    with pytest.raises(DataError, match="incomplete or corrupted") as caught:
        open_prepared(copy_of_tiny)
    assert "valid" in caught.value.message


def test_truncated_array_file(copy_of_tiny):
    path = copy_of_tiny / "train.pixels.npy"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="incomplete or corrupted"):
        open_prepared(copy_of_tiny)


@pytest.mark.parametrize("data, split", [("tiny_data", "train"), ("text_data", "train"), ("timit_data", "train"),
                                         ("timit_data", "test")], ids=["pixels", "tokens", "audio-stream", "audio-utterances"])
def test_steps_tells_a_batch_s_length_without_reading_it(request, data, split):
    """What a rank needs to draw a whole batch's noise while it reads only its share."""
    prepared = open_dataset(request.getfixturevalue(data)).split(split)
    rng = np.random.default_rng(0)
    for size in (1, 3, len(prepared)):
        indices = rng.permutation(len(prepared))[:size]
        assert prepared.steps(indices) == prepared.batch(indices).targets.shape[1]
