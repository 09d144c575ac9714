"""The exact min-norm element of the convex hull of the task gradients, from their Gramian alone.

``min_norm_weights(G)`` returns ``w`` minimising ``wᵀGw`` over the simplex ``{w ≥ 0, Σw = 1}``.

How (exact, finite, float64):

* m = 2 and m = 3: closed forms in plain Python floats (the interior stationary point, else the best edge),
  because numpy's per-call overhead dominates at this size; m = 3 works in a frame centred on the shortest
  gradient.
* m ≥ 4: with ``H = G + c·11ᵀ`` for a ``c > 0`` (positive definite iff the gradients are affinely
  independent), the problem is the non-negative least-squares problem ``min_{u ≥ 0} ||R u - b||²`` with
  ``RᵀR = H`` and ``Rᵀb = c·1``; its solution is ``u = t·w`` with ``t > 0``, so ``w = u / Σu``. (Over
  ``u = t·w``, the objective is ``t²(q + c) - 2ct + c`` with ``q = wᵀGw``, minimised at ``t = c/(q + c)`` to
  ``cq/(q + c)``, which is increasing in ``q``.) ``c`` is the smallest squared norm, and ``H`` is solved after
  a Jacobi scaling (unit diagonal), so gradient norms 1e9 apart keep every task downhill. NNLS is solved by
  Lawson-Hanson's active-set method (``scipy.optimize.nnls``, compiled, with an iteration cap); when every
  weight of the affine minimiser is positive, that is the answer and NNLS is skipped. A rank-deficient ``H``
  (identical, collinear or too many gradients for their dimension) takes a pivoted Cholesky factor of its
  numerical rank instead. A zero gradient is the answer itself.

A vertex is returned as it is, not as 0.999/0.001 (what the public reference solvers answer there for m = 2).
"""

from __future__ import annotations

import numpy as np

# Squared Cholesky pivot (relative to the scaled H, whose diagonal is 1) under which a gradient is taken
# to lie in the affine hull of the others. A pivot is a squared distance, so gradients whose independence rests
# on offsets below about sqrt(1e-12) = 1e-6 of their norms count as dependent: a helper's audit (2026-11-25)
# measured objective errors up to 2e-6·max||g||² and direction errors up to 2.6e-6·max||g|| there, with no task
# sent uphill (m ≥ 4 only; m = 2, 3 are closed forms). A float32 Gramian resolves no finer anyway.
_PIVOT = 1e-12


def _pair(g11: float, g12: float, g22: float) -> float:
    """Weight of the first gradient in the min-norm point of the segment [g1, g2]."""
    den = g11 + g22 - 2.0 * g12  # ||g1 - g2||²
    if not den > 0.0:  # identical gradients: every point is optimal; 0.5 keeps the answer symmetric
        return 0.5
    a = (g22 - g12) / den
    return 0.0 if a < 0.0 else (1.0 if a > 1.0 else a)


def pair_weights(rows: list[list[float]]) -> list[float]:
    """:func:`min_norm_weights` for m = 2, from the Gramian's rows as Python floats."""
    (g11, g12), (_, g22) = rows
    a = _pair(g11, g12, g22)
    return [a, 1.0 - a]


