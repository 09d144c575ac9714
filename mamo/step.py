"""One training step: per-task losses, per-task gradients of the shared parameters, a direction, an update.

The per-task gradients come from :mod:`mamo.task_gradients` (the one place that computes them, DESIGN §4):
a gradient path computes them, a layout holds them, gives the Gramian (per node while conflict statistics
are collected, which the statistics read, so conflicts cost no extra backward pass) and writes the weighted
combination. Host-device synchronisation: exactly one per step, where the losses (and, with a Gramian, the
m×m blocks) are copied to the host in one transfer, because the NaN check and the min-norm solve need their
values; everything else is queued asynchronously. On the CPU, where nothing is transferred, the device half
hands them over as they are (packing and unpacking them cost ~30 µs of a LeNet step, measured).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from mamo.directions.base import Direction
from mamo.directions.equal import Equal
from mamo.errors import MamoError
from mamo.losses import LossFunction
from mamo.model import MamoNet
from mamo.model_checks import check_precision
from mamo.step_graphs import DeviceHalf, HostState, StepGraphs
from mamo.task_gradients import (
    GRADIENT_PATHS,
    LAYOUTS,
    FlatLayout,
    Layout,
    ParameterPartition,
    loop_gradients,
    resolve_gradient_path,
    resolve_layout,
)
from mamo.tasks import bind_loss


@dataclass
class StepResult:
    """What a step measured; callbacks (conflict statistics, loggers) read it. Tensors are on the host."""

    losses: torch.Tensor  # (m,) detached, float32
    weights: torch.Tensor | None = None  # (m,) the direction's task weights
    gramian: torch.Tensor | None = None  # (m, m) over all shared parameters (or the representation, for ub)
    node_gramians: dict[str, torch.Tensor] = field(default_factory=dict)  # per shared node, with collect_gramians
    info: Mapping[str, torch.Tensor] = field(default_factory=dict)  # made into tensors when read
    gramian_space: str = "parameters"  # what ``gramian``'s gradients are taken w.r.t.: parameters | representation


# ``cache``: autocast's cache of cast weights, which torch asks to be off where a CUDA graph is recorded.
PRECISIONS: dict[str, Callable[..., contextlib.AbstractContextManager]] = {
    "fp32": lambda device, cache=True: contextlib.nullcontext(),
    # On CPU too: autocast helps ResNet-sized convolutions on CPUs with AMX (docs/performance.md).
    "bf16": lambda device, cache=True: torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                                     cache_enabled=cache),
}


# Directions whose weights never read the Gramian; a direction may also say so with ``needs_gramian = False``.
GRAMIAN_FREE: tuple[type, ...] = (Equal,)


def _needs_gramian(direction: Direction) -> bool:
    return getattr(direction, "needs_gramian", not isinstance(direction, GRAMIAN_FREE))


def _check_mode(mode: str) -> None:
    if mode not in STEP_MODES:
        raise MamoError(f"unknown gradient mode '{mode}' (train.gradients); use one of {', '.join(STEP_MODES)}.")


def check_step_settings(gradients: str, precision: str, gradient_path: str, gradient_layout: str = "auto") -> None:
    """train.gradients, train.precision, train.gradient_path and train.gradient_layout name something the
    step has."""
    _check_mode(gradients)
    if precision not in PRECISIONS:
        raise MamoError(f"unknown precision '{precision}' (train.precision); use one of {', '.join(PRECISIONS)}.")
    resolve_gradient_path(gradient_path, torch.device("cpu"))  # validates the names
    resolve_layout(gradient_layout, torch.device("cpu"))


def _host(*tensors: torch.Tensor) -> torch.Tensor:
    """One device-to-host copy of several small tensors (the step's single synchronisation point)."""
    return torch.cat([t.detach().float().reshape(-1) for t in tensors]).cpu()


class TrainStep:
    """Computes losses and gradients for one batch and applies the direction through the optimizer.

    ``gradients``: ``exact`` (per-parameter task gradients, needed for per-cell conflict statistics) or
    ``ub`` (MGDA-UB: task gradients w.r.t. the shared representation, one backward through the trunk);
    ``collect_gramians`` forces ``exact``, since the conflict statistics need per-cell blocks.
    ``gradient_path``: ``auto`` | ``loop`` | ``batched`` (:mod:`mamo.task_gradients`); if ``auto`` picked
    ``batched`` and an operation cannot be batched, the step warns once and uses the loop from then on.
    ``gradient_layout``: ``auto`` | ``flat`` | ``parameters``, how the per-task gradients are held.
    ``precision``: ``fp32`` or ``bf16`` (forward under autocast; gradients, Gramian and solve in float32).
    ``cuda_graphs``: on a CUDA device, replay the device half of exact and summed steps from CUDA graphs
    (:mod:`mamo.step_graphs`; those that collect conflict statistics from graphs of their own); MGDA-UB steps
    stay eager.
    With a direction that needs no Gramian and ``collect_gramians`` off, the step is one backward of the
    summed loss: plain linear scalarisation at its native speed.
    """

    def __init__(
        self,
        model: MamoNet,
        direction: Direction,
        optimizer: torch.optim.Optimizer,
        gradients: str = "exact",
        precision: str = "fp32",
        collect_gramians: bool = False,
        gradient_path: str = "auto",
        gradient_layout: str = "auto",
        cuda_graphs: bool = False,
    ):
        check_step_settings(gradients, precision, gradient_path, gradient_layout)
        self.model = model
        self.direction = direction
        self.optimizer = optimizer
        self.gradients = gradients
        self.precision = precision
        self.collect_gramians = collect_gramians
        self.gradient_path = gradient_path
        self.gradient_layout = gradient_layout
        self.cuda_graphs = cuda_graphs
        self._graphs: StepGraphs | None = None
        self._batched_failed = False
        self._precision_checked = False
        # The gradient mode ("exact" or "ub") the direction's history was built in; checkpointed with it.
        self.gradient_space: str | None = None
        self.refresh()

    @contextlib.contextmanager
    def collecting_conflicts(self) -> Iterator[None]:
        """Per-node Gram blocks in every step's result while inside (exact gradients, whatever ``gradients``
        says): what the conflict statistics of a detection round read."""
        saved, self.collect_gramians = self.collect_gramians, True
        try:
            yield
        finally:
            self.collect_gramians = saved

    def refresh(self) -> None:
        """Re-read the parameter partition (call after the graph grew)."""
        self._precision_checked = False
        self.partition = ParameterPartition(self.model)
        self._layout: Layout | None = None
        self._layout_device: torch.device | None = None
        self._loss_functions: list[LossFunction] = []
        self._loss_device: torch.device | None = None
        self._path: str | None = None  # the gradient path, resolved with the layout
        # Recorded graphs replay the old network's memory: a grown one is recorded anew.
        streams = self._graphs.side_streams if self._graphs else None
        self._graphs = StepGraphs(lambda: list(self.model.parameters()), streams) if self.cuda_graphs else None

    @property
    def jacobian(self) -> torch.Tensor | None:
        """J (m × P) of the last exact step under the ``flat`` layout, in the column order of ``partition``;
        overwritten by the next. ``None`` under the ``parameters`` layout, which writes the combination over
        the first task's gradients."""
        return self._layout.jac if isinstance(self._layout, FlatLayout) else None

    def path_for(self, device: torch.device) -> str:
        """The gradient path this step uses on ``device``."""
        path = resolve_gradient_path(self.gradient_path, device, self.partition.size, len(self.partition.tasks),
                                     self.precision)
        return "loop" if self._batched_failed and self.gradient_path == "auto" else path

    def layout_for(self, device: torch.device) -> str:
        """The gradient layout this step uses on ``device``."""
        return resolve_layout(self.gradient_layout, device, self.partition.size, len(self.partition.tasks))

    def _layout_on(self, device: torch.device) -> Layout:
        if self._layout is None or self._layout_device != device:
            self._layout = LAYOUTS[self.layout_for(device)](self.partition, device)
            self._layout_device = device
            self._path = self.path_for(device)
        return self._layout

    def _device_half(self, name: str, half: DeviceHalf, x: torch.Tensor, targets: dict[str, torch.Tensor],
                     host_state: HostState | None = None) -> torch.Tensor | tuple:
        """``half(x, targets)``, from a CUDA graph where ``cuda_graphs`` allows it."""
        if self._graphs is None or x.device.type != "cuda":
            return half(x, targets)
        return self._graphs.run(name, half, x, targets, host_state)

    def _forward(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        with PRECISIONS[self.precision](x.device, self._graphs is None or x.device.type != "cuda"):
            predictions = self.model(x)
        return self._losses(predictions, targets)

    def _losses(self, predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        tasks = self.partition.tasks
        device = predictions[tasks[0]].device
        if self._loss_device != device:  # bound once: class weights are copied to the device here, not per step
            self._loss_functions = [bind_loss(self.model.tasks[t], device) for t in tasks]
            self._loss_device = device
        # Losses in float32 outside autocast: a bf16 forward must not round the losses or their gradients.
        return [loss(predictions[t].float(), targets[t]) for t, loss in zip(tasks, self._loss_functions, strict=True)]

    def _check(self, losses: list[float]) -> None:
        bad = [t for t, v in zip(self.partition.tasks, losses, strict=True) if not math.isfinite(v)]
        if bad:
            # Quoted: a task may be called 'and' (the logic set's), which read as part of the sentence.
            named = " and ".join([", ".join(map(repr, bad[:-1])), repr(bad[-1])] if len(bad) > 1 else [repr(bad[0])])
            raise FloatingPointError(f"the loss{'es' if len(bad) > 1 else ''} of task{'s' if len(bad) > 1 else ''} "
                                     f"{named} became NaN or infinite")

    def __call__(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        if not self._precision_checked:  # open_run checked the network as built; growth adds layers to check
            check_precision(self.model, self.precision, x.device)
            self._precision_checked = True
        if not self.model.training:  # train() walks every module: 0.2 ms a step on LeNet, measured
            self.model.train()
        needs_gramian = _needs_gramian(self.direction) or self.collect_gramians
        mode = None
        if self.partition.size and needs_gramian:
            mode = "exact" if self.collect_gramians else self.gradients
            if self.gradient_space not in (None, mode):
                # ||∂L/∂z|| (ub) and ||∂L/∂θ|| (exact) differ in scale: a history holding both would read the
                # switch as a jump of the gradient norms (the tensioner's ζ ratio, ~100× on a ResNet).
                self.direction.reset()
            self.gradient_space = mode
        if mode != "exact":
            # The exact step sets every trainable parameter's .grad itself (the shared ones to the layout's wᵀJ, the
            # others to their task's gradient) instead of accumulating, so it has nothing to clear: 30-40 µs of a
            # 5 ms LeNet step, measured between steps.
            self.optimizer.zero_grad(set_to_none=True)
        result = self._summed_step(x, targets) if mode is None else STEP_MODES[mode](self, x, targets)
        self.optimizer.step()
        return result

    def _summed_device(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(self._forward(x, targets))
        stacked.sum().backward()
        return stacked.detach()

    def _summed_step(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        stacked = self._device_half("summed", self._summed_device, x, targets)
        host = _host(stacked)  # after the backward is queued: the device never waits for the host
        self._check(host.tolist())
        return StepResult(losses=host, weights=torch.ones(len(host), dtype=torch.float64))

    def _task_gradients(self, losses: list[torch.Tensor], layout: Layout, device: torch.device) -> None:
        path = self._path
        try:
            GRADIENT_PATHS[path](losses, self.partition, layout)
        except RuntimeError as exc:
            # While a CUDA graph is recorded the error is the recording's (the warm-up steps ran this path
            # eagerly): it fails the recording rather than the batched path.
            if path == "loop" or self.gradient_path != "auto" or (
                    device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                raise
            warnings.warn(f"batched per-task gradients failed ({str(exc).splitlines()[0]}); using the loop "
                          "from now on (set train.gradient_path=loop to skip the attempt).", stacklevel=3)
            self._batched_failed = True
            self._path = "loop"
            loop_gradients(losses, self.partition, layout)

    def _exact_device(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor | tuple:
        """The losses and the Gram blocks, flat in one device tensor (on the CPU, where there is nothing to
        transfer, as they are: a tuple)."""
        layout = self._layout
        losses = self._forward(x, targets)
        self._task_gradients(losses, layout, self._layout_device)
        # Per-node blocks only for the conflict statistics; a plain step needs G alone.
        blocks = [b.float() for b in layout.gramians(by_node=self.collect_gramians)]
        stacked = torch.stack(losses).detach().float()
        if self._layout_device.type == "cpu":
            return stacked, *blocks
        return torch.cat([stacked, *(b.reshape(-1) for b in blocks)])

    def _exact_step(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        part = self.partition
        device = part.shared[0].device
        layout = self._layout_on(device)
        # A step that collects conflict statistics records its own graph: it computes the per-node blocks. The
        # gradient path is not in the name: it changes only when a batched warm-up step falls back to the loop.
        name = f"exact/{'by node' if self.collect_gramians else 'whole'}"
        out = self._device_half(name, self._exact_device, x, targets, layout)
        m = len(part.tasks)
        if isinstance(out, tuple):  # on the CPU: no copy to make, no pack to unpack
            losses, blocks = out[0], out[1:]
        else:
            host = out.cpu()  # the one synchronisation
            losses, blocks = host[:m], host[m:].view(-1, m, m).unbind(0)
        values = losses.tolist()
        self._check(values)
        node_gramians = dict(zip(part.node_slices, blocks, strict=True)) if self.collect_gramians else {}
        gramian = torch.stack(blocks).sum(0) if len(blocks) > 1 else blocks[0]
        output = self.direction.weights_of(gramian.tolist(), values)
        for param, grad in zip(part.shared, layout.combine(output.weights), strict=True):
            if param.grad is not grad:  # flat: set once per layout; the views then see every step's wᵀJ
                param.grad = grad
        return StepResult(losses, output.weights, gramian, node_gramians, output.info)

    def _ub_step(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        part, model = self.partition, self.model
        with PRECISIONS[self.precision](x.device):
            features = model.forward_features(x)
            # Each task's head reads its own detached copy of the representation z, so that one backward through
            # all heads leaves ∂L_t/∂z in task t's copies (and each task-specific parameter its own task's
            # gradient): one pass of the autograd engine instead of m retained ones (1–2% of a LeNet m=2 step on
            # a 2-core CPU, measured). The copies share z's storage.
            copies = [{node: z.detach().requires_grad_() for node, z in features.items()} for _ in part.tasks]
            predictions = {t: model.forward_head(copy, t) for t, copy in zip(part.tasks, copies, strict=True)}
        losses = self._losses(predictions, targets)
        leaves = [z for copy in copies for z in copy.values()]
        torch.autograd.backward(losses, inputs=leaves + [p for t in part.tasks for p in part.specific[t]])
        reps = list(features.values())
        rows = [torch.cat([(torch.zeros_like(z) if z.grad is None else z.grad).reshape(-1).float()
                           for z in copy.values()]) for copy in copies]
        jac = torch.stack(rows)
        m = len(losses)
        host = _host(torch.stack(losses), jac @ jac.T)
        values = host[:m].tolist()
        self._check(values)
        gramian = host[m:].view(m, m)
        output = self.direction.weights_of(gramian.tolist(), values)
        # Σ w_t·row_t as scaled adds rather than ``weights @ jac``: no host-to-device copy of the weights and no
        # BLAS call for a 1×m product (1–2% of the same step, measured).
        first, *rest = output.weights.tolist()
        combined = rows[0] * first
        for row, weight in zip(rows[1:], rest, strict=True):
            combined.add_(row, alpha=weight)
        per_rep = combined.split([z.numel() for z in reps]) if len(reps) > 1 else [combined]
        # One backward through the trunk, into the shared parameters only: task-specific ones already have
        # their own task's gradient from the heads' pass.
        torch.autograd.backward(reps, [c.view_as(z).to(z.dtype) for c, z in zip(per_rep, reps, strict=True)],
                                inputs=part.shared)
        return StepResult(host[:m], output.weights, gramian, {}, output.info, gramian_space="representation")


STEP_MODES: dict[str, Callable[[TrainStep, torch.Tensor, dict[str, torch.Tensor]], StepResult]] = {
    "exact": TrainStep._exact_step,
    "ub": TrainStep._ub_step,
}
