"""Task tensioners (thesis Eq 4.8–4.12, Algorithms 1–2): pull a base direction toward tasks that fall behind.

Per task t, the tensioner keeps the last T + 1 gradient norms ``||g_t|| = sqrt(G_tt)``. From call T + 1 on:

* ``ζ_t(i)`` is the mean of the last T norms (the current one included), ``ζ_t(i−1)`` the mean of the T before
  the current one (Eq 4.9);
* ``δ_t = ζ_t(i)/ζ_t(i−1) + log10(L_t)`` (Eq 4.10);
* ``c_t = α / (1 + exp(−e·δ_t + e)) + 1 − α`` (Eq 4.11), clipped at 0 (only matters for α > 1).

For the first T calls it is inert (the base weights are returned unchanged). Two formulations of the pull,
both expressed on weights (``v = wᵀJ``, ``g_t − v = (e_t − w)ᵀJ``, every norm from G):

* ``thesis``: ``v_n = v + Σ_t c_t (g_t − v)/||g_t − v||`` (Eq 4.12 and the reference implementation). For a
  base whose weights lie on the simplex (mgda, central) each unit vector is taken as that of ``g_t − u_t``, u_t
  the other tasks' weighted mean: the same vector where ``g_t ≠ v``; at a vertex (``v = g_t``), where Eq 4.12
  is undefined, u_t is the others' plain mean (the limit for m = 2; for m ≥ 3 the limit along that path, see
  :func:`_thesis_pull_on_simplex`). A term whose unit vector is not resolvable
  from a float32 Gramian is dropped (the step's; a squared distance is a difference of entries that carry
  ~1e-6 relative error on an 11 M-parameter network, so one computed below 1e-5 of the two squared norms can
  be off by several times). α = 0 is treated as off, as the thesis' tables do.
* ``relative``: ``v_n = v + Σ_t (c_t − (1 − α)) (g_t − v)``: α = 0 gives v exactly, and the pull is a
  fraction of the distance to each gradient, so it scales with the gradients.

Both then keep ``g_t · v_n ≥ 0``: with ``Δw`` the pull, the largest ``s ∈ [0, 1]`` such that
``(G(w + sΔw))_t ≥ 0`` for every task the base direction does not conflict with is applied. A base that
promises no conflict (``non_conflicting``: mgda, central) constrains every task: near a Pareto-stationary
point its ``(Gw)_t`` are 0 in exact arithmetic and slightly negative in a float32 Gramian, and reading that as a
conflict would let the pull push against those tasks (then s = 0 and v_n = v). For the other bases, a task
with ``(Gw)_t`` below −1e-6 of the largest squared norm (the float32 Gramian's resolution) is one the base
already conflicts with (possible for equal, pcgrad, cagrad or normalised mgda); it is not constrained, since
no s could fix it at s = 0.

``info``: ``c``, ``delta`` (zeros while inert), ``angle`` (degrees between each ``g_t`` and ``v_n``; 90 where
either is zero, or v_n too short for the Gramian to resolve), ``shrink`` (the applied s; 0 while inert or
off), ``active`` (1 once T + 1 norms are stored), ``base_weights``, and the base's own info under
``base_<key>``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from operator import mul

import numpy as np

from mamo.config import MAX_WINDOW
from mamo.directions.base import Direction, Info, finite_number
from mamo.errors import MamoError

# The arithmetic is on plain Python floats: m is small, and numpy's per-call overhead on m-long arrays
# dominated. Measured inside a LeNet step (m = 2, one thread): the MGDA + tensioner call took 0.29 ms with
# numpy here and 0.13-0.14 ms with lists, of a 6.5 ms step (docs/performance.md).
Vector = list[float]
Matrix = list[list[float]]

_RESOLVE = 1e-5  # a thesis term's squared distance below this fraction of the two squared norms: dropped
_SIMPLEX = 1e-9  # base weights ≥ 0 summing to 1 within this: v is in the gradients' convex hull
_PROTECT = 1e-6  # for a base that may conflict: (Gw)_t ≥ −_PROTECT·max_t G_tt counts as "no conflict with t"
_UNRESOLVED_STEP = 1e-3  # a v_n shorter than this fraction of Σ|w_t|·||g_t||: no angle (see _angles)
_RATIO_CAP = 1e6  # ζ(i)/ζ(i−1) when ζ(i−1) = 0 < ζ(i); the sigmoid has long saturated there
_TINY = float(np.finfo(np.float64).tiny)


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(map(mul, a, b))  # equal lengths by construction; map is about twice a generator's speed


def _times(matrix: Matrix, vector: Vector) -> Vector:
    return [_dot(row, vector) for row in matrix]


def _toward(coefficients: Vector, weights: Vector) -> Vector:
    """Σ_t a_t (e_t − w): the weights of Σ_t a_t (g_t − v)."""
    total = sum(coefficients)
    return [a - total * w for a, w in zip(coefficients, weights, strict=True)]


def _thesis_pull(gramian: Matrix, weights: Vector, gw: Vector, c: Vector, alpha: float) -> Vector:
    if min(weights) >= 0.0 and abs(sum(weights) - 1.0) <= _SIMPLEX and len(weights) > 1:
        return _thesis_pull_on_simplex(gramian, weights, c)
    vv = _dot(weights, gw)
    coefficients = []
    for t, (gw_t, c_t) in enumerate(zip(gw, c, strict=True)):
        sq_dist = gramian[t][t] - 2.0 * gw_t + vv  # ||g_t − v||²
        coefficients.append(c_t / math.sqrt(sq_dist) if sq_dist > _RESOLVE * (gramian[t][t] + vv) else 0.0)
    return _toward(coefficients, weights)


def _thesis_pull_on_simplex(gramian: Matrix, weights: Vector, c: Vector) -> Vector:
    """Eq 4.12 for a base in the convex hull of the gradients (mgda, central): v = w_t g_t + (1 − w_t) u_t with
    u_t the other tasks' weighted mean, so g_t − v = (1 − w_t)(g_t − u_t) and the unit vector is that of
    g_t − u_t. That is exact wherever Eq 4.12 is defined, and ||g_t − u_t|| stays resolvable from a float32
    Gramian as w_t → 1. At the vertex itself (v = g_t, where the term would otherwise be dropped and the other
    tasks' unit vectors pull alone, by c_t ≥ 1 − α whatever the gradients' scale) u_t is the plain mean of the
    others: Eq 4.12's limit for m = 2; for m ≥ 3 the limit depends on the path into the vertex, and this is
    the one along the plain mean."""
    m = len(weights)
    if m == 2:  # u_1 = g_2 and u_2 = g_1: the two unit vectors are opposite (closed form, 25 µs under the loop)
        sq_dist = gramian[0][0] - 2.0 * gramian[0][1] + gramian[1][1]
        if sq_dist <= _RESOLVE * (gramian[0][0] + gramian[1][1]):
            return [0.0, 0.0]
        along = (c[0] - c[1]) / math.sqrt(sq_dist)
        return [along, -along]
    step = [0.0] * m
    for t in range(m):
        rest = sum(w for s, w in enumerate(weights) if s != t)  # 1 − w_t without the cancellation
        mean = [0.0 if s == t else (w / rest if rest > 0.0 else 1.0 / (m - 1)) for s, w in enumerate(weights)]
        g_mean = _times(gramian, mean)
        uu = _dot(mean, g_mean)
        sq_dist = gramian[t][t] - 2.0 * g_mean[t] + uu  # ||g_t − u_t||²
        if sq_dist > _RESOLVE * (gramian[t][t] + uu):
            scale = c[t] / math.sqrt(sq_dist)
            step = [x + scale * ((s == t) - u) for s, (x, u) in enumerate(zip(step, mean, strict=True))]
    return step


def _relative_pull(gramian: Matrix, weights: Vector, gw: Vector, c: Vector, alpha: float) -> Vector:
    return _toward([c_t - (1.0 - alpha) for c_t in c], weights)


# The pull Δw (weights of v_n − v) from the Gramian, the base weights w, Gw, the tension factors c and α.
FORMULATIONS: dict[str, Callable[[Matrix, Vector, Vector, Vector, float], Vector]] = {
    "thesis": _thesis_pull,
    "relative": _relative_pull,
}

# α at which a formulation is switched off entirely (the thesis' tables use α = 0 for "no tensioner");
# "relative" needs no entry: its pull is exactly zero at α = 0.
_OFF_AT_ZERO_ALPHA = {"thesis": True, "relative": False}


def _sigmoid(x: float) -> float:
    # math instead of scipy's expit: a ufunc call on one float costs more than the whole formula here.
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)  # never overflows for x < 0
    return z / (1.0 + z)


def _factors(history: Sequence[Sequence[float]], losses: Vector, alpha: float) -> tuple[Vector, Vector]:
    c, delta = [], []
    for norms, loss in zip(history, losses, strict=True):
        values = list(norms)
        window = len(values) - 1  # T
        current = sum(values[1:]) / window  # ζ_t(i)
        previous = sum(values[:-1]) / window  # ζ_t(i−1)
        if previous > 0.0:
            ratio = current / previous
        else:
            ratio = _RATIO_CAP if current > 0.0 else 1.0
        delta_t = ratio + math.log10(max(loss, _TINY))
        c.append(max(alpha * _sigmoid(math.e * delta_t - math.e) + 1.0 - alpha, 0.0))
        delta.append(delta_t)
    return c, delta


def tension_factors(history: np.ndarray, losses: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``(c, δ)`` from an m × (T+1) history of gradient norms (oldest first) and the current losses."""
    c, delta = _factors(np.asarray(history, dtype=np.float64).tolist(), np.asarray(losses, dtype=np.float64).tolist(),
                        float(alpha))
    return np.array(c), np.array(delta)


