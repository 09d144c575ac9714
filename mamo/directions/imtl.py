"""IMTL-G (Liu et al. 2021, "Towards impartial multi-task learning"): a direction whose projections on every
task's unit gradient are equal, in the form that admits linearly dependent gradients (Quinton & Rey 2024)."""

from __future__ import annotations

import numpy as np

from mamo.directions.base import FLOAT32_EPS, Direction, Info, live_tasks, numerical_range


class IMTLG(Direction):
    """``v`` solves ``G v = (||g_1||, ..., ||g_m||)`` on the gradients' numerical range (a pseudo-inverse), so
    ``d = Σ_t v_t g_t`` has ``g_t · d / ||g_t|| = 1`` for every task when the gradients are linearly independent;
    the weights are ``v / Σ_t |v_t|``.

    That is IMTL-G's ``Σ w = 1`` whenever every ``v_t ≥ 0``. Where some ``v_t < 0`` the literal ``v / Σ v`` can
    flip the direction uphill for every task (``Σ v < 0``, for 2.7% of random Gramians, m = 2..10) or blow it up
    (``Σ v`` near 0); dividing by ``Σ |v_t|`` keeps the direction and bounds the weights. The solve runs on the
    unit gradients' Gramian (cosines), so gradient norms far apart keep their digits. With linearly dependent
    gradients the projections are equal only in the least-squares sense, so no sign is promised; where that
    least-squares solution is 0 (the vector of ones is orthogonal to the cosines' range, e.g. g and -2g) the
    weights are all 0 and the step is skipped, as torchjd's are when |Σ v| < 1e-12.
    """

    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        m = gramian.shape[0]
        alive, n, cosines = live_tasks(gramian)
        weights = np.zeros(m)
        if alive.size == 0:
            return np.full(m, 1.0 / m), {}
        # G v = ||g|| on the live tasks is C u = 1 on their cosines C = G / (n nᵀ), with v = u / n.
        values, vectors = numerical_range(cosines)
        ones = vectors.sum(axis=0)  # the vector of ones in the eigenbasis
        # A component at the cosines' rounding (m·eps₃₂ per entry, so m^1.5·eps₃₂ here) is 0: with g and -2g the
        # ones lie in the null space, only d = 0 projects equally, and dividing noise by Σ|v| made it d = ±g.
        ones[np.abs(ones) <= alive.size ** 1.5 * FLOAT32_EPS] = 0.0
        if not ones.any():
            return weights, {}  # no step: the equal-projection direction of least norm is d = 0
        u = vectors @ (ones / values)
        weights[alive] = u / n
        return weights / np.abs(weights).sum(), {}
