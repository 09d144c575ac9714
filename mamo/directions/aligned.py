"""Aligned-MTL (Senushkin et al. 2023, "Independent component alignment for multi-task learning"): the task
gradients made orthogonal and of equal length before they are averaged."""

from __future__ import annotations

import numpy as np

from mamo.directions.base import Direction, Info, numerical_range


class AlignedMTL(Direction):
    """With ``G = V Λ Vᵀ`` on the gradients' numerical range (rank R, ``λ_R`` its smallest eigenvalue), the
    weights are ``B 1/m`` for ``B = sqrt(λ_R) V Λ^(-1/2) Vᵀ`` (the paper's Algorithm 1 with equal task
    preferences): ``Bᵀ J`` has orthogonal rows of the length of the smallest singular value of ``J``, so no task
    dominates the mean and the condition number of the aligned gradients is 1. No sign is promised per task.
    Eigenvalues below float32 rounding of the largest count as zero (:func:`numerical_range`); an all-zero
    Gramian gives uniform weights.
    """

    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        m = gramian.shape[0]
        values, vectors = numerical_range(gramian)
        if values.size == 0:
            return np.full(m, 1.0 / m), {}
        balance = np.sqrt(values[-1]) * (vectors / np.sqrt(values)) @ vectors.T
        return balance @ np.full(m, 1.0 / m), {}