def _three(gramian: np.ndarray) -> np.ndarray:
    rows = gramian.tolist()
    # The frame below is centred on one gradient. Centred on one much longer than the others, its differences
    # (d22, d23, ...) cancel to rounding noise (norms 1e5 apart gave a direction uphill for two tasks); centred
    # on the shortest, they keep the short gradients' digits.
    order = (0, 1, 2)
    if rows[1][1] < rows[0][0] or rows[2][2] < rows[0][0]:
        order = (1, 0, 2) if rows[1][1] <= rows[2][2] else (2, 0, 1)
        rows = [[rows[i][j] for j in order] for i in order]
    (g11, g12, g13), (_, g22, g23), (_, _, g33) = rows
    if not max(g11, g22, g33) > 0.0:  # all three are zero: every point is optimal, the uniform one is symmetric
        return np.full(3, 1.0 / 3.0)
    # In the frame p1 + a(p2 - p1) + b(p3 - p1): d_ij are the Gram entries of the differences.
    d22 = g22 - 2.0 * g12 + g11
    d33 = g33 - 2.0 * g13 + g11
    d23 = g23 - g12 - g13 + g11
    det = d22 * d33 - d23 * d23
    if det > 0.0 and det > _PIVOT * d22 * d33:
        c2 = g12 - g11
        c3 = g13 - g11
        a = (c3 * d23 - c2 * d33) / det
        b = (c2 * d23 - c3 * d22) / det
        if a >= 0.0 and b >= 0.0 and a + b <= 1.0:
            weights = [0.0, 0.0, 0.0]
            weights[order[0]], weights[order[1]], weights[order[2]] = 1.0 - a - b, a, b
            return np.array(weights)
    # Otherwise the optimum is on the boundary (for collinear points too: their hull is one of the edges).
    best = (np.inf, 0, 1, 1.0)
    for i, j, gii, gij, gjj in ((0, 1, g11, g12, g22), (0, 2, g11, g13, g33), (1, 2, g22, g23, g33)):
        a = _pair(gii, gij, gjj)
        value = a * a * gii + 2.0 * a * (1.0 - a) * gij + (1.0 - a) * (1.0 - a) * gjj
        if value < best[0]:
            best = (value, i, j, a)
    _, i, j, a = best
    weights = [0.0, 0.0, 0.0]
    weights[order[i]] = a
    weights[order[j]] = 1.0 - a
    return np.array(weights)


def min_norm_weights(gramian: np.ndarray) -> np.ndarray:
    """Exact minimiser of ``wᵀ G w`` over the simplex, for a symmetric positive semi-definite m×m ``G``.

    Returns float64 weights ``w ≥ 0`` with ``Σw = 1``. The minimum value is unique; the weights are unique
    only when the gradients at the optimum are affinely independent (with identical gradients any split
    between them is optimal and one is returned). An all-zero Gramian gives uniform weights.
    """
    G = np.asarray(gramian, dtype=np.float64)
    m = G.shape[0]
    if m == 1:
        return np.ones(1)
    if m == 2:
        return np.array(pair_weights(G.tolist()))
    if m == 3:
        return _three(G)
    diagonal = G.diagonal()
    shortest = float(diagonal.min())
    if not shortest > 0.0:  # a zero gradient is optimal (norm 0); among several, the uniform split is symmetric
        zero = (diagonal <= 0.0).astype(np.float64)
        return zero / zero.sum()
    # H = G + c·11ᵀ for any c > 0; c = the shortest squared norm (≥ the optimum) keeps the short gradients'
    # entries, which c = the longest one rounded away (norms 1e7 apart sent tasks uphill). The Jacobi scaling
    # H' = SHS, u = S y gives H' a unit diagonal, so the Cholesky pivots compare with 1 whatever the norms.
    # Imported here, not at the top: scipy.optimize takes 0.37 s to import, on every command, and the closed forms
    # of m ≤ 3 above never need it.
    from scipy.linalg import lapack
    from scipy.optimize import nnls

    H = G + shortest
    s = 1.0 / np.sqrt(H.diagonal())
    H *= np.outer(s, s)
    R, info = lapack.dpotrf(H, lower=0, clean=1)
    if info == 0 and min(R.diagonal().tolist()) ** 2 > _PIVOT:
        b, _ = lapack.dtrtrs(R, s, lower=0, trans=1)
        z, _ = lapack.dtrtrs(R, b, lower=0)  # z = H'⁻¹s: the affine minimiser in y, up to its scale
        if min(z.tolist()) > 0.0:
            u = s * z
            return u / u.sum()
        A = R
    else:
        R, piv, rank, _ = lapack.dpstrf(H, tol=_PIVOT, lower=0)
        A = np.zeros((rank, m))
        A[:, piv - 1] = np.triu(R[:rank])  # AᵀA = H' up to the dropped (negligible) pivots
        b, _ = lapack.dtrtrs(R[:rank, :rank], s[piv[:rank] - 1], lower=0, trans=1)
    y, _ = nnls(A, b, maxiter=50 * m)  # Lawson-Hanson terminates in far fewer; the cap bounds the loop
    u = s * y
    return u / u.sum()
