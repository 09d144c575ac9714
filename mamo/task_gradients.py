"""Per-task gradients of the shared parameters: which parameters are shared, how the gradients are computed,
and how they are held for the Gramian and the weighted combination (DESIGN §4).

Which parameters are shared comes from the graph: a parameter is shared when two or more tasks reach it
(trunk cells, GMK branches), otherwise it belongs to one task and takes that task's gradient alone.

How the m gradients are computed is a *gradient path* (:data:`GRADIENT_PATHS`): ``loop`` (m
``autograd.grad`` calls) or ``batched`` (one backward over the m one-hot cotangents under
``torch.func.vmap``; ``auto`` picks by device, size, number of tasks and precision, see :data:`BATCHED_PATH`).
The path hands each task's gradients of the shared parameters (``None`` where the task
does not reach one) to a layout.

How they are held is a *layout* (:data:`LAYOUTS`; ``auto`` picks by device, size and number of tasks, see
:data:`PARAMETERS_LAYOUT`):

- ``flat``: copied into one preallocated m × P matrix J, so that the Gramian is one product J Jᵀ and the
  combination one ``wᵀJ``: few, large kernels, which is what a GPU wants.
- ``parameters``: left where autograd put them. The Gramian is a sum of dot products over parameters (in
  cache-sized chunks) and the combination is written over the first task's gradients with ``torch._foreach``
  operations. On a CPU this saves the m copies into J, a pass of the combination and J's memory once the
  shared part no longer fits the cache, while the m(m+1)/2 dot products stay cheaper than the copies
  (ResNet-18, m = 3).

Both give the Gramian as per-node blocks while conflict statistics are collected (the statistics read them),
so counting conflicts costs no extra backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from mamo import graph as g
from mamo.errors import MamoError
from mamo.model import MamoNet

Grads = tuple[torch.Tensor | None, ...]


class ParameterPartition:
    """The model's parameters split by task set; each shared node's parameters as an index range and as the
    column slice of that node in a flat J."""

    def __init__(self, model: MamoNet):
        self.tasks = list(model.tasks)
        sets = g.task_sets(model.graph)
        self.shared: list[torch.nn.Parameter] = []
        self.node_slices: dict[str, slice] = {}
        self.node_params: dict[str, range] = {}
        self.specific: dict[str, list[torch.nn.Parameter]] = {task: [] for task in self.tasks}
        offset = 0
        for node, named in model.node_parameters().items():
            params = [p for _, p in named if p.requires_grad]
            if len(sets[node]) >= 2:
                size = sum(p.numel() for p in params)
                if size:
                    self.node_slices[node] = slice(offset, offset + size)
                    self.node_params[node] = range(len(self.shared), len(self.shared) + len(params))
                    self.shared.extend(params)
                    offset += size
            elif len(sets[node]) == 1:
                self.specific[next(iter(sets[node]))].extend(params)
        self.size = offset
        # Each task's autograd inputs: the shared parameters first, then its own.
        self.inputs = [self.shared + self.specific[task] for task in self.tasks]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of the last dimension of ``flat`` (..., P) shaped like each shared parameter."""
        out, offset = [], 0
        lead = flat.shape[:-1]
        for param in self.shared:
            out.append(flat[..., offset : offset + param.numel()].view(*lead, *param.shape))
            offset += param.numel()
        return out


# ------------------------------------------------------------------------------------------------------ layouts
# A layout takes each task's gradients of the shared parameters (``load``, or ``load_batched`` for all tasks at
# once), then gives the Gramian (``gramians``: one block, or one per shared node) and the weighted combination
# (``combine``: one gradient per shared parameter, to become its ``.grad``).

GRAM_CHUNK: dict[str, int] = {"cpu": 1 << 15}  # flat: Gram chunk width (see gram_block); absent: one matmul
DOT_CHUNK: dict[str, int] = {"cpu": 1 << 16}  # parameters: dot-product chunk width; absent: whole parameters


def gram_block(jac: torch.Tensor, cols: slice | None, width: int | None = None,
               jac_t: torch.Tensor | None = None) -> torch.Tensor:
    """``J[:, cols] J[:, cols]ᵀ`` (``cols=None``: all of J, without indexing, 10 µs less inside a LeNet step;
    ``jac_t``, J's transposed view made once, saves making it again). With ``width`` (CPU), as one batched product
    of column chunks of that width summed: a single (m × n)(n × m) product streams n-long rows through a tiny
    output and runs on one thread; the chunks fit the cache and bmm spreads them over threads (ResNet-18, m = 3:
    docs/performance.md)."""
    piece = jac if cols is None else jac[:, cols]
    m, n = piece.shape
    if not width or n < 2 * width:
        return torch.mm(piece, jac_t if cols is None and jac_t is not None else piece.T)
    k = n // width
    chunks = piece[:, : k * width].view(m, k, width).transpose(0, 1)  # (k, m, width), a view
    tail = piece[:, k * width :]
    return torch.bmm(chunks, chunks.transpose(1, 2)).sum(0).addmm_(tail, tail.T)


