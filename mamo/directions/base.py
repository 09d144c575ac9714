"""What every descent direction is: a weighting of the task gradients computed from their Gramian.

Per-task gradients of the shared parameters form J (m × P). A :class:`Direction` maps the m×m Gramian
``G = J Jᵀ`` and the m losses to weights ``w`` (the direction is ``d = wᵀ J``): every inner product of linear
combinations of the gradients is available from ``G``, so the hot path never builds a second m×P matrix.
Subclasses implement :meth:`Direction.weigh` on float64 numpy arrays; :meth:`Direction.__call__` converts the
inputs once and packs the output, adding ``info["weights"]`` for every method in one place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mamo.errors import MamoError

Info = dict[str, Any]  # values: numpy arrays or floats inside weigh(); tensors in the DirectionOutput


@dataclass
class DirectionOutput:
    """Weights (m, float64, CPU) of the task gradients, and diagnostics for logging (tensors)."""

    weights: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)


def as_numpy(value: Tensor | np.ndarray | Any) -> np.ndarray:
    """Float64 numpy copy of a tensor on any device (one host transfer), or view of an array-like."""
    if isinstance(value, Tensor):  # tolist: the cheapest route for the m×m and m-long inputs this sees
        return np.array(value.detach().cpu().tolist(), dtype=np.float64)
    return np.asarray(value, dtype=np.float64)


def make_output(weights: np.ndarray, info: Info) -> DirectionOutput:
    """Pack numpy results as tensors (copies, so callers may modify them) and record the final weights."""
    # np.array copies; torch.from_numpy then shares that private copy (several µs cheaper than torch.tensor).
    packed = {key: torch.from_numpy(np.array(value, dtype=np.float64)) for key, value in info.items()}
    packed["weights"] = torch.from_numpy(np.array(weights, dtype=np.float64))
    return DirectionOutput(weights=torch.from_numpy(np.array(weights, dtype=np.float64)), info=packed)


class Direction(ABC):
    """A multi-task descent direction, expressed as weights of the task gradients.

    ``non_conflicting`` says whether the method promises ``g_t · d ≥ 0`` for every task t.
    """

    non_conflicting: bool = False

    def __call__(self, gramian: Tensor, losses: Tensor) -> DirectionOutput:
        G = as_numpy(gramian)
        L = as_numpy(losses).reshape(-1)
        m = L.shape[0]
        if G.shape != (m, m):
            raise ValueError(f"gramian must be {m}×{m} for {m} losses, got shape {tuple(G.shape)}")
        if not (np.isfinite(G).all() and np.isfinite(L).all()):
            raise MamoError(
                "the task losses or gradients are NaN or infinite at this step; "
                "lower train.lr or check the loss functions and the data."
            )
        weights, info = self.weigh(G, L)
        return make_output(weights, info)

    @abstractmethod
    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        """Weights (m, float64) and extra info from a finite float64 Gramian (m×m) and losses (m)."""

    def state_dict(self) -> dict:
        """State to checkpoint; stateless by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional hook, stateless by default
        """Restore what :meth:`state_dict` returned."""

    def reset(self) -> None:  # noqa: B027 - optional hook, stateless by default
        """Forget any history (e.g. when training restarts on a grown network)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
