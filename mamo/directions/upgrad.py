"""UPGrad (Quinton & Rey 2024, "Jacobian descent for multi-objective optimization"): each task gradient
projected onto the dual cone of all of them, the projections averaged."""

from __future__ import annotations

import numpy as np

from mamo.directions.base import FLOAT32_EPS, Direction, Info, live_tasks

# Ridge (relative to the unit Gramian's largest eigenvalue) that makes each NNLS strictly convex. scipy's
# Lawson–Hanson solves its passive sets without a rank test: on exactly dependent gradients (a repeated,
# opposite or zero one, in a float32 Gramian) it returned weights up to 1e20 and directions 16 times the
# longest gradient, sending tasks uphill at that scale (a helper's audit against an enumeration of the cone's
# faces). The ridge only picks the active set; the answer is then solved without it (see _polished).
_RIDGE = 1e-8


class UPGrad(Direction):
    """``w = Σ_i v_i`` with ``v_i = argmin_{v ≥ e_i/m} vᵀ G v``: ``Jᵀ v_i`` is the projection of ``g_i/m`` onto the
    dual cone ``{x : g_t · x ≥ 0 for all t}``, so ``g_t · d ≥ 0`` for every task (each ``G v_i ≥ 0`` by the
    problem's optimality conditions), and ``d = g_i/m`` summed over tasks where nothing conflicts.

    Each problem is solved as non-negative least squares (``v = e_i/m + μ``, ``μ ≥ 0``, ``min ||A(e_i/m + μ)||²``
    with ``AᵀA`` the Gramian; Lawson–Hanson, as the min-norm solver) after a Jacobi scaling to unit gradients, so
    that norms far apart keep their digits. A ridge of 1e-8 makes each problem strictly convex, so dependent
    gradients cannot blow μ up; on the active set it finds, μ is then solved again without the ridge (minimum
    norm, float32's resolution), and that exact answer is kept when it is optimal. Zero gradients (whose
    constraint ``0 · x ≥ 0`` always holds) keep the weight 1/m. torchjd's UPGrad instead adds 1e-4 of the
    Gramian's trace to its diagonal for its QP solver, which outweighs the constraint of a task whose squared
    norm is under about 1e-4 of the total (directions up to half the longest gradient apart: docs/directions.md).
    """

    non_conflicting = True

    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        from scipy.optimize import nnls  # here: 0.37 s to import, which only this method's steps need

        m = gramian.shape[0]
        weights = np.full(m, 1.0 / m)
        alive, n, unit = live_tasks(gramian)
        if alive.size == 0:
            return weights, {}
        k = alive.size
        # y = v · ||g||: the cone's constraints and objective in the unit gradients' frame (unit: the cosines).
        values, vectors = np.linalg.eigh(unit)
        root = np.sqrt(np.maximum(values, 0.0))[:, None] * vectors.T  # rootᵀ root = the unit Gramian
        ridged = np.vstack([root, np.sqrt(_RIDGE * max(values[-1], 0.0)) * np.eye(k)])
        total = np.zeros(k)
        for i in range(k):
            floor = np.zeros(k)
            floor[i] = n[i] / m  # v ≥ e_i/m is y ≥ ||g_i||/m at i, y ≥ 0 elsewhere
            lift = nnls(ridged, -ridged @ floor, maxiter=50 * k)[0]
            total += floor + _polished(unit, root, floor, lift)
        weights[alive] = total / n
        return weights, {}


def _polished(unit: np.ndarray, root: np.ndarray, floor: np.ndarray, lift: np.ndarray) -> np.ndarray:
    """The ridge-free optimum on the free set of ``lift`` (minimum norm, singular values of ``root`` below
    float32's resolution cut), when it is feasible and optimal; else ``lift``. Without this the ridge leaves
    ~sqrt(ridge)·|y| of the projection where the cone is nearly {0} and y must be large (errors up to 6e-4).

    The ridge also frees coordinates that the exact optimum holds at 0 (a lift of 1e-9 beside exactly opposite
    gradients), and the exact solve on such a set goes negative there; those are dropped and the set solved
    again, at most k times. Keeping ``lift`` instead left a task 5e-9·max||g||² uphill (a helper's audit)."""
    free = lift > 0.0
    k = len(floor)
    tolerance = np.sqrt(k * FLOAT32_EPS)
    for _ in range(k):
        exact = np.zeros(k)
        if free.any():
            exact[free] = -np.linalg.lstsq(root[:, free], root @ floor, rcond=tolerance)[0]
        if (exact < 0.0).any():
            free &= exact > 0.0  # the ridge's extra support: solved again without it
            continue
        y = floor + exact
        if ((unit @ y)[~free] >= -k * FLOAT32_EPS * np.abs(y).sum()).all():
            return exact
        break
    return lift
