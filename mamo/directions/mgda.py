"""MGDA (Désidéri 2012; Sener & Koltun 2018): the min-norm element of the convex hull of the gradients."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mamo.directions.base import Direction, Info
from mamo.directions.min_norm import min_norm_weights, pair_weights
from mamo.errors import MamoError

# n_t from (gradient norms, losses), as in Sener & Koltun's gradient_normalizers(); None: n_t = 1.
NORMALIZERS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray] | None] = {
    "none": None,
    "l2": lambda norms, losses: norms,
    "loss": lambda norms, losses: losses,
    "loss+": lambda norms, losses: losses * norms,
}


class MGDA(Direction):
    """Min-norm weights of the normalised gradients ``g_t / n_t``, applied to the raw gradients.

    ``normalization`` picks ``n_t``: none (1), l2 (||g_t||), loss (L_t) or loss+ (L_t·||g_t||). The solve uses
    ``G_ij / (n_i n_j)``; the returned weights are the solution itself, applied to the *raw* gradients, exactly
    as Sener & Koltun's code does (it scales each raw loss by the solution). So only ``none`` keeps MGDA's
    guarantee ``g_t · d ≥ 0``; with another normaliser the raw direction can conflict with a task, which is why
    ``non_conflicting`` is true only for ``none``. A normaliser that is zero or negative (a zero gradient, a
    non-positive loss) is floored at 1e-8 of the largest one, so the solve stays finite.
    """

    def __init__(self, normalization: str = "none") -> None:
        if normalization not in NORMALIZERS:
            raise MamoError(
                f"unknown normalization '{normalization}' (direction.normalization); "
                f"use one of {', '.join(NORMALIZERS)}."
            )
        self.normalization = normalization
        self._normalizer = NORMALIZERS[normalization]
        self.non_conflicting = normalization == "none"  # see the class docstring

    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        if self._normalizer is None:  # n_t = 1: skip the rescaling (tens of µs of numpy on a tiny G)
            return min_norm_weights(gramian), {}
        norms = np.sqrt(np.maximum(gramian.diagonal(), 0.0))
        n = np.asarray(self._normalizer(norms, losses), dtype=np.float64)
        top = float(n.max())
        n = np.maximum(n, 1e-8 * top) if top > 0.0 else np.ones_like(n)
        return min_norm_weights(gramian / np.multiply.outer(n, n)), {}

    def weigh_lists(self, rows: list[list[float]], losses: list[float]) -> tuple[np.ndarray | list[float], Info]:
        # The closed form on the floats, without arrays; not for a subclass with its own weigh, which must run.
        if self._normalizer is None and len(rows) == 2 and type(self).weigh is MGDA.weigh:
            return pair_weights(rows), {}
        return super().weigh_lists(rows, losses)

    def __repr__(self) -> str:
        return f"MGDA(normalization={self.normalization!r})"
