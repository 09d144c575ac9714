"""What every descent direction is: a weighting of the task gradients computed from their Gramian.

Per-task gradients of the shared parameters form J (m × P). A :class:`Direction` maps the m×m Gramian
``G = J Jᵀ`` and the m losses to weights ``w`` (the direction is ``d = wᵀ J``): every inner product of linear
combinations of the gradients is available from ``G``, so the hot path never builds a second m×P matrix.
Subclasses implement :meth:`Direction.weigh` on float64 numpy arrays; :meth:`Direction.__call__` converts the
inputs once and packs the output, adding ``info["weights"]`` for every method in one place.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mamo.errors import MamoError, NonFiniteGradients

# Values inside weigh(): numpy arrays, floats, or a function computing one (a diagnostic worth computing only
# when a logger reads it); tensors in the DirectionOutput.
Info = dict[str, Any]


class TensorInfo(Mapping[str, Tensor]):
    """A direction's diagnostics as float64 tensors, each made when first read.

    A training step without a logger reads none of them; making them eagerly took 20 µs of a 5 ms LeNet step
    (measured inside the step), a third of what separates MGDA + tensioner from its floor there."""

    def __init__(self, raw: Info):
        self._raw = raw
        self._made: dict[str, Tensor] = {}

    def __getitem__(self, key: str) -> Tensor:
        made = self._made.get(key)
        if made is None:
            value = self._raw[key]
            value = value() if callable(value) else value
            # np.array copies; torch.from_numpy then shares that private copy (cheaper than torch.tensor).
            made = self._made[key] = torch.from_numpy(np.array(value, dtype=np.float64))
        return made

    def flat(self, key: str) -> list[float]:
        """The diagnostic as a flat list of Python floats, without making a tensor (what a logger needs)."""
        made = self._made.get(key)
        if made is not None:
            return made.reshape(-1).tolist()
        value = self._raw[key]
        if callable(value):
            value = self._raw[key] = value()  # computed once, whichever way it is read
        if isinstance(value, float | int):
            return [float(value)]
        if isinstance(value, list) and all(isinstance(v, float) for v in value):
            return list(value)
        return np.asarray(value, dtype=np.float64).reshape(-1).tolist()

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


@dataclass
class DirectionOutput:
    """Weights (m, float64, CPU) of the task gradients, and diagnostics for logging (tensors, made on read)."""

    weights: Tensor
    info: Mapping[str, Tensor] = field(default_factory=dict)


def as_numpy(value: Tensor | np.ndarray | Any) -> np.ndarray:
    """Float64 numpy copy of a tensor on any device (one host transfer), or view of an array-like."""
    return np.array(_floats(value), dtype=np.float64) if isinstance(value, Tensor) else np.asarray(value, np.float64)


def _floats(value: Tensor | np.ndarray | Any) -> list:
    """The values as (nested) Python floats: tolist is the cheapest route for the tiny inputs a direction sees,
    and works on a tensor on any device (one host transfer) or with requires_grad."""
    return value.tolist() if isinstance(value, Tensor) else np.asarray(value, dtype=np.float64).tolist()


def finite_number(value: Any) -> bool:
    """Whether a setting is a finite number (anything ``float()`` takes, a 0-d tensor or array included, but not
    a bool or a string such as "0.3"): what the methods' checks ask first, so that a wrong type gets their
    one-sentence error instead of math's TypeError."""
    if isinstance(value, bool | str | bytes):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _finite(values: Iterable[float]) -> bool:
    # Python floats, not np.isfinite: inside a training step, right after the backward pass has evicted
    # numpy's code from the caches, four ufunc calls took 19 µs (measured on LeNet; a 5 ms step).
    return all(map(math.isfinite, values))


# A squared gradient norm below this (a norm under 1e-15) counts as 0: its row and column of G are zeroed. In
# a float32 Gramian such an entry is a sum of products in or near the subnormal range, which keep a digit or
# two, and a method that divides by it amplifies that noise: CAGrad weighted such a task 2.2e29 and stepped 275
# where the longest task gradient was 0.45 (a helper's fuzz; 0.097 from the exact float64 Gramian). No
# training step moves on a gradient that short.
NEGLIGIBLE_SQUARED_NORM = 1e-30


