"""Shared fixtures: tiny Larochelle-style `.amat` folders, tiny prepared datasets, tiny configs.

Everything here is sized for a 2-core CPU: a few dozen 784-pixel images and models with 8
hidden units. Nothing touches the network or the real working directory.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["ZFORCING_THREADS"] = "1"  # the CLI's thread policy: one thread, as set below

from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import re  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from zforcing_cli.cli import app  # noqa: E402

from zforcing_cli.data import open_dataset, prepare  # noqa: E402
from zforcing_cli.model import ZForcingConfig  # noqa: E402
from zforcing_cli.runconfig import RunConfig, TrainConfig, data_description  # noqa: E402

# Tiny 784-step sequences are dominated by per-op overhead; a second intra-op thread only adds
# contention (measured: up to 50x slower on a busy 2-core machine).
torch.set_num_threads(1)

PIXELS = 784
TINY_COUNTS = {"train": 24, "valid": 8, "test": 8}
AMAT_NAMES = {split: f"binarized_mnist_{split}.amat" for split in TINY_COUNTS}


def random_pixels(count: int, seed: int) -> np.ndarray:
    """(count, 784) uint8 array of 0/1 pixels, about 30% ones."""
    return (np.random.default_rng(seed).random((count, PIXELS)) < 0.3).astype(np.uint8)


def write_amat_file(path: Path, pixels: np.ndarray) -> None:
    path.write_text("".join(" ".join(str(int(v)) for v in row) + "\n" for row in pixels))


def write_amat_folder(folder: Path, counts: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Write binarized_mnist_{train,valid,test}.amat into folder; returns the pixels per split."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = {}
    for index, (split, count) in enumerate((counts or TINY_COUNTS).items()):
        pixels[split] = random_pixels(count, seed * 10 + index)
        write_amat_file(folder / AMAT_NAMES[split], pixels[split])
    return pixels


def prepared_mnist(root: Path, counts: dict[str, int], seed: int):
    """A prepared MNIST dataset under root from a fresh .amat folder of `counts` images."""
    write_amat_folder(root / "amat", counts, seed=seed)
    return prepare("mnist", str(root / "amat"), root / "prepared")


def tiny_run_config(dataset, **train_overrides) -> RunConfig:
    model = ZForcingConfig(
        modality="binary", input_size=2, start_index=2, embed_size=4, hidden_size=8, latent_size=4, mlp_size=8,
    )
    train = TrainConfig(batch_size=4, eval_batch_size=8, lr=1e-3, aux_weight=0.0025, bwd_weight=0.0025, log_every=1)
    return RunConfig(model, replace(train, **train_overrides), data_description(dataset))  # replace: typos raise


@pytest.fixture
def make_amat() -> Callable[..., dict[str, np.ndarray]]:
    """make_amat(folder, counts=None, seed=0) writes a tiny .amat folder and returns its pixels."""
    return write_amat_folder


@pytest.fixture
def amat_folder(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """A fresh tiny .amat folder (24/8/8 images) and the pixels it holds."""
    folder = tmp_path / "amat"
    return folder, write_amat_folder(folder)


@pytest.fixture(scope="session")
def tiny_amat(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A shared tiny .amat folder; tests must not modify it."""
    folder = tmp_path_factory.mktemp("tiny_amat")
    return folder, write_amat_folder(folder)


@pytest.fixture(scope="session")
def tiny_data(tiny_amat, tmp_path_factory) -> Path:
    """A shared prepared dataset folder (24 train / 8 valid / 8 test); tests must not modify it."""
    out = tmp_path_factory.mktemp("prepared") / "mnist"
    prepare("mnist", str(tiny_amat[0]), out)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tiny_data):
    return open_dataset(tiny_data)


@pytest.fixture
def run_config_factory() -> Callable[..., RunConfig]:
    """run_config_factory(dataset, **train_overrides): a RunConfig with a model of 8 hidden units."""
    return tiny_run_config


@pytest.fixture
def tiny_model_config() -> ZForcingConfig:
    return ZForcingConfig(
        modality="binary", input_size=2, start_index=2, embed_size=4, hidden_size=8, latent_size=4, mlp_size=8,
    )