def _copy_into(views: list[torch.Tensor], grads: Grads) -> None:
    for view, grad in zip(views, grads, strict=True):
        if grad is None:  # a GMK of pair {i, j} does not reach the other tasks' losses
            view.zero_()
        else:
            view.copy_(grad)


class FlatLayout:
    """J (m × P) allocated once and reused every step; ``grads`` are per-parameter views of the combination
    buffer, which become the shared parameters' ``.grad`` once and then see every step's wᵀJ."""

    def __init__(self, part: ParameterPartition, device: torch.device):
        m = len(part.tasks)
        self.jac = torch.empty(m, part.size, device=device)
        self.jac_t = self.jac.T  # a view, made once: both products below read it
        self.rows = [part.views(self.jac[t]) for t in range(m)]
        self.columns = part.views(self.jac)
        self.combined = torch.empty(part.size, device=device)
        self.weights = torch.empty(m, device=device)  # the combination's weights, in J's dtype, refilled per step
        self.grads = part.views(self.combined)
        self.node_slices = list(part.node_slices.values())
        self.width = GRAM_CHUNK.get(device.type)

    def load(self, t: int, grads: Grads) -> None:
        """Task t's gradients of the shared parameters, copied into row t as they arrive (so that only one
        task's fresh gradients are alive beside J)."""
        _copy_into(self.rows[t], grads)

    def load_batched(self, grads: Grads) -> None:
        """Every task's gradients at once, one (m, ...) tensor per shared parameter."""
        _copy_into(self.columns, grads)

    def gramians(self, by_node: bool) -> list[torch.Tensor]:
        return [gram_block(self.jac, cols, self.width, self.jac_t)
                for cols in (self.node_slices if by_node else [None])]

    def combine(self, weights: torch.Tensor) -> list[torch.Tensor]:
        torch.mv(self.jac_t, self.weights.copy_(weights, non_blocking=True), out=self.combined)
        return self.grads

    def snapshot(self) -> None:
        """Nothing: J and the combination buffer are the same tensors every step (see ParameterLayout's)."""

    def restore(self, saved: None) -> None:
        pass