def _angles(gramian: Matrix, weights: Vector) -> Vector:
    gw = _times(gramian, weights)
    vv = max(_dot(weights, gw), 0.0)
    # ||v||² from a float32 Gramian carries ~1e-7·(Σ|w_t|·||g_t||)² of rounding, so a v_n shorter than
    # _UNRESOLVED_STEP of that bound has no direction to measure: a zero step (CAGrad's weights shrunk to sum 0
    # on identical gradients) read 17-180° (a helper's audit). It counts as zero: 90°.
    bound = sum(abs(w) * math.sqrt(max(row[t], 0.0)) for t, (w, row) in enumerate(zip(weights, gramian, strict=True)))
    if vv <= (_UNRESOLVED_STEP * bound) ** 2:
        vv = 0.0
    angles = []
    for t, gw_t in enumerate(gw):
        denominator = math.sqrt(max(gramian[t][t], 0.0) * vv)
        cos = gw_t / denominator if denominator > 0.0 else 0.0
        angles.append(math.degrees(math.acos(min(1.0, max(-1.0, cos)))))
    return angles


class Tensioner(Direction):
    """Wraps a base :class:`Direction` and applies the task tensioners (see the module docstring)."""

    def __init__(self, base: Direction, formulation: str = "thesis", T: int = 10, alpha: float = 0.3) -> None:
        if formulation not in FORMULATIONS:
            raise MamoError(
                f"unknown tensioner formulation '{formulation}' (direction.tensioner.formulation); "
                f"use one of off, {', '.join(FORMULATIONS)}."
            )
        if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_WINDOW:
            raise MamoError(f"direction.tensioner.T must be an integer in [1, {MAX_WINDOW:,}], got {T!r}; set e.g. 10.")
        if not (finite_number(alpha) and alpha >= 0.0):
            raise MamoError(f"direction.tensioner.alpha must be a finite number ≥ 0, got {alpha!r}; set e.g. 0.3.")
        self.base = base
        self.formulation = formulation
        self.T = T
        self.alpha = float(alpha)
        self.non_conflicting = base.non_conflicting  # the shrink keeps every task the base kept
        self._pull = FORMULATIONS[formulation]
        self._off = _OFF_AT_ZERO_ALPHA[formulation] and self.alpha == 0.0
        self._history: list[deque[float]] = []
        self.iteration = 0

    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        weights, info = self.weigh_lists(gramian.tolist(), losses.tolist())
        return np.array(weights), info

    def weigh_lists(self, G: Matrix, losses: Vector) -> tuple[Vector, Info]:
        base_weights, base_info = self.base.weigh_lists(G, losses)
        m = len(G)
        self._record([math.sqrt(max(G[t][t], 0.0)) for t in range(m)])
        info: Info = {f"base_{key}": value for key, value in base_info.items()}
        info["base_weights"] = base_weights
        active = len(self._history[0]) == self.T + 1
        weights = base_weights.tolist() if isinstance(base_weights, np.ndarray) else list(base_weights)
        c = delta = [0.0] * m
        shrink = 0.0
        if active:
            c, delta = _factors(self._history, losses, self.alpha)
            if not self._off:
                weights, shrink = self._tension(G, weights, c)
        info.update(c=c, delta=delta, angle=partial(_angles, G, weights), shrink=shrink, active=float(active))
        return weights, info

    def _tension(self, gramian: Matrix, weights: Vector, c: Vector) -> tuple[Vector, float]:
        gw = _times(gramian, weights)
        step = self._pull(gramian, weights, gw, c, self.alpha)
        g_step = _times(gramian, step)
        floor = -math.inf if self.non_conflicting else -_PROTECT * max(gramian[t][t] for t in range(len(gramian)))
        shrink = 1.0
        for gw_t, gs_t in zip(gw, g_step, strict=True):
            if gw_t >= floor and gs_t < 0.0:
                shrink = min(shrink, max(gw_t, 0.0) / -gs_t)
        return [w + shrink * s for w, s in zip(weights, step, strict=True)], shrink

    def _record(self, norms: list[float]) -> None:
        if not self._history:
            self._history = [deque(maxlen=self.T + 1) for _ in norms]
        if len(self._history) != len(norms):
            raise MamoError(f"the tensioner holds a history of {len(self._history)} tasks, got {len(norms)}; make "
                            "a new direction (or call its reset()) when the tasks change.")
        for queue, norm in zip(self._history, norms, strict=True):
            queue.append(norm)
        self.iteration += 1

    def state_dict(self) -> dict:
        return {
            "norms": [list(queue) for queue in self._history],
            "iteration": self.iteration,
            "base": self.base.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._history = [deque((float(v) for v in norms), maxlen=self.T + 1) for norms in state["norms"]]
        self.iteration = int(state["iteration"])
        self.base.load_state_dict(state.get("base", {}))

    def reset(self) -> None:
        self._history = []
        self.iteration = 0
        self.base.reset()

    def __repr__(self) -> str:
        return f"Tensioner({self.base!r}, formulation={self.formulation!r}, T={self.T}, alpha={self.alpha})"
