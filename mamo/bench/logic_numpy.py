"""The logic benchmark's network and mamo's m = 2 directions in numpy, with many runs trained in lockstep.

Thousands of runs of a 12-parameter network would be all Python overhead one at a time, so every array here
keeps the runs on its last axis and each small-dimension operation is one pass over R numbers.
:class:`VectorMLP` is the logic preset's network with torch's SGD update, :class:`VectorDirection` the weights
of :mod:`mamo.directions` (and the thesis' two variants) for m = 2; tests/test_bench.py checks both against
``TrainStep`` and the direction objects. The protocol and tables are in :mod:`mamo.bench.logic`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.special import expit

MOMENTUM = 0.9  # the reference code's SGD momentum

# ------------------------------------------------------------------------------------------------ directions


def _pair(g11: np.ndarray, g12: np.ndarray, g22: np.ndarray) -> np.ndarray:
    """Weight of the first gradient in the min-norm point of [g1, g2] (mamo.directions.min_norm._pair)."""
    den = g11 + g22 - 2.0 * g12
    ok = den > 0.0
    return np.where(ok, np.clip((g22 - g12) / np.where(ok, den, 1.0), 0.0, 1.0), 0.5)


def _mgda(G: np.ndarray) -> np.ndarray:
    a = _pair(G[0, 0], G[0, 1], G[1, 1])
    return np.stack([a, 1.0 - a])


def _central(G: np.ndarray) -> np.ndarray:
    n = np.sqrt(np.maximum(np.stack([G[0, 0], G[1, 1]]), 0.0))
    alive = n > 0.0
    safe = np.where(alive, n, 1.0)
    k = _pair(G[0, 0] / (safe[0] * safe[0]), G[0, 1] / (safe[0] * safe[1]), G[1, 1] / (safe[1] * safe[1]))
    raw = np.stack([k, 1.0 - k]) / safe
    return np.where(alive.all(axis=0), raw / raw.sum(axis=0), alive.astype(float))  # one alive: all weight on it


def _single(task: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda G: np.repeat(np.eye(2)[:, task : task + 1], G.shape[-1], axis=1)


def _mgda_reference(G: np.ndarray) -> np.ndarray:
    """The m = 2 answer of the min-norm solver the thesis' code ships (Sener & Koltun's): exact inside the
    segment, but 0.999 / 0.001 in place of a vertex's 1 / 0, so a solved task never takes all the weight."""
    g11, g12, g22 = G[0, 0], G[0, 1], G[1, 1]
    a = np.where(g12 >= g11, 0.999, np.where(g12 >= g22, 0.001, _pair(g11, g12, g22)))
    return np.stack([a, 1.0 - a])


BASES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "equal": lambda G: np.ones((2, G.shape[-1])),
    "mean": lambda G: np.full((2, G.shape[-1]), 0.5),  # the thesis' uniform weighting
    "mgda": _mgda,
    "mgda-reference": _mgda_reference,
    "central": _central,
    "single:xor": _single(0),
    "single:and": _single(1),
}


NON_CONFLICTING = {"mgda", "central"}  # the bases whose Direction objects promise g_t · d ≥ 0


