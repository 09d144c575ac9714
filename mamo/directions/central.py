"""The central direction (thesis Eq 4.6–4.7; Katrutsa et al. 2020): min-norm of the unit gradients, rescaled."""

from __future__ import annotations

import numpy as np

from mamo.directions.base import Direction, Info, live_tasks
from mamo.directions.min_norm import min_norm_weights


class Central(Direction):
    """``v = γ Σ_t k_t g_t/||g_t||`` with ``k`` the min-norm weights of the unit gradients (Eq 4.6) and
    ``γ = (Σ_t k_t/||g_t||)⁻¹`` (Eq 4.7), i.e. raw weights ``w_t = γ k_t/||g_t||``.

    These weights sum to 1, so v lies in the convex hull of the gradients, and every unit gradient in the
    support makes the same angle with v. Since v is a positive multiple of the unit-gradient min-norm point,
    ``g_t · v ≥ 0`` for every task. Tasks with a zero gradient are left out (weight 0); if every gradient is
    zero, so are the weights.
    """

    non_conflicting = True

    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        alive, n, unit_gramian = live_tasks(gramian)
        weights = np.zeros(gramian.shape[0])
        if alive.size == 0:
            return weights, {}
        raw = min_norm_weights(unit_gramian) / n
        weights[alive] = raw / raw.sum()  # the division by Σ k_t/||g_t|| is γ
        return weights, {}
