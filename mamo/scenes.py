"""Scene-understanding datasets in MTAN's pre-processed .npy layout: NYUv2 and Cityscapes, from a local folder.

The layout (as produced for MTAN, Liu et al. 2019, and read by LibMTL and most MTL code since)::

    root/train/image/0.npy ...    (H, W, 3) float RGB
    root/train/label/0.npy ...    (H, W) class indices, -1 unlabelled       NYUv2: 13 classes
    root/train/label_7/0.npy ...  (H, W) class indices, -1 unlabelled       Cityscapes: label_7 or label_19
    root/train/depth/0.npy ...    (H, W, 1), 0 where missing
    root/train/normal/0.npy ...   (H, W, 3) unit normals, 0 where missing   NYUv2 only
    root/val/...                  the same for the evaluation images

Nothing is downloaded: ``data.root`` points at that folder. Files are read lazily, one sample at a time.
Splits: ``test`` is the ``val`` folder (what MTAN reports on); ``val`` is ``val_size`` images held out of
the ``train`` folder by a seeded draw (default a tenth), because MTAN's loop has no validation split and
mamo picks its best checkpoint on one; ``train`` is the rest. ``train_size``/``test_size`` cap the counts.
Task types and metrics: :mod:`mamo.dense`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mamo import dense
from mamo.errors import MamoError


def _channels_first(array: np.ndarray) -> Tensor:
    """An (H, W, C) array as a contiguous float32 (C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(array, dtype=np.float32), -1, 0)))


# Each folder's array as MTAN stores it: (H, W), then these axes (channels last).
TRAILING_AXES = {"image": (3,), "segmentation": (), "depth": (1,), "normal": (3,)}
# Above this an image is not float RGB in [0, 1] (or standardised RGB, within a few units): 0..255 values
# would train on inputs 255 times the scale of MTAN's files.
IMAGE_LIMIT = 10.0

# How each target folder's arrays become one sample's target tensor (channels first).
CONVERTERS = {
    "segmentation": lambda array: torch.from_numpy(np.asarray(array)).long(),
    "depth": _channels_first,
    "normal": _channels_first,
}


def _read(path: Path, header_only: bool = False) -> np.ndarray:
    """One .npy file; ``header_only`` maps it instead of reading it, which still fails if it is cut short."""
    try:
        array = np.load(path, mmap_mode="r" if header_only else None)
    except (OSError, ValueError, EOFError) as exc:
        raise MamoError(f"{path} is not a readable .npy file ({exc}); replace it with the original file.") from exc
    if not isinstance(array, np.ndarray):
        raise MamoError(f"{path} holds {type(array).__name__}, not one array; save it with np.save.")
    return array


class NpyScenes(Dataset):
    """Samples ``(image (3, H, W), {task: target})`` of the given indices of one split folder.

    ``shapes`` gives each sub-folder's array shape (as stored, channels last) and ``classes`` the segmentation
    classes: every file read is checked against them, so a bad file stops mamo with its path, not a traceback
    from deep in a training step.
    """

    def __init__(
        self, folder: Path, indices: list[int], folders: dict[str, tuple[str, str]],
        shapes: dict[str, tuple[int, ...]], classes: int,
    ):
        self.folder = folder
        self.indices = list(indices)
        self.folders = dict(folders)  # task -> (sub-folder, task type)
        self.shapes = dict(shapes)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.indices)

    def path(self, sub: str, i: int) -> Path:
        """The file of sample ``i`` (a position in this split) in sub-folder ``sub``."""
        return self.folder / sub / f"{self.indices[i]}.npy"

    def check_header(self, sub: str, i: int, array: np.ndarray) -> None:
        """The file's shape against the first training sample's, and an image's dtype."""
        if sub == "image" and not np.issubdtype(array.dtype, np.floating):
            # 0..255 integers would train on inputs 255 times the scale of MTAN's files, without a word.
            raise MamoError(f"{self.path(sub, i)} holds {array.dtype} values where MTAN's layout has float RGB in "
                            "[0, 1]; save the images as (array / 255).astype('float32').")
        if array.shape != self.shapes[sub]:
            raise MamoError(
                f"{self.path(sub, i)} has shape {array.shape} where the first training sample's {sub}/ file has "
                f"{self.shapes[sub]}; give every {sub}/ file that shape (MTAN's .npy layout)."
            )

    def check_values(self, sub: str, kind: str, i: int, array: np.ndarray) -> None:
        """What a training step or a metric would take silently: NaN or infinite values (a NaN in the test split
        made every metric NaN, exit 0), an image of 0..255 floats, labels that are no class indices."""
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        path = self.path(sub, i)
        if not (math.isfinite(low) and math.isfinite(high)):  # min and max are NaN when any value is
            raise MamoError(f"{path} holds NaN or infinite values; replace it with the original file (MTAN's files "
                            "mark missing depth and normals with 0, unlabelled pixels with -1).")
        if kind == "image" and high > IMAGE_LIMIT:
            raise MamoError(f"{path} holds values up to {high:g} where MTAN's layout has float RGB in [0, 1]; divide "
                            "the images by 255.")
        if kind != "segmentation":
            return
        if not (low >= dense.IGNORE and high < self.classes):
            raise MamoError(f"{path} has labels from {low:g} to {high:g}, outside [-1, {self.classes}) for "
                            f"{self.classes} classes; map unlabelled pixels (e.g. 255) to -1.")
        if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.floor(array)):
            raise MamoError(f"{path} has fractional labels; labels are class indices, so resize label maps with "
                            "nearest-neighbour interpolation.")

    def _array(self, sub: str, kind: str, i: int) -> np.ndarray:
        array = _read(self.path(sub, i))
        self.check_header(sub, i, array)
        self.check_values(sub, kind, i, array)
        return array

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        image = _channels_first(self._array("image", "image", i))
        return image, {task: CONVERTERS[kind](self._array(sub, kind, i)) for task, (sub, kind) in self.folders.items()}


