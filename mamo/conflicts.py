"""Conflict statistics (MAMO Eq 9–13) and the thresholds that pick where GMKs grow (DESIGN §2).

Per mini-batch and shared cell ℓ, the cosine between tasks i and j is read off the cell's Gram block
``G^ℓ = J_ℓ J_ℓᵀ`` that the training step already computed for the direction, so counting conflicts costs
no extra backward pass. Over a detection round, :class:`ConflictStats` keeps per (cell, pair) the number of
mini-batches with a negative cosine (Q), the cosine sum (for the mean) and a histogram of cosines.
Thresholds are entries of :data:`THRESHOLDS`, picked by name (``global``, ``layer``, ``topk:K``).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable

import networkx as nx
import numpy as np
import torch

from mamo import graph as g
from mamo.directions.base import NEGLIGIBLE_SQUARED_NORM
from mamo.errors import MamoError

# 20 bins of width 0.1 over [-1, 1]; k / 10 is the double nearest each edge (np.linspace's 0.1 was a hair above).
HISTOGRAM_EDGES = np.arange(-10, 11) / 10
_EDGES = HISTOGRAM_EDGES.tolist()
Pair = tuple[str, str]
Position = tuple[Pair, int]


class ConflictStats:
    """Conflict counts, mean cosines and cosine histograms of one detection round.

    ``counts[ℓ, i, j]`` (symmetric, zero diagonal) is Q of pair {i, j} at cell ℓ; ``cosine_sums`` over
    ``measured`` (the mini-batches in which both tasks had a non-zero gradient there) give the mean;
    ``histograms[ℓ, p]`` counts cosines of pair ``pairs[p]`` per bin of :data:`HISTOGRAM_EDGES`. A mini-batch
    in which either task's gradient at a cell is zero has no cosine there: it is neither a conflict nor an
    agreement and stays out of the mean and the histogram. Cells without parameters keep zeros and are never
    candidates.
    """

    def __init__(self, tasks: list[str], num_cells: int, cell_params: list[int]):
        self.tasks = list(tasks)
        self.pairs: list[Pair] = list(itertools.combinations(self.tasks, 2))
        self.num_cells = num_cells
        self.cell_params = list(cell_params)
        m = len(self.tasks)
        self.counts = np.zeros((num_cells, m, m), dtype=np.int64)
        self.cosine_sums = np.zeros((num_cells, m, m))
        self.measured = np.zeros((num_cells, m, m), dtype=np.int64)
        self.histograms = np.zeros((num_cells, len(self.pairs), len(HISTOGRAM_EDGES) - 1), dtype=np.int64)
        self.steps = 0

    def __setstate__(self, state: dict) -> None:
        # A round checkpointed before `measured` existed counted every mini-batch, a zero gradient as cosine 0.
        if "measured" not in state:
            m = len(state["tasks"])
            state["measured"] = np.full((state["num_cells"], m, m), state["steps"], dtype=np.int64)
        self.__dict__.update(state)

    @classmethod
    def for_graph(cls, graph: nx.DiGraph) -> ConflictStats:
        """Empty statistics for every cell and task pair of ``graph``."""
        return cls(g.task_names(graph), g.num_cells(graph), graph.graph["cell_params"])

    def update(self, node_gramians: dict[str, torch.Tensor]) -> None:
        """Add one mini-batch: ``node_gramians`` maps graph node ids to their m×m Gram blocks."""
        if not node_gramians:
            return
        self.steps += 1
        m = len(self.tasks)
        # Python floats, not numpy on m×m arrays: numpy's per-call cost made this 0.2 ms of a 5 ms LeNet step
        # (three cells; measured inside the step). Same arithmetic, same results.
        for cell in range(self.num_cells):
            block = node_gramians.get(g.cell_id(cell))
            if block is None:
                continue
            gram = block.tolist()
            # A gradient below 1e-15 in norm is a zero one here too, as for the directions: its float32 Gram
            # entries are subnormal sums that gave mean cosines of 1.0007 and 2.66 for parallel gradients.
            norms = [math.sqrt(gram[t][t]) if gram[t][t] >= NEGLIGIBLE_SQUARED_NORM else 0.0 for t in range(m)]
            sums, counts, histogram = self.cosine_sums[cell], self.counts[cell], self.histograms[cell]
            measured = self.measured[cell]
            for t in range(m):  # the diagonal counts the mini-batches in which the task's own gradient was non-zero
                if norms[t] > 0.0:
                    sums[t, t] += 1.0
                    measured[t, t] += 1
            for p, (i, j) in enumerate(itertools.combinations(range(m), 2)):
                denominator = norms[i] * norms[j]
                if denominator == 0.0:  # the cosine of a zero gradient is undefined, not 0: leave it out
                    continue
                # Clamped: float32 rounding puts a parallel pair's cosine a hair outside [-1, 1].
                upper = min(max(gram[i][j] / denominator, -1.0), 1.0)
                lower = min(max(gram[j][i] / denominator, -1.0), 1.0)
                measured[i, j] += 1
                measured[j, i] += 1
                sums[i, j] += upper
                sums[j, i] += lower
                counts[i, j] += upper < 0.0
                counts[j, i] += lower < 0.0
                histogram[p, min(max(bisect.bisect_right(_EDGES, upper) - 1, 0), len(_EDGES) - 2)] += 1

    def mean_cosine(self) -> np.ndarray:
        """(L, m, m) mean cosine over the round's measured mini-batches (0 where none was measured)."""
        return self.cosine_sums / np.maximum(self.measured, 1)

    def usable_cells(self) -> list[int]:
        """The cells with parameters: the only ones whose gradients can be measured."""
        return [c for c in range(self.num_cells) if self.cell_params[c] > 0]

    def silent_tasks(self) -> list[str]:
        """The tasks whose gradient was zero at every cell with parameters in every mini-batch of the round (a
        constant target, a head that passes no gradient): none of their pairs could be measured."""
        usable = self.usable_cells()
        if self.steps == 0 or not usable:
            return []
        return [task for t, task in enumerate(self.tasks) if not any(self.measured[c, t, t] for c in usable)]

    def conflict_count(self, position: Position) -> int:
        """Q of MAMO Algorithm 1: mini-batches in which the pair at ``position`` had a negative cosine."""
        (a, b), cell = position
        return int(self.counts[cell, self.tasks.index(a), self.tasks.index(b)])

    def to_dict(self) -> dict:
        return {
            "tasks": self.tasks,
            "steps": self.steps,
            "counts": self.counts.tolist(),
            "mean_cosine": self.mean_cosine().round(6).tolist(),
            "measured": self.measured.tolist(),
            "histogram_edges": HISTOGRAM_EDGES.tolist(),
            "histograms": {f"{a}+{b}": self.histograms[:, p].tolist() for p, (a, b) in enumerate(self.pairs)},
        }


