"""UPGrad (Quinton & Rey 2024, "Jacobian descent for multi-objective optimization"): each task gradient
projected onto the dual cone of all of them, the projections averaged."""

from __future__ import annotations

import numpy as np

from mamo.directions.base import Direction, Info


class UPGrad(Direction):
    """``w = Σ_i v_i`` with ``v_i = argmin_{v ≥ e_i/m} vᵀ G v``: ``Jᵀ v_i`` is the projection of ``g_i/m`` onto the
    dual cone ``{x : g_t · x ≥ 0 for all t}``, so ``g_t · d ≥ 0`` for every task (each ``G v_i ≥ 0`` by the
    problem's optimality conditions), and ``d = g_i/m`` summed over tasks where nothing conflicts.

    Each problem is solved exactly, as non-negative least squares (``v = e_i/m + μ``, ``μ ≥ 0``,
    ``min ||A(e_i/m + μ)||²`` with ``AᵀA`` the Gramian; Lawson–Hanson, as the min-norm solver), after a Jacobi
    scaling to unit gradients, so that norms far apart keep their digits; torchjd's UPGrad instead adds 1e-4 of
    the Gramian's trace to its diagonal for its QP solver, which moves its weights by about that much.
    """

    non_conflicting = True

    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        from scipy.optimize import nnls  # here: 0.37 s to import, which only this method's steps need

        m = gramian.shape[0]
        norms = np.sqrt(np.maximum(gramian.diagonal(), 0.0))
        scale = np.where(norms > 0.0, norms, 1.0)  # zero gradients have zero rows: any scale of theirs is exact
        # v = y / scale: the cone's constraints and objective in the unit gradients' frame.
        unit = gramian / np.multiply.outer(scale, scale)
        values, vectors = np.linalg.eigh(unit)
        keep = values > 0.0
        root = np.sqrt(values[keep])[:, None] * vectors[:, keep].T  # rootᵀ root = the unit Gramian
        weights = np.zeros(m)
        for i in range(m):
            floor = np.zeros(m)
            floor[i] = scale[i] / m  # v ≥ e_i/m is y ≥ scale_i/m at i, y ≥ 0 elsewhere
            lift = nnls(root, -root @ floor, maxiter=50 * m)[0] if root.size else np.zeros(m)
            weights += floor + lift
        return weights / scale, {}
