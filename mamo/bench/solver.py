"""The exact min-norm solver's micro-benchmark, the last table of ``mamo bench step``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from mamo.directions import MGDA, min_norm_weights


def solver_table(quick: bool) -> tuple[dict, float]:
    """Exact min-norm solve and the whole MGDA direction call on random Gramians (gradient norms spread 20×)."""
    rng = np.random.default_rng(0)
    instances, calls = (5, 5) if quick else (20, 50)
    rows, at_ten = [], float("nan")
    for m in (2, 3, 5, 10):
        solve, call = [], []
        direction = MGDA()
        for _ in range(instances):
            a = rng.standard_normal((m, 64)) * rng.uniform(1.0, 20.0, (m, 1))
            gram = a @ a.T
            gram_t, losses = torch.tensor(gram, dtype=torch.float32), torch.rand(m)
            solve.append(_best_us(lambda gram=gram: min_norm_weights(gram), calls))
            call.append(_best_us(lambda d=direction, g=gram_t, losses=losses: d(g, losses), calls))
        rows.append([m, statistics.median(solve), max(solve), statistics.median(call), max(call)])
        at_ten = statistics.median(solve) if m == 10 else at_ten
    table = {"title": "Exact min-norm solve (µs; per instance the best of 5 means of repeated calls)",
             "columns": ["m", "solve median", "solve max", "MGDA call median", "MGDA call max"], "rows": rows}
    return table, at_ten


def _best_us(fn: Callable[[], object], calls: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6