# ------------------------------------------------------------------------------------------------ thresholds


def _global(stats: ConflictStats, candidates: list[Position], k: int) -> list[Position]:
    values = [stats.conflict_count(p) for p in candidates]
    nonzero = [v for v in values if v > 0]
    if not nonzero:
        return []
    average = sum(nonzero) / len(nonzero)
    return [p for p, v in zip(candidates, values, strict=True) if v > 0 and v >= average]


def _layer(stats: ConflictStats, candidates: list[Position], k: int) -> list[Position]:
    chosen = []
    for cell in sorted({c for _, c in candidates}):
        chosen += _global(stats, [p for p in candidates if p[1] == cell], k)
    return chosen


def _topk(stats: ConflictStats, candidates: list[Position], k: int) -> list[Position]:
    # Stable sort: ties keep the candidates' order (shallow cells first, pairs in task order).
    ranked = sorted((p for p in candidates if stats.conflict_count(p) > 0), key=lambda p: -stats.conflict_count(p))
    # A pair's branch runs from its first active cell to the output (DESIGN §3): a slot is a pair, at the
    # shallowest of its ranked cells. A deeper position of a chosen pair grows nothing, and a shallower one
    # replaces the pair's cell (the deeper one would then grow nothing); neither takes another of the K slots.
    first_cell: dict[Pair, int] = {}
    for pair, cell in ranked:
        if len(first_cell) == k:
            break
        first_cell[pair] = min(cell, first_cell.get(pair, cell))
    return list(first_cell.items())


THRESHOLDS: dict[str, Callable[[ConflictStats, list[Position], int], list[Position]]] = {
    "global": _global,
    "layer": _layer,
    "topk": _topk,
}


def parse_threshold(text: str) -> tuple[str, int]:
    """``global`` | ``layer`` | ``topk:K`` -> (name, K); a clear error for anything else."""
    name, _, arg = text.partition(":")
    if name not in THRESHOLDS or (name == "topk") != bool(arg):
        raise MamoError(f"unknown search.threshold '{text}'; use global, layer or topk:K (e.g. topk:3).")
    k = 0
    if arg:
        if not arg.isdigit() or int(arg) < 1:
            raise MamoError(f"search.threshold '{text}' needs a positive integer K; write e.g. topk:3.")
        k = int(arg)
    return name, k


def select_positions(stats: ConflictStats, candidates: list[Position], threshold: str) -> list[Position]:
    """The candidate positions the threshold activates (none if every Q is zero)."""
    name, k = parse_threshold(threshold)
    usable = [p for p in candidates if stats.cell_params[p[1]] > 0]
    return THRESHOLDS[name](stats, usable, k)