def _indices(folder: Path, name: str) -> list[int]:
    """The sample numbers present in ``folder/image`` (files named ``<n>.npy``)."""
    images = folder / "image"
    if not images.is_dir():
        raise MamoError(
            f"dataset '{name}' expects {images} (MTAN's .npy layout: train/ and val/, each with image/ and one "
            "folder per task); point data.root at the folder that holds train/ and val/."
        )
    stems = [p.stem for p in images.glob("*.npy") if p.stem.isdigit()]
    padded = next((stem for stem in stems if stem != str(int(stem))), None)
    if padded is not None:  # 03.npy beside 3.npy was read as sample 3 twice, and itself never
        raise MamoError(f"{images / f'{padded}.npy'} is numbered with a leading zero; MTAN's files are named 0.npy, "
                        f"1.npy, ..., so rename it to {int(padded)}.npy (in every folder of the sample).")
    numbers = sorted(int(stem) for stem in stems)
    if not numbers:
        raise MamoError(f"dataset '{name}' found no <n>.npy files in {images}; check data.root.")
    return numbers


def _check_folders(folder: Path, numbers: list[int], folders: dict[str, tuple[str, str]], name: str) -> None:
    # Every file, up front: a gap found mid-epoch would stop training with a bare FileNotFoundError.
    for sub, _ in folders.values():
        missing = next((n for n in numbers if not (folder / sub / f"{n}.npy").is_file()), None)
        if missing is not None:
            raise MamoError(
                f"dataset '{name}' has {folder / 'image' / f'{missing}.npy'} but not "
                f"{folder / sub / f'{missing}.npy'}; every image needs its {sub}/ file (MTAN's .npy layout)."
            )


def _check_layout(folder: Path, number: int, folders: dict[str, tuple[str, str]],
                  shapes: dict[str, tuple[int, ...]]) -> None:
    """The first training sample's shapes against MTAN's layout (:data:`TRAILING_AXES`): a (3, H, W) image was
    read as 48 channels of 3 × 32 pixels, and trained on."""
    image = shapes["image"]
    if len(image) != 3 or image[-1] != 3:
        raise MamoError(f"{folder / 'image' / f'{number}.npy'} has shape {image} where MTAN's layout has (H, W, 3) "
                        "float RGB; save each image channels last (a (3, H, W) array as array.transpose(1, 2, 0)).")
    height, width = image[:2]
    for sub, kind in folders.values():
        expected = (height, width, *TRAILING_AXES[kind])
        if shapes[sub] != expected:
            raise MamoError(f"{folder / sub / f'{number}.npy'} has shape {shapes[sub]} where MTAN's layout has "
                            f"{expected} beside a {height} × {width} image; save every {sub}/ file in that shape.")


