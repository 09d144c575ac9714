"""IMTL-G (Liu et al. 2021, "Towards impartial multi-task learning"): a direction whose projections on every
task's unit gradient are equal, in the form that admits linearly dependent gradients (Quinton & Rey 2024)."""

from __future__ import annotations

import numpy as np

from mamo.directions.base import Direction, Info, numerical_range


class IMTLG(Direction):
    """``v`` solves ``G v = (||g_1||, ..., ||g_m||)`` on the gradients' numerical range (a pseudo-inverse), so
    ``d = Σ_t v_t g_t`` has ``g_t · d / ||g_t|| = 1`` for every task when the gradients are linearly independent;
    the weights are ``v / Σ_t |v_t|``.

    That is IMTL-G's ``Σ w = 1`` whenever every ``v_t ≥ 0``. Where some ``v_t < 0`` the literal ``v / Σ v`` can
    flip the direction uphill for every task (``Σ v < 0``, for 2.7% of random Gramians, m = 2..10) or blow it up
    (``Σ v`` near 0); dividing by ``Σ |v_t|`` keeps the direction and bounds the weights. The solve runs on the
    unit gradients' Gramian (cosines), so gradient norms far apart keep their digits. With linearly dependent
    gradients the projections are equal only in the least-squares sense, so no sign is promised.
    """

    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        m = gramian.shape[0]
        norms = np.sqrt(np.maximum(gramian.diagonal(), 0.0))
        alive = np.flatnonzero(norms > 0.0)
        weights = np.zeros(m)
        if alive.size == 0:
            return np.full(m, 1.0 / m), {}
        n = norms[alive]
        # G v = ||g|| on the live tasks is C u = 1 on their cosines C = G / (n nᵀ), with v = u / n.
        values, vectors = numerical_range(gramian[np.ix_(alive, alive)] / np.multiply.outer(n, n))
        u = vectors @ (vectors.sum(axis=0) / values)
        weights[alive] = u / n
        return weights / np.abs(weights).sum(), {}
