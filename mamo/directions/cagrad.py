"""CAGrad (Liu et al. 2021), conflict-averse gradient descent, in weight space as the official code does it."""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize

from mamo.directions.base import Direction, Info
from mamo.errors import MamoError

MAX_C = 1e3


class CAGrad(Direction):
    """The official ``cagrad(grads, alpha, rescale=1)``, from the Gramian alone.

    With ``g0`` the mean gradient and ``c = alpha·||g0||``, ``w`` minimises ``F(w) = wᵀG(1/m) + c·sqrt(wᵀGw)``
    over the simplex (SLSQP from the uniform point, as the official code, but with an analytic gradient and a
    tight tolerance); then ``d = (g0 + (c/||g_w||)·g_w) / (1 + alpha²)``, i.e. weights
    ``(1/m + (c/||g_w||)·w) / (1 + alpha²)``. The official code's 1e-8 safety terms are replaced by exact
    handling of the zero cases (``c = 0`` or ``g_w = 0`` give the mean direction), so ``alpha = 0`` returns
    exactly the mean gradient. ``alpha`` is the config key ``direction.cagrad_c``.
    """

    non_conflicting = False

    def __init__(self, alpha: float = 0.5) -> None:
        # The direction is divided by 1 + c²: far beyond the paper's c < 1 it vanishes (and c² overflows).
        if not (math.isfinite(alpha) and 0.0 <= alpha <= MAX_C):
            raise MamoError(f"direction.cagrad_c must be a number in [0, {MAX_C:g}], got {alpha!r}; set e.g. 0.5.")
        self.alpha = float(alpha)

    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        m = gramian.shape[0]
        scale = float(gramian.diagonal().max())
        weights = np.full(m, 1.0 / m)
        if not scale > 0.0:
            return weights / (1.0 + self.alpha**2), {}
        A = gramian / scale  # same minimiser, better conditioned for SLSQP
        b = A.mean(axis=1)  # A (1/m) 1
        c = self.alpha * math.sqrt(max(float(A.mean()), 0.0))  # ||g0||² = 1ᵀA1/m²
        lam = 0.0
        w = weights
        if c > 0.0:
            w = _solve(A, b, c)
            gw_norm = math.sqrt(max(float(w @ A @ w), 0.0))
            lam = c / gw_norm if gw_norm > 0.0 else 0.0  # g_w = 0: lam·g_w vanishes whatever lam is
        return (weights + lam * w) / (1.0 + self.alpha**2), {}

    def __repr__(self) -> str:
        return f"CAGrad(alpha={self.alpha})"


def _solve(A: np.ndarray, b: np.ndarray, c: float) -> np.ndarray:
    m = A.shape[0]

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        Aw = A @ w
        norm = math.sqrt(max(float(w @ Aw), 0.0))
        grad = b + (c / norm) * Aw if norm > 0.0 else b.copy()
        return float(b @ w) + c * norm, grad

    result = minimize(
        objective,
        np.full(m, 1.0 / m),
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * m,
        constraints=({"type": "eq", "fun": lambda w: 1.0 - w.sum(), "jac": lambda w: -np.ones_like(w)},),
        options={"ftol": 1e-12, "maxiter": 200},
    )
    w = np.clip(result.x, 0.0, None)
    total = w.sum()
    return w / total if total > 0.0 else np.full(m, 1.0 / m)