class ParameterLayout:
    """The gradients where autograd left them: Gramian blocks as sums of chunked dot products, and the
    combination written over the first reaching task's gradient of each parameter."""

    def __init__(self, part: ParameterPartition, device: torch.device):
        m = len(part.tasks)
        self.pairs = [(i, j) for i in range(m) for j in range(i, m)]
        pair_of = {pair: n for n, pair in enumerate(self.pairs)}
        self.pair_index = torch.tensor([[pair_of[min(i, j), max(i, j)] for j in range(m)] for i in range(m)],
                                       device=device)
        self.node_params = list(part.node_params.values())
        self.shared = part.shared
        self.n_shared = len(part.shared)
        self.zero = torch.zeros((), device=device)
        self.width = DOT_CHUNK.get(device.type)
        self.rows: list[list[torch.Tensor | None]] = [[] for _ in range(m)]

    def load(self, t: int, grads: Grads) -> None:
        self.rows[t] = list(grads)

    def load_batched(self, grads: Grads) -> None:
        for t in range(len(self.rows)):
            self.rows[t] = [None if grad is None else grad[t] for grad in grads]

    def _dots(self, k: int) -> list[torch.Tensor]:
        """The m(m+1)/2 pair dot products of parameter k, chunk by chunk (each chunk's m pieces stay in cache
        while its pairs are read)."""
        flat = [None if row[k] is None else row[k].reshape(-1) for row in self.rows]
        n = next((f.numel() for f in flat if f is not None), 0)
        if not n:  # no task reaches it (an unused parameter): it adds nothing
            return [self.zero] * len(self.pairs)
        # One split per task instead of a slice per chunk (ResNet-18, m = 3, one thread: 11.5 → 10.1 ms alone).
        width = self.width if self.width and n > self.width else n
        chunks = [None if f is None else f.split(width) for f in flat]
        out = []
        for c in range((n + width - 1) // width):
            pieces = [None if split is None else split[c] for split in chunks]
            for i, j in self.pairs:
                a, b = pieces[i], pieces[j]
                out.append(self.zero if a is None or b is None else torch.dot(a, b))
        return out

    def gramians(self, by_node: bool) -> list[torch.Tensor]:
        groups = self.node_params if by_node else [range(self.n_shared)]
        sums = [torch.stack([d for k in group for d in self._dots(k)]).view(-1, len(self.pairs)).sum(0)
                for group in groups]
        return list(torch.stack(sums)[:, self.pair_index].unbind(0))

    def combine(self, weights: torch.Tensor) -> list[torch.Tensor]:
        rows, self.rows = self.rows, [[] for _ in self.rows]  # overwritten below: not to be read again
        w, m = weights.tolist(), len(rows)
        present = [[t for t in range(m) if rows[t][k] is not None] for k in range(self.n_shared)]
        reached = [k for k in range(self.n_shared) if present[k]]
        out = dict(zip(reached, _writable([rows[present[k][0]][k] for k in reached]), strict=True))
        # Parameters every task reaches: one foreach call per task; the rest (GMK branches) one by one.
        full = [k for k in reached if len(present[k]) == m]
        if full:
            _weighted_sum_([out[k] for k in full], [[rows[t][k] for k in full] for t in range(1, m)], w)
        for k in reached:
            if len(present[k]) < m:
                first, *rest = present[k]
                out[k].mul_(w[first])
                for t in rest:
                    out[k].add_(rows[t][k], alpha=w[t])
        return [out[k] if k in out else torch.zeros_like(param) for k, param in enumerate(self.shared)]

    def snapshot(self) -> list[list[torch.Tensor | None]]:
        """The per-task gradients as loaded: a step replayed from a CUDA graph writes the same tensors again
        without running :meth:`load`, so they are handed back by :meth:`restore` before :meth:`combine`."""
        return [list(row) for row in self.rows]

    def restore(self, saved: list[list[torch.Tensor | None]]) -> None:
        self.rows = [list(row) for row in saved]


SIMPLEX_SUM = 1e-7  # weights ≥ 0 summing to 1 within this are combined by lerps (the result is off by ≤ this factor)


def _weighted_sum_(acc: list[torch.Tensor], others: list[list[torch.Tensor]], weights: list[float]) -> None:
    """``acc ← weights[0]·acc + Σ_t weights[t]·others[t − 1]``, in place. Weights on the simplex (MGDA's, and
    the tensioner's while they stay ≥ 0, since its pull keeps their sum) take m − 1 lerps toward each task's
    gradient by its share of the running sum: two passes over the gradients fewer than a scale and m − 1 adds
    (ResNet-18, m = 3, one thread: 19.3 → 15.7 ms, docs/performance.md)."""
    if min(weights) >= 0.0 and abs(sum(weights) - 1.0) <= SIMPLEX_SUM:
        running = weights[0]
        for weight, other in zip(weights[1:], others, strict=True):
            running += weight
            # A zero running sum means acc's coefficient is still 0: any share works; the next non-zero weight
            # takes a share of 1 and replaces it exactly.
            torch._foreach_lerp_(acc, other, weight / running if running > 0.0 else 0.0)
        return
    torch._foreach_mul_(acc, weights[0])
    for weight, other in zip(weights[1:], others, strict=True):
        torch._foreach_add_(acc, other, alpha=weight)


def _writable(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` safe to overwrite in place: autograd may hand out expanded views (the gradient of a sum) or
    one tensor for two parameters (the gradient of ``a + b``); those are copied."""
    seen: set[int] = set()
    out = []
    for grad in grads:
        ptr = grad.data_ptr()
        if not grad.is_contiguous() or ptr in seen:
            grad = grad.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out.append(grad)
    return out


Layout = FlatLayout | ParameterLayout
LAYOUTS: dict[str, Callable[[ParameterPartition, torch.device], Layout]] = {
    "flat": FlatLayout,
    "parameters": ParameterLayout,
}


class ParametersLayoutRule(NamedTuple):
    """When ``auto`` holds the gradients per parameter: from ``min_size`` shared parameters, up to ``max_tasks``."""

    min_size: int
    max_tasks: int


# Per device; absent: always flat. cpu, measured (docs/performance.md; MGDA + tensioner ÷ the floor, the two
# layouts alternated in one process, flat → parameters): LeNet (21 k) 1.046 → 1.066 and MobileNetV3-small-050
# (272 k in 138 tensors) 1.023 → 1.037 on one thread, where J sits in cache and the per-parameter calls cost
# more than the copies; ResNet-18 (11.2 M) m = 3, medians of nine paired runs on one thread 1.070 → 1.052,
# and 1.019 / 1.041 / 1.065 → 1.012 / 1.009 / 1.052 on two, where the copies are passes over memory. The dot
# products grow with the m(m+1)/2 pairs: on two threads m = 4 1.026 → 1.035 and m = 5 1.078 / 1.089 → 1.121 /
# 1.125 (on one thread m = 5 was mixed: 1.116 → 1.067, 1.079 → 1.084). cuda: NOT measured; few large kernels
# (a copy per parameter, one product, one matrix-vector product) are expected to beat hundreds of small dot
# products there.
PARAMETERS_LAYOUT: dict[str, ParametersLayoutRule] = {"cpu": ParametersLayoutRule(min_size=1 << 20, max_tasks=3)}


# ---------------------------------------------------------------------------------------------- gradient paths


def loop_gradients(losses: list[torch.Tensor], part: ParameterPartition, layout: Layout) -> None:
    """m backward passes; task t's own parameters get their ``.grad`` on the way."""
    m, n_shared = len(losses), len(part.shared)
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, part.inputs[t], retain_graph=t < m - 1, allow_unused=True)
        layout.load(t, grads[:n_shared])
        for param, grad in zip(part.specific[part.tasks[t]], grads[n_shared:], strict=True):
            param.grad = grad


def batched_gradients(losses: list[torch.Tensor], part: ParameterPartition, layout: Layout) -> None:
    """One backward of the stacked losses over the m one-hot cotangents, batched by ``torch.func.vmap``.

    torch.func's batching rules batch convolution, batch-norm and pooling backward for real (the legacy
    ``is_grads_batched`` vmap falls back to a per-slice loop for exactly those), which is what can win on a
    GPU. The graph is retained so that a failed batched pass can still be redone by the loop (``auto``).
    """
    stacked = torch.stack(losses)
    specific = [p for task in part.tasks for p in part.specific[task]]
    owner = [t for t, task in enumerate(part.tasks) for _ in part.specific[task]]
    cotangents = torch.eye(len(losses), device=stacked.device, dtype=stacked.dtype)

    def vjp(cotangent: torch.Tensor) -> Grads:
        return torch.autograd.grad(stacked, part.shared + specific, cotangent, retain_graph=True,
                                   allow_unused=True)

    grads = torch.func.vmap(vjp)(cotangents)
    n_shared = len(part.shared)
    for param, t, grad in zip(specific, owner, grads[n_shared:], strict=True):
        param.grad = None if grad is None else grad[t]
    layout.load_batched(grads[:n_shared])


GradientPath = Callable[[list[torch.Tensor], ParameterPartition, Layout], None]
GRADIENT_PATHS: dict[str, GradientPath] = {"loop": loop_gradients, "batched": batched_gradients}


class BatchedPathRule(NamedTuple):
    """When ``auto`` batches the per-task gradients: from ``min_tasks`` tasks and ``min_size`` shared parameters."""

    min_tasks: int
    min_size: int


# Per device; absent: always the loop. Measured (docs/performance.md): on CPU batching is 1.1-1.5x slower than
# the loop. On an H200 (2026-11-26, MGDA steps, batched ÷ loop at batch 32 / 128) the step is launch-bound,
# and one vmapped backward costs about three plain ones: LeNet m = 2 1.22 / 1.15, m = 3 1.12 / 1.08, m = 5
# 0.98 / 0.95; ResNet-18 m = 2 1.29 / 1.24, m = 3 0.93 / 0.98, m = 5 0.75 / 0.76. The rule takes the clear
# wins and leaves LeNet m = 5's 2-5% alone.
BATCHED_PATH: dict[str, BatchedPathRule] = {"cuda": BatchedPathRule(min_tasks=3, min_size=1 << 20)}
# bf16 autocast: torch.func's batch-norm backward rule fails on bf16 activations with float32 weights (CPU:
# "expected scalar type BFloat16 but found Float", CUDA: "Expected grad_output to have type BFloat16"), so auto
# keeps the loop there instead of trying and falling back.
LOOP_PRECISIONS = frozenset({"bf16"})


def resolve_gradient_path(name: str, device: torch.device, size: int = 0, tasks: int = 2,
                          precision: str = "fp32") -> str:
    """The gradient path ``name`` stands for on ``device`` for ``size`` shared parameters, ``tasks`` tasks and
    the forward ``precision`` (``auto``: :data:`BATCHED_PATH`, never under :data:`LOOP_PRECISIONS`)."""
    if name == "auto":
        rule = BATCHED_PATH.get(device.type)
        batched = rule and tasks >= rule.min_tasks and size >= rule.min_size and precision not in LOOP_PRECISIONS
        return "batched" if batched else "loop"
    if name not in GRADIENT_PATHS:
        raise MamoError(f"unknown gradient path '{name}' (train.gradient_path); use auto, {', '.join(GRADIENT_PATHS)}.")
    return name


def resolve_layout(name: str, device: torch.device, size: int = 0, tasks: int = 2) -> str:
    """The layout ``name`` stands for on ``device`` for ``size`` shared parameters and ``tasks`` tasks
    (``auto``: :data:`PARAMETERS_LAYOUT`)."""
    if name == "auto":
        rule = PARAMETERS_LAYOUT.get(device.type)
        return "parameters" if rule and size >= rule.min_size and tasks <= rule.max_tasks else "flat"
    if name not in LAYOUTS:
        raise MamoError(f"unknown gradient layout '{name}' (train.gradient_layout); use auto, {', '.join(LAYOUTS)}.")
    return name