def _non_finite_problem(rows: list[list[float]], losses: list[float]) -> str:
    """What is not finite, in words: the losses, a NaN gradient, or a Gramian that overflowed (inf, no NaN)."""
    if not _finite(losses):
        return "the task losses are NaN or infinite at this step"
    if any(math.isnan(value) for row in rows for value in row):
        return "the task gradients are NaN or infinite at this step"  # inf components give NaN in G too
    return ("the task gradients' squared norms overflow at this step (the Gramian holds inf: a gradient norm "
            "above ~1.8e19 in float32, or an infinite one; from a diverging run, or inputs or targets of a huge "
            "scale)")


# Gramian dtypes refused: float16's normal range starts at 6e-5, so small squared norms lose their digits (and
# the checks below, sized for float32's 1e-38, refused 19 of 20 real fp16-autocast Gramians in a review).
_NARROW = (torch.float16, np.dtype(np.float16))

# Slack for float32 (and bf16-autocast) Gramians: a Gramian's rounding stays far inside 1% of sqrt(G_ii·G_jj).
_GRAMIAN_SLACK = 1e-2
# A float32 squared norm underflows to 0 when every component is below ~4e-23, so that task's ||g_i|| is then
# under 4e-23·sqrt(P) < 1e-15 for any P < 1e14, and G_ij up to 1e-15·||g_j|| is rounding, not a fault
# (measured: 1e-24 components gave G_ii = 0 and G_ij = 1e-18).
_UNDERFLOW = 1e-15


