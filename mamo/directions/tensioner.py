"""Task tensioners (thesis Eq 4.8–4.12, Algorithms 1–2): pull a base direction toward tasks that fall behind.

Per task t, the tensioner keeps the last T + 1 gradient norms ``||g_t|| = sqrt(G_tt)``. From call T + 1 on:

* ``ζ_t(i)`` is the mean of the last T norms (the current one included), ``ζ_t(i−1)`` the mean of the T before
  the current one (Eq 4.9);
* ``δ_t = ζ_t(i)/ζ_t(i−1) + log10(L_t)`` (Eq 4.10);
* ``c_t = α / (1 + exp(−e·δ_t + e)) + 1 − α`` (Eq 4.11), clipped at 0 (only matters for α > 1).

For the first T calls it is inert (the base weights are returned unchanged). Two formulations of the pull,
both expressed on weights (``v = wᵀJ``, ``g_t − v = (e_t − w)ᵀJ``, every norm from G):

* ``thesis``: ``v_n = v + Σ_t c_t (g_t − v)/||g_t − v||`` (Eq 4.12 and the reference implementation). A term
  whose ``g_t`` is within 1e-4 (relative) of v is dropped: its unit vector is not resolvable from a float32
  Gramian, and v already points along that gradient. α = 0 is treated as off, as the thesis' tables do.
* ``relative``: ``v_n = v + Σ_t (c_t − (1 − α)) (g_t − v)``: α = 0 gives v exactly, and the pull is a
  fraction of the distance to each gradient, so it scales with the gradients.

Both then keep ``g_t · v_n ≥ 0``: with ``Δw`` the pull, the largest ``s ∈ [0, 1]`` such that
``(G(w + sΔw))_t ≥ 0`` for every task the base direction does not conflict with (``(Gw)_t ≥ 0``, up to
1e-9 of the largest squared norm) is applied. A task the base direction already conflicts with (possible for
equal, pcgrad, cagrad or normalised mgda) is not constrained, since no s could fix it at s = 0.

``info``: ``c``, ``delta`` (zeros while inert), ``angle`` (degrees between each ``g_t`` and ``v_n``; 90 where
either is zero), ``shrink`` (the applied s; 0 while inert or off), ``active`` (1 once T + 1 norms are stored),
``base_weights``, and the base's own info under ``base_<key>``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import numpy as np
from scipy.special import expit

from mamo.directions.base import Direction, Info
from mamo.errors import MamoError

_RESOLVE = 1e-8  # ||g_t − v||² below this fraction of (||g_t||² + ||v||²): the thesis term is dropped
_PROTECT = 1e-9  # (Gw)_t ≥ −_PROTECT·max_t G_tt counts as "the base does not conflict with task t"
_RATIO_CAP = 1e6  # ζ(i)/ζ(i−1) when ζ(i−1) = 0 < ζ(i); the sigmoid has long saturated there


def _thesis_pull(gramian: np.ndarray, weights: np.ndarray, gw: np.ndarray, c: np.ndarray, alpha: float) -> np.ndarray:
    vv = float(weights @ gw)
    diag = gramian.diagonal()
    sq_dist = diag - 2.0 * gw + vv  # ||g_t − v||²
    keep = sq_dist > _RESOLVE * (diag + vv)
    return np.where(keep, c / np.sqrt(np.where(keep, sq_dist, 1.0)), 0.0)


def _relative_pull(gramian: np.ndarray, weights: np.ndarray, gw: np.ndarray, c: np.ndarray, alpha: float) -> np.ndarray:
    return c - (1.0 - alpha)


# Coefficient a_t of (g_t − v) in v_n − v, so that Δw = a − (Σa)·w.
FORMULATIONS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]] = {
    "thesis": _thesis_pull,
    "relative": _relative_pull,
}

# α at which a formulation is switched off entirely (the thesis' tables use α = 0 for "no tensioner");
# "relative" needs no entry: its pull is exactly zero at α = 0.
_OFF_AT_ZERO_ALPHA = {"thesis": True, "relative": False}


def tension_factors(history: np.ndarray, losses: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``(c, δ)`` from an m × (T+1) history of gradient norms (oldest first) and the current losses."""
    window = history.shape[1] - 1  # T
    current = history[:, 1:].sum(axis=1) / window  # ζ_t(i)
    previous = history[:, :-1].sum(axis=1) / window  # ζ_t(i−1)
    safe = np.where(previous > 0.0, previous, 1.0)
    ratio = np.where(previous > 0.0, current / safe, np.where(current > 0.0, _RATIO_CAP, 1.0))
    delta = ratio + np.log10(np.maximum(losses, np.finfo(np.float64).tiny))
    c = alpha * expit(math.e * delta - math.e) + 1.0 - alpha
    return np.maximum(c, 0.0), delta


def _angles(gramian: np.ndarray, weights: np.ndarray) -> np.ndarray:
    gw = gramian @ weights
    denominator = np.sqrt(np.maximum(gramian.diagonal(), 0.0) * max(float(weights @ gw), 0.0))
    cos = np.where(denominator > 0.0, gw / np.where(denominator > 0.0, denominator, 1.0), 0.0)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


class Tensioner(Direction):
    """Wraps a base :class:`Direction` and applies the task tensioners (see the module docstring)."""

    def __init__(self, base: Direction, formulation: str = "relative", T: int = 10, alpha: float = 0.3) -> None:
        if formulation not in FORMULATIONS:
            raise MamoError(
                f"unknown tensioner formulation '{formulation}' (direction.tensioner.formulation); "
                f"use one of off, {', '.join(FORMULATIONS)}."
            )
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise MamoError(f"direction.tensioner.T must be an integer ≥ 1, got {T!r}; set e.g. 10.")
        if not (math.isfinite(alpha) and alpha >= 0.0):
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
        weights, base_info = self.base.weigh(gramian, losses)
        m = gramian.shape[0]
        norms = np.sqrt(np.maximum(gramian.diagonal(), 0.0))
        self._record(norms.tolist())
        info: Info = {f"base_{key}": value for key, value in base_info.items()}
        info["base_weights"] = weights
        active = len(self._history[0]) == self.T + 1
        c = delta = np.zeros(m)
        final, shrink = weights, 0.0
        if active:
            c, delta = tension_factors(np.array(self._history), losses, self.alpha)
            if not self._off:
                final, shrink = self._tension(gramian, weights, c)
        info.update(c=c, delta=delta, angle=_angles(gramian, final), shrink=shrink, active=float(active))
        return final, info

    def _tension(self, gramian: np.ndarray, weights: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, float]:
        gw = gramian @ weights
        coefficients = self._pull(gramian, weights, gw, c, self.alpha)
        step = coefficients - coefficients.sum() * weights  # Σ_t a_t (e_t − w)
        g_step = gramian @ step
        floor = -_PROTECT * float(gramian.diagonal().max())
        shrink = 1.0
        for t in np.flatnonzero((gw >= floor) & (g_step < 0.0)).tolist():
            shrink = min(shrink, max(float(gw[t]), 0.0) / -float(g_step[t]))
        return weights + shrink * step, shrink

    def _record(self, norms: list[float]) -> None:
        if not self._history:
            self._history = [deque(maxlen=self.T + 1) for _ in norms]
        if len(self._history) != len(norms):
            raise ValueError(f"the tensioner holds a history of {len(self._history)} tasks, got {len(norms)}")
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
