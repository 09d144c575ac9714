"""A data plugin to copy: scikit-learn's 1,797 bundled 8 × 8 digits, two tasks that compete for the trunk.

``digit`` classifies the digit (10 classes); ``image`` reconstructs the input, the classify-and-reconstruct
pairing of Nakamura's §5.3: the classifier wants features that forget how a digit was drawn, the
reconstruction needs them. Run it from the repository's root (a relative plugin path is read from the
current folder):

    python cli.py search docs/examples/digits.yaml

mamo calls ``build`` with ``seed``, ``root`` and the sizes a preset sets, and reads the returned dict: three
splits of ``(x, {task: target})`` samples and a spec per task (README, "Bring your own data").
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits  # scikit-learn comes with mamo (pyproject.toml)

from mamo.data import TensorTaskDataset
from mamo.errors import MamoError  # shown to the user as it is; any other exception adds "fix the plugin"


def build(seed: int = 0, root: str | None = None, train_size: int = 1197, val_size: int = 300,
          test_size: int = 300) -> dict:
    """The digits split at random by ``seed``, pixels scaled to [0, 1]. ``root`` is unused: the data ships
    with scikit-learn."""
    digits = load_digits()
    if min(train_size, val_size, test_size) < 1 or train_size + val_size + test_size > len(digits.images):
        raise MamoError(f"data.train_size, val_size and test_size ({train_size}, {val_size}, {test_size}) must each "
                        f"be at least 1 and together at most the {len(digits.images)} digits; set sizes that fit.")
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    bounds = {"train": (0, train_size), "val": (train_size, train_size + val_size),
              "test": (train_size + val_size, train_size + val_size + test_size)}
    splits = {}
    for split, (start, end) in bounds.items():
        rows = order[start:end]
        splits[split] = TensorTaskDataset(images[rows], {"digit": labels[rows], "image": images[rows]})
    return {**splits,
            "tasks": {"digit": {"type": "classification", "classes": 10},
                      "image": {"type": "reconstruction", "shape": [1, 8, 8]}}}
