"""One training step: per-task losses, per-task gradients of the shared parameters, a direction, an update.

This is the one place where per-task gradients are computed (DESIGN §4). Which parameters are shared comes
from the graph: a parameter is shared when two or more tasks reach it (trunk cells, GMK branches), otherwise
it belongs to one task and takes that task's gradient alone. The shared parameters' per-task gradients are
written straight into one preallocated m x P buffer J (reused every step). The Gramian is one product J Jᵀ;
while conflict statistics are collected it is the sum of per-node Gram blocks, which the statistics read, so
conflicts cost no extra backward pass.

How J is filled is a *gradient path* (:data:`GRADIENT_PATHS`): ``loop`` (m ``autograd.grad`` calls) or
``batched`` (one backward over the m one-hot cotangents under ``torch.func.vmap``). ``auto`` takes the path of
:data:`AUTO_GRADIENT_PATH` for the device. Host-device synchronisation: exactly one per step, where the losses
(and, with a Gramian, the m×m blocks) are copied to the host in one transfer, because the NaN check and the
min-norm solve need their values; everything else is queued asynchronously.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from mamo import graph as g
from mamo.directions.equal import Equal
from mamo.errors import MamoError
from mamo.model import MamoNet
from mamo.tasks import task_loss

Grads = tuple[torch.Tensor | None, ...]


@dataclass
class StepResult:
    """What a step measured; callbacks (conflict statistics, loggers) read it. Tensors are on the host."""

    losses: torch.Tensor  # (m,) detached, float32
    weights: torch.Tensor | None = None  # (m,) the direction's task weights
    gramian: torch.Tensor | None = None  # (m, m) over all shared parameters (or the representation, for ub)
    node_gramians: dict[str, torch.Tensor] = field(default_factory=dict)  # per shared node, with collect_gramians
    info: Mapping[str, torch.Tensor] = field(default_factory=dict)  # made into tensors when read


class ParameterPartition:
    """The model's parameters split by task set, with the column slice of each shared node in J."""

    def __init__(self, model: MamoNet):
        self.tasks = list(model.tasks)
        sets = g.task_sets(model.graph)
        self.shared: list[torch.nn.Parameter] = []
        self.node_slices: dict[str, slice] = {}
        self.specific: dict[str, list[torch.nn.Parameter]] = {task: [] for task in self.tasks}
        offset = 0
        for node, named in model.node_parameters().items():
            params = [p for _, p in named if p.requires_grad]
            if len(sets[node]) >= 2:
                size = sum(p.numel() for p in params)
                if size:
                    self.node_slices[node] = slice(offset, offset + size)
                    self.shared.extend(params)
                    offset += size
            elif len(sets[node]) == 1:
                self.specific[next(iter(sets[node]))].extend(params)
        self.size = offset

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of the last dimension of ``flat`` (..., P) shaped like each shared parameter."""
        out, offset = [], 0
        lead = flat.shape[:-1]
        for param in self.shared:
            out.append(flat[..., offset : offset + param.numel()].view(*lead, *param.shape))
            offset += param.numel()
        return out


class Workspace:
    """Buffers of one partition on one device, allocated once and reused by every step.

    ``jac`` is J (m × P); ``rows[t]``/``columns`` are its per-parameter views for the loop/batched paths;
    ``combined`` holds wᵀJ, and ``grads`` are its per-parameter views that become the shared ``.grad``.
    """

    def __init__(self, part: ParameterPartition, device: torch.device):
        m = len(part.tasks)
        self.device = device
        self.jac = torch.empty(m, part.size, device=device)
        self.rows = [part.views(self.jac[t]) for t in range(m)]
        self.columns = part.views(self.jac)
        self.combined = torch.empty(part.size, device=device)
        self.grads = part.views(self.combined)
        self.inputs = [part.shared + part.specific[task] for task in part.tasks]
        self.specific = [p for task in part.tasks for p in part.specific[task]]
        self.owner = [t for t, task in enumerate(part.tasks) for _ in part.specific[task]]
        self.node_slices = dict(part.node_slices)
        self.gram_width = GRAM_CHUNK.get(device.type)


def gram_block(jac: torch.Tensor, cols: slice | None, width: int | None = None) -> torch.Tensor:
    """``J[:, cols] J[:, cols]ᵀ`` (``cols=None``: all of J, without indexing, 10 µs less inside a LeNet step).
    With ``width`` (CPU), as one batched product of column chunks of that width summed: a single (m × n)(n × m)
    product streams n-long rows through a tiny output and runs on one thread; the chunks fit the cache and bmm
    spreads them over threads (ResNet-18, m = 3: docs/performance.md)."""
    piece = jac if cols is None else jac[:, cols]
    m, n = piece.shape
    if not width or n < 2 * width:
        return piece @ piece.T
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


def loop_gradients(losses: list[torch.Tensor], part: ParameterPartition, work: Workspace) -> None:
    """m backward passes; J's row t and task t's own parameters' ``.grad`` get task t's gradient."""
    m, n_shared = len(losses), len(part.shared)
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, work.inputs[t], retain_graph=t < m - 1, allow_unused=True)
        _copy_into(work.rows[t], grads[:n_shared])
        for param, grad in zip(part.specific[part.tasks[t]], grads[n_shared:], strict=True):
            param.grad = grad


def batched_gradients(losses: list[torch.Tensor], part: ParameterPartition, work: Workspace) -> None:
    """One backward of the stacked losses over the m one-hot cotangents, batched by ``torch.func.vmap``.

    torch.func's batching rules batch convolution, batch-norm and pooling backward for real (the legacy
    ``is_grads_batched`` vmap falls back to a per-slice loop for exactly those), which is what can win on a
    GPU. The graph is retained so that a failed batched pass can still be redone by the loop (``auto``).
    """
    stacked = torch.stack(losses)
    inputs = part.shared + work.specific
    cotangents = torch.eye(len(losses), device=stacked.device, dtype=stacked.dtype)

    def vjp(cotangent: torch.Tensor) -> Grads:
        return torch.autograd.grad(stacked, inputs, cotangent, retain_graph=True, allow_unused=True)

    grads = torch.func.vmap(vjp)(cotangents)
    n_shared = len(part.shared)
    _copy_into(work.columns, grads[:n_shared])
    for param, t, grad in zip(work.specific, work.owner, grads[n_shared:], strict=True):
        param.grad = None if grad is None else grad[t]


GradientPath = Callable[[list[torch.Tensor], ParameterPartition, Workspace], None]
GRADIENT_PATHS: dict[str, GradientPath] = {"loop": loop_gradients, "batched": batched_gradients}
# cpu: measured (docs/performance.md): the loop is at the forward + m backward floor, batching is slower.
# cuda: NOT yet measured; expected from torch.func's real batching of small, launch-bound kernels.
AUTO_GRADIENT_PATH: dict[str, str] = {"cpu": "loop", "cuda": "batched"}
GRAM_CHUNK: dict[str, int] = {"cpu": 1 << 15}  # Gram chunk width (see gram_block); absent: one matmul per node


def resolve_gradient_path(name: str, device: torch.device) -> str:
    """The gradient path ``name`` stands for on ``device`` (``auto``: :data:`AUTO_GRADIENT_PATH`)."""
    if name == "auto":
        return AUTO_GRADIENT_PATH.get(device.type, "loop")
    if name not in GRADIENT_PATHS:
        raise MamoError(f"unknown gradient path '{name}' (train.gradient_path); use auto, {', '.join(GRADIENT_PATHS)}.")
    return name


PRECISIONS: dict[str, Callable[[torch.device], contextlib.AbstractContextManager]] = {
    "fp32": lambda device: contextlib.nullcontext(),
    # On CPU too: autocast helps ResNet-sized convolutions on CPUs with AMX (docs/performance.md).
    "bf16": lambda device: torch.autocast(device_type=device.type, dtype=torch.bfloat16),
}


# Directions whose weights never read the Gramian; a direction may also say so with ``needs_gramian = False``.
GRAMIAN_FREE: tuple[type, ...] = (Equal,)


def _needs_gramian(direction) -> bool:
    return getattr(direction, "needs_gramian", not isinstance(direction, GRAMIAN_FREE))


def _check_mode(mode: str) -> None:
    if mode not in STEP_MODES:
        raise MamoError(f"unknown gradient mode '{mode}' (train.gradients); use one of {', '.join(STEP_MODES)}.")


def check_step_settings(gradients: str, precision: str, gradient_path: str) -> None:
    """train.gradients, train.precision and train.gradient_path name something the step has."""
    _check_mode(gradients)
    if precision not in PRECISIONS:
        raise MamoError(f"unknown precision '{precision}' (train.precision); use one of {', '.join(PRECISIONS)}.")
    resolve_gradient_path(gradient_path, torch.device("cpu"))  # validates the name


def _host(*tensors: torch.Tensor) -> torch.Tensor:
    """One device-to-host copy of several small tensors (the step's single synchronisation point)."""
    return torch.cat([t.detach().float().reshape(-1) for t in tensors]).cpu()


class TrainStep:
    """Computes losses and gradients for one batch and applies the direction through the optimizer.

    ``gradients``: ``exact`` (per-parameter task gradients, needed for per-cell conflict statistics) or
    ``ub`` (MGDA-UB: task gradients w.r.t. the shared representation, one backward through the trunk);
    ``collect_gramians`` forces ``exact``, since the conflict statistics need per-cell blocks.
    ``gradient_path``: ``auto`` | ``loop`` | ``batched`` (see the module docstring); if ``auto`` picked
    ``batched`` and an operation cannot be batched, the step warns once and uses the loop from then on.
    ``precision``: ``fp32`` or ``bf16`` (forward under autocast; gradients, Gramian and solve in float32).
    With a direction that needs no Gramian and ``collect_gramians`` off, the step is one backward of the
    summed loss: plain linear scalarisation at its native speed.
    """

    def __init__(
        self,
        model: MamoNet,
        direction,
        optimizer: torch.optim.Optimizer,
        gradients: str = "exact",
        precision: str = "fp32",
        collect_gramians: bool = False,
        gradient_path: str = "auto",
    ):
        check_step_settings(gradients, precision, gradient_path)
        self.model = model
        self.direction = direction
        self.optimizer = optimizer
        self.gradients = gradients
        self.precision = precision
        self.collect_gramians = collect_gramians
        self.gradient_path = gradient_path
        self._batched_failed = False
        self.refresh()

    def refresh(self) -> None:
        """Re-read the parameter partition (call after the graph grew)."""
        self.partition = ParameterPartition(self.model)
        self._work: Workspace | None = None

    @property
    def jacobian(self) -> torch.Tensor | None:
        """J (m × P) of the last exact step, in the column order of ``partition``; overwritten by the next."""
        return None if self._work is None else self._work.jac

    def path_for(self, device: torch.device) -> str:
        """The gradient path this step uses on ``device``."""
        path = resolve_gradient_path(self.gradient_path, device)
        return "loop" if self._batched_failed and self.gradient_path == "auto" else path

    def _workspace(self, device: torch.device) -> Workspace:
        if self._work is None or self._work.device != device:
            self._work = Workspace(self.partition, device)
        return self._work

    def _forward(self, x: torch.Tensor, targets: dict[str, torch.Tensor], features: bool = False):
        with PRECISIONS[self.precision](x.device):
            outputs = self.model.forward_features(x) if features else self.model(x)
            predictions = self.model.forward_heads(outputs) if features else outputs
        # Losses in float32 outside autocast: a bf16 forward must not round the losses or their gradients.
        losses = [task_loss(self.model.tasks[t], predictions[t].float(), targets[t]) for t in self.partition.tasks]
        return losses, outputs

    def _check(self, losses: torch.Tensor) -> None:
        bad = [t for t, v in zip(self.partition.tasks, losses.tolist(), strict=True) if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"the loss of task {', '.join(bad)} became NaN or infinite")

    def __call__(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        if not self.model.training:  # train() walks every module: 0.2 ms a step on LeNet, measured
            self.model.train()
        needs_gramian = _needs_gramian(self.direction) or self.collect_gramians
        mode = None
        if self.partition.size and needs_gramian:
            mode = "exact" if self.collect_gramians else self.gradients
            _check_mode(mode)  # search.py switches modes by attribute
        if mode != "exact":
            # The exact step sets every trainable parameter's .grad itself (the shared ones to views of wᵀJ, the
            # others to their task's gradient) instead of accumulating, so it has nothing to clear: 30-40 µs of a
            # 5 ms LeNet step, measured between steps.
            self.optimizer.zero_grad(set_to_none=True)
        result = self._summed_step(x, targets) if mode is None else STEP_MODES[mode](self, x, targets)
        self.optimizer.step()
        return result

    def _summed_step(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        losses, _ = self._forward(x, targets)
        stacked = torch.stack(losses)
        stacked.sum().backward()
        host = _host(stacked)  # after the backward is queued: the device never waits for the host
        self._check(host)
        return StepResult(losses=host, weights=torch.ones(len(losses), dtype=torch.float64))

    def _fill_jacobian(self, losses: list[torch.Tensor], work: Workspace) -> None:
        path = self.path_for(work.device)
        try:
            GRADIENT_PATHS[path](losses, self.partition, work)
        except RuntimeError as exc:
            if path == "loop" or self.gradient_path != "auto":
                raise
            warnings.warn(f"batched per-task gradients failed ({str(exc).splitlines()[0]}); using the loop "
                          "from now on (set train.gradient_path=loop to skip the attempt).", stacklevel=3)
            self._batched_failed = True
            loop_gradients(losses, self.partition, work)

    def _exact_step(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        part = self.partition
        work = self._workspace(part.shared[0].device)
        losses, _ = self._forward(x, targets)
        self._fill_jacobian(losses, work)
        jac = work.jac
        # Per-node blocks only for the conflict statistics; a plain step needs G alone, in one product.
        spans = list(work.node_slices.values()) if self.collect_gramians else [None]
        blocks = [gram_block(jac, cols, work.gram_width) for cols in spans]
        m = len(losses)
        host = _host(torch.stack(losses), *blocks)
        self._check(host[:m])
        host_blocks = host[m:].view(len(blocks), m, m)
        node_gramians = dict(zip(work.node_slices, host_blocks.unbind(0), strict=True)) if self.collect_gramians else {}
        gramian = host_blocks.sum(0) if len(blocks) > 1 else host_blocks[0]
        output = self.direction(gramian, host[:m])
        weights = output.weights.to(jac.device, jac.dtype, non_blocking=True)
        torch.mv(jac.T, weights, out=work.combined)
        for param, grad in zip(part.shared, work.grads, strict=True):
            if param.grad is not grad:  # set once per workspace; the views then see every step's wᵀJ
                param.grad = grad
        return StepResult(host[:m], output.weights, gramian, node_gramians, output.info)

    def _ub_step(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        part = self.partition
        losses, features = self._forward(x, targets, features=True)
        reps = list(features.values())
        rows = []
        for task, loss in zip(part.tasks, losses, strict=True):
            specific = part.specific[task]
            grads = torch.autograd.grad(loss, reps + specific, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(r) if gr is None else gr).reshape(-1).float()
                                   for r, gr in zip(reps, grads[: len(reps)], strict=True)]))
            for param, grad in zip(specific, grads[len(reps) :], strict=True):
                param.grad = grad
        jac = torch.stack(rows)
        m = len(losses)
        host = _host(torch.stack(losses), jac @ jac.T)
        self._check(host[:m])
        gramian = host[m:].view(m, m)
        output = self.direction(gramian, host[:m])
        weights = output.weights.to(jac.device, jac.dtype, non_blocking=True)
        combined = (weights @ jac).split([r.numel() for r in reps])
        # One backward through the trunk, into the shared parameters only: task-specific ones already have
        # their own task's gradient from the loop above.
        torch.autograd.backward(reps, [c.view_as(r).to(r.dtype) for c, r in zip(combined, reps, strict=True)],
                                inputs=part.shared)
        return StepResult(host[:m], output.weights, gramian, {}, output.info)


STEP_MODES: dict[str, Callable[[TrainStep, torch.Tensor, dict[str, torch.Tensor]], StepResult]] = {
    "exact": TrainStep._exact_step,
    "ub": TrainStep._ub_step,
}