def live_tasks(gramian: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The indices of the tasks with a non-zero gradient, their gradient norms and their unit gradients' Gramian
    (the cosines): the methods that work on unit gradients leave the others out (their rows of G are 0)."""
    norms = np.sqrt(np.maximum(gramian.diagonal(), 0.0))
    alive = np.flatnonzero(norms > 0.0)
    n = norms[alive]
    return alive, n, gramian[np.ix_(alive, alive)] / np.multiply.outer(n, n)


# Eigenvalues of a Gramian below m·eps32 times its largest are float32 rounding, not directions the gradients
# span: mamo computes Gramians in float32, which holds about 7 digits (torchjd's Aligned-MTL cuts at the same
# place). Inverting such an eigenvalue would make rounding noise the largest part of the weights.
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def numerical_range(gramian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eigenvalues of a symmetric positive semi-definite ``gramian`` above float32 rounding (largest
    first) and their eigenvectors (columns): the gradients' span as G resolves it. Empty for an all-zero G."""
    values, vectors = np.linalg.eigh(gramian)
    values, vectors = values[::-1], vectors[:, ::-1]
    keep = values > max(float(values[0]), 0.0) * len(values) * FLOAT32_EPS
    return values[keep], vectors[:, keep]


def gramian_fault(rows: list[list[float]]) -> str | None:
    """What shows that ``rows`` is not a Gramian ``J Jᵀ``, or None: a diagonal entry below −1e-30, an asymmetric
    pair, or an entry beyond Cauchy–Schwarz (``|G_ij| ≤ sqrt(G_ii·G_jj)``), each to :data:`_GRAMIAN_SLACK`. These
    pairwise tests cost 0.9-1.4 µs at m = 3; a full eigenvalue test would cost more than a small network's whole
    direction, so a matrix indefinite only in its 3×3 minors or larger passes."""
    for i, row in enumerate(rows):
        if row[i] < -NEGLIGIBLE_SQUARED_NORM:  # above it, a rounding of 0 that the caller zeroes anyway
            return f"its diagonal entry ({i}, {i}) is {row[i]:.3g}, and a squared gradient norm cannot be negative"
        for j in range(i):
            both = max(row[i], 0.0) * max(rows[j][j], 0.0)
            bound = math.sqrt(both) + _UNDERFLOW * math.sqrt(max(row[i], rows[j][j], 0.0))
            if abs(row[j] - rows[j][i]) > _GRAMIAN_SLACK * bound:
                return f"it is not symmetric (entry ({i}, {j}) is {row[j]:.3g}, ({j}, {i}) is {rows[j][i]:.3g})"
            if abs(row[j]) > (1.0 + _GRAMIAN_SLACK) * bound:
                return (f"its entry ({i}, {j}) = {row[j]:.3g} exceeds sqrt(G[{i},{i}]·G[{j},{j}]) = {bound:.3g}, "
                        "which no pair of gradients can")
    return None


def make_output(weights: np.ndarray | list[float], info: Info) -> DirectionOutput:
    """The weights as a tensor (a copy, so callers may modify it) and the diagnostics with the final weights."""
    # From a list (weigh_lists) straight to a tensor: numpy's code is cold in a training step that reaches it only here.
    tensor = (torch.tensor(weights, dtype=torch.float64) if isinstance(weights, list)
              else torch.from_numpy(np.array(weights, dtype=np.float64)))
    return DirectionOutput(weights=tensor, info=TensorInfo({**info, "weights": weights}))


class Direction(ABC):
    """A multi-task descent direction, expressed as weights of the task gradients.

    ``non_conflicting`` says whether the method promises ``g_t · d ≥ 0`` for every task t.
    """

    non_conflicting: bool = False

    def __call__(self, gramian: Tensor, losses: Tensor) -> DirectionOutput:
        """The weights for an m×m Gramian and m losses (tensors on any device, or array-likes), after checking
        that they are finite and that the matrix passes :func:`gramian_fault`'s tests."""
        if getattr(gramian, "dtype", None) in _NARROW:
            raise MamoError("a direction takes the Gramian in float32 or wider, got float16, whose range cannot hold "
                            "squared gradient norms (above 65504 they overflow, below 6e-5 they lose digits); "
                            "compute jacobian @ jacobian.T in float32, outside autocast.")
        rows, L = _floats(gramian), as_numpy(losses).reshape(-1)
        G = np.array(rows, dtype=np.float64)
        m = L.shape[0]
        if G.shape != (m, m):
            raise MamoError(f"a direction takes the {m}×{m} Gramian of {m} task gradients, got shape "
                            f"{tuple(G.shape)}; pass jacobian @ jacobian.T, with one row of J per task loss.")
        return self._checked(rows, L.tolist(), G, L)

    def weights_of(self, rows: list[list[float]], losses: list[float]) -> DirectionOutput:
        """What ``self(gramian, losses)`` returns, from the m×m Gramian's rows and the m losses as Python floats
        (what the training step holds after its one host copy): the same checks and weights without the
        conversions of tensors, which cost tens of µs inside a LeNet step."""
        return self._checked(rows, losses)

    def _checked(self, rows: list[list[float]], losses: list[float], G: np.ndarray | None = None,
                 L: np.ndarray | None = None) -> DirectionOutput:
        m = len(losses)
        if not (_finite(chain.from_iterable(rows)) and _finite(losses)):
            raise NonFiniteGradients(_non_finite_problem(rows, losses),
                                     "lower train.lr or check the loss functions and the data.")
        fault = gramian_fault(rows)
        if fault is not None:
            raise MamoError(f"a direction takes the Gramian J Jᵀ of the task gradients, but {fault}; pass "
                            "jacobian @ jacobian.T.")
        negligible = [t for t in range(m) if rows[t][t] < NEGLIGIBLE_SQUARED_NORM]
        if G is None:  # from weights_of: the rows stay Python floats into weigh_lists
            if negligible:
                rows = [[0.0 if s in negligible or t in negligible else value for t, value in enumerate(row)]
                        for s, row in enumerate(rows)]
            return make_output(*self.weigh_lists(rows, losses))
        if negligible:
            G[negligible, :] = 0.0
            G[:, negligible] = 0.0
        weights, info = self.weigh(G, L)
        return make_output(weights, info)

    def weigh_lists(self, rows: list[list[float]], losses: list[float]) -> tuple[np.ndarray | list[float], Info]:
        """:meth:`weigh` on the Gramian's rows and the losses as Python floats; the weights as an array or a list.
        By default through :meth:`weigh`; a method whose arithmetic is on floats anyway skips the arrays."""
        return self.weigh(np.array(rows, dtype=np.float64), np.array(losses, dtype=np.float64))

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