# -- the command line, in-process (stdout and stderr kept apart) -------------------------------------

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*args, env=None):
    return runner.invoke(app, [str(arg) for arg in args], env=env)


def plain(text: str) -> str:
    return ANSI.sub("", text)


def assert_clean_error(result, code: int = 1, *fragments: str) -> str:
    """One `Error:` line and a `Hint:` line on stderr, nothing on stdout, no traceback; returns
    the error line."""
    stderr, output = plain(result.stderr), plain(result.output)
    assert result.exit_code == code, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    assert errors[0] in stderr.splitlines()
    assert any(line.startswith("Hint:") for line in stderr.splitlines()), output
    assert "Traceback" not in output
    assert "Error" not in plain(result.stdout)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def copy_runs(work: Path, into: Path) -> Path:
    shutil.copytree(work / "runs", into / "runs", symlinks=True)
    return into / "runs"


def train_in(work: Path, *options):
    """`zforcing train OPTIONS --device cpu` run from the folder work, which must succeed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.delenv("ZFORCING_DEBUG", raising=False)
        result = invoke("train", *options, "--device", "cpu")
    assert result.exit_code == 0, plain(result.output)
    return result


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A two-update CLI training run (small preset) in its own working folder."""
    work = tmp_path_factory.mktemp("cli_work")
    return work, train_in(work, "--data", tiny_data, "--max-steps", 2, "--batch-size", 4)


@pytest.fixture
def in_trained(trained, monkeypatch):
    """cwd = the trained run's working folder (read-only use)."""
    work, _ = trained
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def best_checkpoint(trained) -> Path:
    work, _ = trained
    (best,) = (work / "runs" / "latest" / "checkpoints").glob("best-*")
    return best


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def _compiled_loops_built():
    """The recurrence's compiled loops (fused_cpu.py) built before the first test, once per
    cache, so that no test, and no subprocess a test starts, waits for the compiler. Where they
    cannot be built, the loops run in Python and the tests of fused_cpu.py say why."""
    from zforcing_cli import fused_cpu

    fused_cpu.load()


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    """Tests see the user's view of errors unless they ask for ZFORCING_DEBUG themselves."""
    monkeypatch.delenv("ZFORCING_DEBUG", raising=False)


# -- audio: tiny TIMIT trees and folders of audio files ---------------------------------------------

import soundfile  # noqa: E402

TIMIT_RATE = 16000


def random_speech(seconds: float, rng: np.random.Generator, rate: int = TIMIT_RATE) -> np.ndarray:
    """int16 noise with a sine in it: never silent, never clipping."""
    count = int(seconds * rate)
    tone = np.sin(2 * np.pi * rng.uniform(100, 400) * np.arange(count) / rate)
    return np.clip(3000 * tone + 1500 * rng.standard_normal(count), -32768, 32767).astype(np.int16)


def write_timit_tree(
    root: Path, lower: bool = False, sphere: bool = True, riff_copies: bool = False, seed: int = 0,
    regions: int = 2, train_speakers: int = 2, test_speakers: int = 1, utterances: int = 3,
    seconds: tuple[float, float] = (0.55, 0.9),
) -> dict[str, np.ndarray]:
    """A tiny LDC-layout TIMIT tree: TRAIN|TEST/DRn/<speaker>/<utt>.WAV (NIST SPHERE, and/or RIFF
    `.WAV.wav` copies) with .PHN/.WRD/.TXT beside; returns {utterance id: int16 samples}.

    The defaults give 12 train and 6 test utterances of 0.55..0.9 s (one held out for valid, and
    long enough for a 40-frame sequence). RIFF copies beside SPHERE files hold *different* audio
    (negated), so a test can tell which one was read.
    """
    rng = np.random.default_rng(seed)
    written = {}
    name = str.lower if lower else str.upper
    for split, speakers in (("train", train_speakers), ("test", test_speakers)):
        for region in range(1, regions + 1):
            for speaker_index in range(speakers):
                speaker = f"{'fm'[speaker_index % 2]}spk{region}{speaker_index}"
                folder = root / name(split) / name(f"dr{region}") / name(speaker)
                folder.mkdir(parents=True, exist_ok=True)
                for utterance in ("sa1", "si1027", "sx37", "sx127", "si657")[:utterances]:
                    samples = random_speech(rng.uniform(*seconds), rng)
                    written[f"{split}/dr{region}/{speaker}/{utterance}"] = samples
                    stem = folder / name(utterance)
                    if sphere:
                        soundfile.write(f"{stem}{name('.wav')}", samples, TIMIT_RATE, format="NIST", subtype="PCM_16")
                    if riff_copies or not sphere:
                        copy = samples if not sphere else (-samples.astype(np.int32)).clip(-32768, 32767).astype(np.int16)
                        soundfile.write(f"{stem}{name('.wav')}.wav", copy, TIMIT_RATE, format="WAV", subtype="PCM_16")
                    for extension in (".phn", ".wrd", ".txt"):
                        Path(f"{stem}{name(extension)}").write_text("0 1600 h#\n")
    return written