def _toward(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    return a - a.sum(axis=0) * w  # Σ_t a_t (e_t − w)


def _thesis_pull(G: np.ndarray, w: np.ndarray, gw: np.ndarray, c: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    # float64 Gramians here: resolvable far below the step's float32 1e-5, hence 1e-8.
    diag = np.stack([G[0, 0], G[1, 1]])
    vv = (w * gw).sum(axis=0)
    sq = diag - 2.0 * gw + vv
    keep = sq > 1e-8 * (diag + vv)
    general = _toward(np.where(keep, c / np.sqrt(np.where(keep, sq, 1.0)), 0.0), w)
    # On the simplex (mgda, central): unit(g_1 − u_1) = unit(g_1 − g_2) = −unit(g_2 − u_2), as the Tensioner's
    # _thesis_pull_on_simplex, also at a vertex.
    spread = G[0, 0] - 2.0 * G[0, 1] + G[1, 1]
    resolved = spread > 1e-8 * (G[0, 0] + G[1, 1])
    along = np.where(resolved, (c[0] - c[1]) / np.sqrt(np.where(resolved, spread, 1.0)), 0.0)
    simplex = (w >= 0.0).all(axis=0) & (np.abs(w.sum(axis=0) - 1.0) <= 1e-9)
    return np.where(simplex, np.stack([along, -along]), general)


PULLS = {"thesis": _thesis_pull, "relative": lambda G, w, gw, c, alpha: _toward(c - (1.0 - alpha), w)}
OFF_AT_ZERO_ALPHA = {"thesis": True, "relative": False}  # as mamo.directions.tensioner


class VectorDirection:
    """Per-run weights (2, R) of a base direction, optionally tensioned, from 2×2 Gramians (2, 2, R) and
    losses (2, R).

    Mirrors :class:`mamo.directions.Tensioner` step for step (history of T + 1 norms, ζ, δ, c, the pull, the
    shrink that keeps ``g_t · v_n ≥ 0``), with one α per run. Its Gramians are float64, exact for a
    12-parameter network, so its two tolerances sit at float64's scale (1e-8, 1e-9) where the Tensioner's
    sit at the training step's float32 Gramian (1e-5, 1e-6).
    """

    def __init__(self, base: str, formulation: str = "off", T: int = 10, alpha: np.ndarray | None = None,
                 runs: int = 1):
        self.base, self.formulation, self.T = BASES[base], formulation, T
        self.non_conflicting = base in NON_CONFLICTING  # every task constrained, as Tensioner does
        self.alpha = np.zeros(runs) if alpha is None else np.asarray(alpha, dtype=float)
        self.history = np.zeros((2, T + 1, runs))
        self.calls = 0

    def __call__(self, G: np.ndarray, losses: np.ndarray) -> np.ndarray:
        w = self.base(G)
        if self.formulation == "off":
            return w
        diag = np.stack([G[0, 0], G[1, 1]])
        self.history[:, :-1] = self.history[:, 1:]
        self.history[:, -1] = np.sqrt(np.maximum(diag, 0.0))
        self.calls += 1
        if self.calls < self.T + 1:
            return w
        current = self.history[:, 1:].sum(axis=1) / self.T
        previous = self.history[:, :-1].sum(axis=1) / self.T
        ratio = np.where(previous > 0.0, current / np.where(previous > 0.0, previous, 1.0),
                         np.where(current > 0.0, 1e6, 1.0))
        delta = ratio + np.log10(np.maximum(losses, np.finfo(np.float64).tiny))
        c = np.maximum(self.alpha * expit(math.e * delta - math.e) + 1.0 - self.alpha, 0.0)
        gw = (G * w[None]).sum(axis=1)
        step = PULLS[self.formulation](G, w, gw, c, self.alpha)
        g_step = (G * step[None]).sum(axis=1)
        floor = -np.inf if self.non_conflicting else -1e-9 * diag.max(axis=0)  # float64: 1e-9, not 1e-6
        cand = (gw >= floor) & (g_step < 0.0)
        limit = np.where(cand, np.maximum(gw, 0.0) / np.where(cand, -g_step, 1.0), np.inf)
        shrink = np.minimum(limit.min(axis=0), 1.0)
        off = (self.alpha == 0.0) & OFF_AT_ZERO_ALPHA[self.formulation]
        return np.where(off, w, w + shrink * step)

    def select(self, keep: np.ndarray) -> None:
        self.alpha, self.history = self.alpha[keep], self.history[..., keep]



# ----------------------------------------------------------------------------------------------- network


class VectorMLP:
    """R copies of the logic network (runs on the last axis of every parameter), each with its own learning
    rate, trained by SGD with momentum exactly as torch.optim.SGD does (dampening 0, no Nesterov).

    The shared layer's update is the direction's combination of the per-task gradients (flattened weight then
    bias, as TrainStep flattens them); each head takes its own task's gradient.
    """

    def __init__(self, params: dict[str, np.ndarray], lr: np.ndarray, momentum: float = MOMENTUM):
        self.params = {key: np.array(value, dtype=float) for key, value in params.items()}
        self.buffers = {key: np.zeros_like(value) for key, value in self.params.items()}
        self.lr, self.momentum = np.asarray(lr, dtype=float), momentum

    def gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Losses (m, R), shared Jacobians (m, 6, R) and head gradients for inputs (B, 2, R), targets (B, m, R)
        (any number of tasks m: the ``logic3`` benchmark has three)."""
        W, b, V, a = (self.params[k] for k in "WbVa")
        h = expit((x[:, None] * W[None]).sum(axis=2) + b)  # (B, hidden, R)
        residual = (h[:, None] * V[None]).sum(axis=2) + a - y  # (B, task, R)
        losses = (residual * residual).mean(axis=0)
        r = residual * (2.0 / x.shape[0])
        dz = r[:, :, None] * V[None] * (h * (1.0 - h))[:, None]  # (B, task, hidden, R)
        dW = (dz[:, :, :, None] * x[:, None, None]).sum(axis=0)  # (task, out, in, R)
        jacobian = np.concatenate([dW.reshape(y.shape[1], 4, -1), dz.sum(axis=0)], axis=1)
        heads = {"V": (r[:, :, None] * h[:, None]).sum(axis=0), "a": r.sum(axis=0)}
        return losses, jacobian, heads

    def step(self, x: np.ndarray, y: np.ndarray, direction: VectorDirection) -> np.ndarray:
        losses, J, grads = self.gradients(x, y)
        gramian = (J[:, None] * J[None]).sum(axis=2)
        shared = (direction(gramian, losses)[:, None] * J).sum(axis=0)  # (6, R)
        grads["W"], grads["b"] = shared[:4].reshape(2, 2, -1), shared[4:]
        for key, grad in grads.items():
            buffer = self.buffers[key]
            buffer *= self.momentum
            buffer += grad
            self.params[key] -= self.lr * buffer
        return losses

    def select(self, keep: np.ndarray) -> None:
        self.params = {k: v[..., keep] for k, v in self.params.items()}
        self.buffers = {k: v[..., keep] for k, v in self.buffers.items()}
        self.lr = self.lr[keep]
