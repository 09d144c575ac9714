"""CAGrad (Liu et al. 2021), conflict-averse gradient descent, in weight space as the official code does it."""

from __future__ import annotations

import math

import numpy as np

from mamo.directions.base import Direction, Info, finite_number
from mamo.directions.min_norm import min_norm_weights
from mamo.errors import MamoError

MAX_C = 1e3
# ||g_w|| below this fraction of Σ w_t·||g_t|| counts as 0 (see CAGrad's docstring and _resolved_norm).
_UNRESOLVED = 1e-4


class CAGrad(Direction):
    """The official ``cagrad(grads, alpha, rescale=1)``, from the Gramian alone.

    With ``g0`` the mean gradient and ``c = alpha·||g0||``, ``w`` minimises ``F(w) = wᵀG(1/m) + c·sqrt(wᵀGw)``
    over the simplex (exactly, up to a root finder's tolerance: :func:`_solve`; the official code runs SLSQP
    from the uniform point, which stops short where the gradients' norms are 10× or more apart); then
    ``d = (g0 + (c/||g_w||)·g_w) / (1 + alpha²)``, i.e. weights ``(1/m + (c/||g_w||)·w) / (1 + alpha²)``. The
    official code's 1e-8 safety terms are replaced by exact handling of the zero cases: ``c = 0`` gives the mean
    direction, so ``alpha = 0`` returns exactly the mean gradient; a ``g_w`` shorter than :data:`_UNRESOLVED` of
    ``Σ w_t·||g_t||`` (0 in the gradients' hull; in float32 such a ``g_w``'s direction is rounding, and
    ``c/||g_w||`` sent the weights to 1e7 and the float32 update uphill) gives the point nearest ``g0`` that
    conflicts with no task (:func:`_into_cone`), which attains the best worst-task improvement there, 0, where the
    official code returns the mean (whose worst task can go uphill). ``alpha`` is the config key
    ``direction.cagrad_c``.
    """

    non_conflicting = False

    def __init__(self, alpha: float = 0.5) -> None:
        # The direction is divided by 1 + c²: far beyond the paper's c < 1 it vanishes (and c² overflows).
        if not (finite_number(alpha) and 0.0 <= alpha <= MAX_C):
            raise MamoError(f"direction.cagrad_c must be a number in [0, {MAX_C:g}], got {alpha!r}; set e.g. 0.5.")
        self.alpha = float(alpha)

    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        m = gramian.shape[0]
        scale = float(gramian.diagonal().max())
        weights = np.full(m, 1.0 / m)
        if not scale > 0.0:
            return weights / (1.0 + self.alpha**2), {}
        A = gramian / scale  # the same minimiser, on a scale where the tolerances mean something
        b = A.mean(axis=1)  # A (1/m) 1
        c = self.alpha * math.sqrt(max(float(A.mean()), 0.0))  # ||g0||² = 1ᵀA1/m²
        pull = np.zeros(m)
        if c > 0.0:
            w = _solve(A, b, c)
            gw_norm = _resolved_norm(A, w)
            pull = (c / gw_norm) * w if gw_norm > 0.0 else _into_cone(A, c)
        return (weights + pull) / (1.0 + self.alpha**2), {}

    def __repr__(self) -> str:
        return f"CAGrad(alpha={self.alpha})"


def _solve(A: np.ndarray, b: np.ndarray, c: float) -> np.ndarray:
    """The ``w`` on the simplex minimising ``b·w + c·||g_w||`` (``A`` the Gramian scaled to a unit largest
    diagonal, ``b = A1/m = (g_t·g0)_t``, ``c > 0``).

    For ``λ > 0`` the minimiser of ``b·w + (λ/2)·||g_w||²`` is the min-norm point of the shifted gradients
    ``g_t + g0/λ``, whose Gramian is ``A_ij + (b_i + b_j)/λ + ||g0||²/λ²`` (the exact solver of
    :mod:`mamo.directions.min_norm`). Both objectives have the gradient ``b + λ·A w`` where ``λ = c/||g_w||``, so
    the minimiser sought is that point for the ``λ`` with ``λ·||g_w(λ)|| = c``, found by Brent's method: at ``λ = c``
    the product is at most ``c`` (``||g_w|| ≤ 1``), at ``c/ν`` at least (``ν`` the hull's min norm). If 0 is in
    the hull (ν unresolved), its min-norm point (``g_w ≈ 0``) is returned. The constant term
    ``||g0||²/λ² ≤ 1/alpha²`` stays small beside ``A`` unless alpha is tiny.
    """
    from scipy.optimize import brentq  # here: 0.37 s to import, which only this method's steps need

    g0_squared = float(b.mean())

    def at(lam: float) -> tuple[np.ndarray, float]:
        w = min_norm_weights(A + (b[:, None] + b[None, :]) / lam + g0_squared / (lam * lam))
        return w, lam * math.sqrt(max(float(w @ A @ w), 0.0))

    hull = min_norm_weights(A)
    nu = _resolved_norm(A, hull)
    if nu == 0.0:  # 0 is in the hull (to the Gramian's resolution): g_w = 0 is optimal
        return hull

    def excess(log_lam: float) -> float:
        return at(math.exp(log_lam))[1] - c

    low, high = math.log(c), math.log(c / nu)
    if excess(low) >= 0.0:  # 0 in exact arithmetic: ||g_w|| = 1, the longest gradient's vertex
        return at(math.exp(low))[0]
    if excess(high) <= 0.0:
        return at(math.exp(high))[0]
    # Brent's method on log λ: about 10 solves, where bisection to the same tolerance took 40 (the product is
    # smooth between the solver's changes of support).
    return at(math.exp(brentq(excess, low, high, xtol=1e-13, rtol=1e-13)))[0]


def _resolved_norm(A: np.ndarray, w: np.ndarray) -> float:
    """``||g_w||``, or 0 where it is below :data:`_UNRESOLVED` of ``Σ w_t·||g_t||``: so much cancels in the sum that
    a float32 Gramian (or gradient) leaves its direction to rounding."""
    squared = float(w @ A @ w)
    scale = float(w @ np.sqrt(np.maximum(A.diagonal(), 0.0)))
    return math.sqrt(squared) if squared > (_UNRESOLVED * scale) ** 2 else 0.0


def _into_cone(A: np.ndarray, c: float) -> np.ndarray:
    """Where 0 is in the gradients' hull: weights ``ν ≥ 0`` such that ``g0 + Σ ν_t g_t`` is the point nearest
    ``g0`` with ``g_t·d ≥ 0`` for every task (the best worst-task improvement there is 0, and this attains it),
    shortened to the ball ``||d − g0|| ≤ c`` if the Gramian's rounding put it outside. ``ν`` minimises
    ``(1/m + ν)ᵀ A (1/m + ν)`` over ``ν ≥ 0`` (the projection's dual), a non-negative least-squares problem on a
    square root of ``A``."""
    from scipy.optimize import nnls

    m = A.shape[0]
    values, vectors = np.linalg.eigh(A)
    keep = values > 1e-12 * max(float(values.max()), 0.0)
    root = np.sqrt(values[keep])[:, None] * vectors[:, keep].T  # rootᵀ root = A on its numerical range
    nu = nnls(root, -root @ np.full(m, 1.0 / m))[0]
    length = math.sqrt(max(float(nu @ A @ nu), 0.0))
    return nu * (c / length) if length > c else nu