@pytest.fixture(scope="session")
def timit_tree(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A shared tiny upper-case TIMIT tree (12 train, 6 test utterances); tests must not modify it."""
    root = tmp_path_factory.mktemp("timit") / "TIMIT"
    return root, write_timit_tree(root)


@pytest.fixture(scope="session")
def timit_data(timit_tree, tmp_path_factory) -> Path:
    """The shared tiny TIMIT tree, prepared; tests must not modify it."""
    out = tmp_path_factory.mktemp("prepared") / "timit"
    prepare("timit", str(timit_tree[0]), out)
    return out


# -- text: a small corpus of reviews written by the tests ---------------------------------------------

SUBJECTS = ["this movie", "the film", "the acting", "the plot", "my wife", "the director", "the music", "every scene"]
VERBS = ["was", "is", "seemed", "felt", "looked"]
OBJECTS = ["great", "awful", "boring", "funny", "too long", "a waste of time", "really good", "a masterpiece"]
TAILS = ["", " in the end", " to me", " at times", " , i think", " , sadly", " for its age"]
OPENERS = ["i did n't like it", "it 's a classic", "what a ride", "we watched it twice", "do n't bother"]


def review(rng: np.random.Generator) -> str:
    """A movie review of 2 to 6 sentences, with contractions, HTML breaks and a short line."""
    sentences = []
    for _ in range(int(rng.integers(2, 7))):
        words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}"
        sentences.append(words[0].upper() + words[1:] + rng.choice([".", "!", "?"]))
    opener = str(rng.choice(OPENERS)).replace(" n't", "n't").replace(" 's", "'s")
    sentences.insert(0, opener[0].upper() + opener[1:] + ".")
    middle = len(sentences) // 2
    return " ".join(sentences[:middle]) + "<br /><br />" + " ".join(sentences[middle:]) + " Ok."


def write_reviews_jsonl(path: Path, count: int = 60, seed: int = 0) -> list[str]:
    """count reviews, one JSON record per line (text and a rating), as the paper's corpus."""
    import json

    rng = np.random.default_rng(seed)
    reviews = [review(rng) for _ in range(count)]
    path.write_text("".join(json.dumps({"rating": int(rng.integers(1, 11)), "text": text}) + "\n" for text in reviews))
    return reviews


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    """A shared prepared text dataset (kind imdb, from 60 written reviews); tests must not modify it."""
    folder = tmp_path_factory.mktemp("text")
    write_reviews_jsonl(folder / "reviews.jsonl")
    prepare("imdb", str(folder / "reviews.jsonl"), folder / "prepared")
    return folder / "prepared"


@pytest.fixture(scope="module")
def text_trained(text_data, tmp_path_factory):
    """A few-update CLI training run on the text data (small preset), in its own working folder."""
    work = tmp_path_factory.mktemp("text_work")
    train_in(work, "--data", text_data, "--max-steps", 3, "--batch-size", 8)
    return work / "runs" / "latest"
