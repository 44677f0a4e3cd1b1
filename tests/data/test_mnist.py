"""Binarized MNIST: reading Larochelle's .amat files, the embedded copy, and `prepare mnist`."""

from __future__ import annotations

import numpy as np
import pytest

from zforcing_cli.data import EMBEDDED, open_dataset, prepare
from zforcing_cli.data.mnist import read_amat_folder
from zforcing_cli.errors import DataError, UsageError, ZForcingError

AMAT_FILES = ("binarized_mnist_train.amat", "binarized_mnist_valid.amat", "binarized_mnist_test.amat")


def leftovers(parent, name):
    """Entries beside an output folder that a failed or finished write may have left."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


# -- parsing ---------------------------------------------------------------------------------------


def test_amat_round_trip_preserves_every_pixel(amat_folder, tmp_path):
    folder, pixels = amat_folder
    dataset = prepare("mnist", str(folder), tmp_path / "out")
    assert dataset.meta.counts == {"train": 24, "valid": 8, "test": 8}
    assert dataset.meta.sequence_length == 784 and dataset.meta.modality == "binary"
    for split, expected in pixels.items():
        stored = dataset.split(split).arrays["pixels"]
        assert stored.shape == (len(expected), 98)  # bit-packed: 784 / 8 bytes a row
        assert stored.dtype == np.uint8
        targets, mask, _ = dataset.split(split).batch(np.arange(len(expected)))
        assert targets.shape == (len(expected), 784)
        assert targets.dtype.is_floating_point
        np.testing.assert_array_equal(targets.numpy(), expected.astype(np.float32))
        assert mask.shape == targets.shape and bool((mask == 1).all())


def test_batch_returns_the_rows_asked_for_in_order(amat_folder, tmp_path):
    folder, pixels = amat_folder
    split = prepare("mnist", str(folder), tmp_path / "out").split("train")
    indices = np.array([17, 3, 3, 0])
    targets, *_ = split.batch(indices)
    np.testing.assert_array_equal(targets.numpy(), pixels["train"][indices].astype(np.float32))


def test_amat_reader_tolerates_crlf_and_blank_lines(tmp_path, make_amat):
    pixels = make_amat(tmp_path / "src", counts={"train": 3, "valid": 2, "test": 2})
    path = tmp_path / "src" / "binarized_mnist_train.amat"
    lines = path.read_text().splitlines()
    path.write_bytes(("\r\n".join(lines) + "\r\n\r\n").encode())
    packed = read_amat_folder(tmp_path / "src")
    np.testing.assert_array_equal(np.unpackbits(packed["train"], axis=1, count=784), pixels["train"])


# -- the embedded copy -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    return open_dataset(EMBEDDED)


def test_embedded_dataset_has_the_standard_split(embedded):
    assert embedded.meta.counts == {"train": 50000, "valid": 10000, "test": 10000}
    assert {name: len(embedded.split(name)) for name in ("train", "valid", "test")} == embedded.meta.counts
    assert embedded.location == EMBEDDED
    targets, mask, _ = embedded.split("test").batch(np.arange(16))
    assert targets.shape == (16, 784)
    assert set(np.unique(targets.numpy())) == {0.0, 1.0}
    # Binarized digits: mostly background, a real share of ink (not noise, not all zeros).
    assert 0.05 < float(targets.mean()) < 0.3
    assert bool((mask == 1).all())


def test_prepare_embedded_writes_a_folder_that_opens_identically(embedded, tmp_path):
    out = tmp_path / "mnist"
    prepared = prepare("mnist", EMBEDDED, out)
    reopened = open_dataset(out)
    for dataset in (prepared, reopened):
        assert dataset.meta.counts == embedded.meta.counts
        assert dataset.meta.kind == "mnist" and dataset.meta.protocol == embedded.meta.protocol
        for split in ("train", "valid", "test"):
            assert np.array_equal(np.asarray(dataset.split(split).arrays["pixels"]), embedded.split(split).arrays["pixels"])
    indices = np.array([0, 49999, 1234])
    assert np.array_equal(reopened.split("train").batch(indices)[0].numpy(), embedded.split("train").batch(indices)[0].numpy())
    assert leftovers(tmp_path, "mnist") == []


# -- errors ----------------------------------------------------------------------------------------


def ragged(folder):
    path = folder / "binarized_mnist_valid.amat"
    lines = path.read_text().splitlines()
    lines[4] = " ".join(lines[4].split()[:783])
    path.write_text("\n".join(lines) + "\n")


def bad_value(value):
    def corrupt(folder):
        path = folder / "binarized_mnist_test.amat"
        lines = path.read_text().splitlines()
        values = lines[2].split()
        values[100] = value
        lines[2] = " ".join(values)
        path.write_text("\n".join(lines) + "\n")

    return corrupt


def empty_file(folder):
    (folder / "binarized_mnist_train.amat").write_text("")


def missing_test_file(folder):
    (folder / "binarized_mnist_test.amat").unlink()


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (ragged, ["binarized_mnist_valid.amat", "line 5", "783 values"]),
        (bad_value("2"), ["binarized_mnist_test.amat", "line 3", "'2'", "not 0 or 1"]),
        (bad_value("0.5"), ["binarized_mnist_test.amat", "line 3", "'0.5'", "not 0 or 1"]),
        (bad_value("1.0"), ["'1.0'", "not 0 or 1"]),
        (empty_file, ["binarized_mnist_train.amat", "empty"]),
        (missing_test_file, ["lacks", "binarized_mnist_test.amat"]),
    ],
    ids=["ragged-row", "value-2", "value-0.5", "value-1.0", "empty-file", "missing-file"],
)
def test_bad_amat_folders_raise_a_clear_data_error_and_write_nothing(amat_folder, tmp_path, corrupt, expected):
    folder, _ = amat_folder
    corrupt(folder)
    out = tmp_path / "prepared" / "mnist"
    with pytest.raises(DataError) as caught:
        prepare("mnist", str(folder), out)
    for fragment in expected:
        assert fragment in caught.value.message
    assert caught.value.hint
    assert not out.exists()
    assert not out.parent.exists() or leftovers(out.parent, "mnist") == []


def test_missing_source_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist") as caught:
        prepare("mnist", str(tmp_path / "nowhere"), tmp_path / "out")
    assert "binarized_mnist_train.amat" in caught.value.hint
    assert not (tmp_path / "out").exists()


def test_a_file_instead_of_a_folder(amat_folder, tmp_path):
    folder, _ = amat_folder
    with pytest.raises(DataError, match="is a file, not a folder"):
        prepare("mnist", str(folder / "binarized_mnist_train.amat"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_without_amat_files(tmp_path):
    source = tmp_path / "pictures"
    source.mkdir()
    (source / "train-images-idx3-ubyte").write_bytes(b"\x00" * 16)
    with pytest.raises(DataError) as caught:
        prepare("mnist", str(source), tmp_path / "out")
    for name in ("binarized_mnist_train.amat", "binarized_mnist_valid.amat", "binarized_mnist_test.amat"):
        assert name in caught.value.message
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_no_output_and_no_temporary_folder(amat_folder, tmp_path, monkeypatch):
    import zforcing_cli.data.prepared as prepared_module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prepared_module, "write_json", fail)  # after the arrays are written
    folder, _ = amat_folder
    with pytest.raises(OSError, match="disk full"):
        prepare("mnist", str(folder), tmp_path / "mnist")
    assert not (tmp_path / "mnist").exists()
    assert leftovers(tmp_path, "mnist") == []


def test_existing_output_without_force_is_refused_and_untouched(amat_folder, tmp_path):
    folder, _ = amat_folder
    out = tmp_path / "mnist"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ZForcingError, match="already exists") as caught:
        prepare("mnist", str(folder), out)
    assert "--force" in caught.value.hint
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    assert leftovers(tmp_path, "mnist") == []


def test_existing_output_with_force_is_replaced(amat_folder, tmp_path):
    folder, pixels = amat_folder
    out = tmp_path / "mnist"
    prepare("mnist", EMBEDDED, out)
    dataset = prepare("mnist", str(folder), out, force=True)
    assert (out / "meta.json").is_file()
    assert dataset.meta.counts["train"] == 24
    np.testing.assert_array_equal(open_dataset(out).split("valid").batch(np.arange(8))[0].numpy(), pixels["valid"])
    assert leftovers(tmp_path, "mnist") == []


def test_failed_prepare_with_force_keeps_the_old_folder(amat_folder, tmp_path):
    folder, _ = amat_folder
    out = tmp_path / "mnist"
    prepare("mnist", str(folder), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    empty_file(folder)
    with pytest.raises(DataError):
        prepare("mnist", str(folder), out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before



def test_unknown_kind(tmp_path):
    with pytest.raises(UsageError, match="Unknown data kind 'cifar'") as caught:
        prepare("cifar", str(tmp_path), tmp_path / "out")
    assert "mnist" in caught.value.hint