def build_scenes(
    name: str,
    root: str | None,
    folders: dict[str, tuple[str, str]],
    classes: int,
    seed: int,
    sizes: tuple[int | None, int | None, int | None],
) -> dict:
    """The train/val/test splits and task specs of one dataset in MTAN's layout under ``root``."""
    # torch's CPU generator keeps a seed's low 32 bits, so a wider seed would silently repeat another's split.
    if not 0 <= seed < 2**32:
        raise MamoError(f"dataset '{name}' draws its validation split with a 32-bit seed, but data.seed is {seed}; "
                        "set data.seed to an integer in [0, 2**32), e.g. data.seed=0.")
    if root is None:
        raise MamoError(
            f"dataset '{name}' reads MTAN's pre-processed .npy files from a local folder; set data.root, "
            f"e.g. --set data.root=/data/{name}."
        )
    base = Path(root).expanduser()
    train_size, val_size, test_size = sizes
    train_numbers = _indices(base / "train", name)
    test_numbers = _indices(base / "val", name)
    _check_folders(base / "train", train_numbers, folders, name)
    _check_folders(base / "val", test_numbers, folders, name)
    held_out = val_size if val_size is not None else max(1, len(train_numbers) // 10)
    if held_out >= len(train_numbers):
        raise MamoError(
            f"dataset '{name}' has {len(train_numbers)} training images, too few to hold out {held_out} for "
            "validation; lower data.val_size."
        )
    order = torch.randperm(len(train_numbers), generator=torch.Generator().manual_seed(seed)).tolist()
    val_numbers = sorted(train_numbers[i] for i in order[:held_out])
    rest = sorted(train_numbers[i] for i in order[held_out:])
    subs = ["image", *(sub for sub, _ in folders.values())]
    shapes = {sub: _read(base / "train" / sub / f"{rest[0]}.npy", header_only=True).shape for sub in subs}
    _check_layout(base / "train", rest[0], folders, shapes)
    splits = {
        "train": NpyScenes(base / "train", rest[:train_size], folders, shapes, classes),
        "val": NpyScenes(base / "train", val_numbers, folders, shapes, classes),
        "test": NpyScenes(base / "val", test_numbers[:test_size], folders, shapes, classes),
    }
    # Every file's header up front (about 0.1 ms a file with warm caches): a cut or mis-shaped file, or an integer
    # image, found mid-run would stop training late (in the test split only at the final evaluation). Label values
    # are checked as read.
    for split in splits.values():
        for i in range(len(split)):
            for sub in subs:
                split.check_header(sub, i, _read(split.path(sub, i), header_only=True))
    first = splits["train"][0][1]
    tasks = {task: {"type": kind, "shape": list(first[task].shape)} for task, (_, kind) in folders.items()}
    tasks["segmentation"]["classes"] = classes
    return {**splits, "tasks": tasks}


def build_nyuv2(
    *, seed: int, root: str | None, train_size: int | None, val_size: int | None, test_size: int | None
) -> dict:
    """NYUv2 (795 training, 654 evaluation images at 288×384 in MTAN's files): 13-class segmentation, depth
    and surface normals."""
    folders = {"segmentation": ("label", "segmentation"), "depth": ("depth", "depth"), "normal": ("normal", "normal")}
    return build_scenes("nyuv2", root, folders, 13, seed, (train_size, val_size, test_size))


def build_cityscapes(
    *, seed: int, root: str | None, train_size: int | None, val_size: int | None, test_size: int | None,
    classes: object = 7,  # 7 or 19, as YAML gives it
) -> dict:
    """Cityscapes (2,975 training, 500 evaluation images at 128×256 in MTAN's files): segmentation into 7 or
    19 classes (``data.options.classes``, the ``label_7``/``label_19`` folders) and depth."""
    if isinstance(classes, float) and classes.is_integer():  # 19.0 passed the check and then named label_19.0/
        classes = int(classes)
    if isinstance(classes, bool) or not isinstance(classes, int) or classes not in (7, 19):
        raise MamoError(f"data.options.classes is {classes!r} for cityscapes; MTAN's files have 7 or 19 classes.")
    folders = {"segmentation": (f"label_{classes}", "segmentation"), "depth": ("depth", "depth")}
    return build_scenes("cityscapes", root, folders, classes, seed, (train_size, val_size, test_size))
