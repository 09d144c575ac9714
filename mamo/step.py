"""One training step: per-task losses, per-task gradients of the shared parameters, a direction, an update.

This is the one place where per-task gradients are computed (DESIGN §4). Which parameters are shared comes
from the graph: a parameter is shared when two or more tasks reach it (trunk cells, GMK branches), otherwise
it belongs to one task and takes that task's gradient alone. The shared parameters' per-task gradients are
written straight into one preallocated m x P buffer; the Gramian is the sum of per-node Gram blocks, which
are also what the conflict statistics read, so conflicts cost no extra backward pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from mamo import graph as g
from mamo.model import MamoNet
from mamo.tasks import task_loss


@dataclass
class StepResult:
    """What a step measured; callbacks (conflict statistics, loggers) read it."""

    losses: torch.Tensor  # (m,) detached
    weights: torch.Tensor | None = None  # (m,) the direction's task weights
    gramian: torch.Tensor | None = None  # (m, m) over all shared parameters (or the representation, for ub)
    node_gramians: dict[str, torch.Tensor] = field(default_factory=dict)  # per shared graph node
    info: dict[str, torch.Tensor] = field(default_factory=dict)


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

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for param in self.shared:
            out.append(flat[offset : offset + param.numel()].view_as(param))
            offset += param.numel()
        return out


class TrainStep:
    """Computes losses and gradients for one batch and applies the direction through the optimizer.

    ``gradients``: ``exact`` (per-parameter task gradients, needed for per-cell conflict statistics) or
    ``ub`` (MGDA-UB: task gradients w.r.t. the shared representation, one backward through the trunk).
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
    ):
        self.model = model
        self.direction = direction
        self.optimizer = optimizer
        self.gradients = gradients
        self.precision = precision
        self.collect_gramians = collect_gramians
        self.refresh()

    def refresh(self) -> None:
        """Re-read the parameter partition (call after the graph grew)."""
        self.partition = ParameterPartition(self.model)
        self._buffer: torch.Tensor | None = None

    def _autocast(self, device: torch.device):
        if self.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _losses(self, predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [task_loss(self.model.tasks[t], predictions[t].float(), targets[t]) for t in self.partition.tasks]

    def __call__(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        needs_gramian = getattr(self.direction, "needs_gramian", True) or self.collect_gramians
        if self.partition.size == 0 or not needs_gramian:
            result = self._summed_step(x, targets)
        elif self.gradients == "ub":
            result = self._ub_step(x, targets)
        else:
            result = self._exact_step(x, targets)
        if not torch.isfinite(result.losses).all():
            bad = [t for t, v in zip(self.partition.tasks, result.losses.tolist()) if not torch.isfinite(torch.tensor(v))]
            raise FloatingPointError(f"the loss of task {', '.join(bad)} became NaN or infinite")
        self.optimizer.step()
        return result

    def _summed_step(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        with self._autocast(x.device):
            predictions = self.model(x)
        losses = self._losses(predictions, targets)
        torch.stack(losses).sum().backward()
        weights = torch.ones(len(losses), dtype=torch.float64)
        return StepResult(losses=torch.stack(losses).detach(), weights=weights)

    def _exact_step(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        part = self.partition
        with self._autocast(x.device):
            predictions = self.model(x)
        losses = self._losses(predictions, targets)
        m = len(losses)
        if self._buffer is None or self._buffer.device != x.device:
            self._buffer = torch.empty(m, part.size, device=x.device)
        jac = self._buffer
        for t, (task, loss) in enumerate(zip(part.tasks, losses)):
            specific = part.specific[task]
            grads = torch.autograd.grad(loss, part.shared + specific, retain_graph=t < m - 1, allow_unused=True)
            self._write_row(jac[t], grads[: len(part.shared)])
            for param, grad in zip(specific, grads[len(part.shared) :]):
                param.grad = grad
        node_gramians = {node: jac[:, cols] @ jac[:, cols].T for node, cols in part.node_slices.items()}
        gramian = torch.stack(list(node_gramians.values())).sum(0)
        stacked = torch.stack(losses).detach()
        output = self.direction(gramian, stacked)
        combined = output.weights.to(device=jac.device, dtype=jac.dtype) @ jac
        for param, grad in zip(part.shared, part.unflatten(combined)):
            param.grad = grad
        return StepResult(stacked, output.weights, gramian.detach(), node_gramians, output.info)

    def _write_row(self, row: torch.Tensor, grads: tuple) -> None:
        offset = 0
        for param, grad in zip(self.partition.shared, grads):
            n = param.numel()
            if grad is None:
                row[offset : offset + n].zero_()
            else:
                row[offset : offset + n].copy_(grad.reshape(-1))
            offset += n

    def _ub_step(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        part = self.partition
        with self._autocast(x.device):
            features = self.model.forward_features(x)
            predictions = self.model.forward_heads(features)
        losses = self._losses(predictions, targets)
        reps = list(features.values())
        rows = []
        for t, (task, loss) in enumerate(zip(part.tasks, losses)):
            specific = part.specific[task]
            grads = torch.autograd.grad(loss, reps + specific, retain_graph=True, allow_unused=True)
            rows.append([torch.zeros_like(r) if gr is None else gr for r, gr in zip(reps, grads[: len(reps)])])
            for param, grad in zip(specific, grads[len(reps) :]):
                param.grad = grad
        jac = torch.stack([torch.cat([gr.reshape(-1).float() for gr in row]) for row in rows])
        gramian = jac @ jac.T
        stacked = torch.stack(losses).detach()
        output = self.direction(gramian, stacked)
        weights = output.weights.to(device=jac.device, dtype=torch.float32)
        combined = [sum(weights[t] * rows[t][k] for t in range(len(rows))) for k in range(len(reps))]
        # One backward through the trunk, into the shared parameters only: task-specific ones already have
        # their own task's gradient from the loop above.
        torch.autograd.backward(reps, combined, inputs=part.shared)
        return StepResult(stacked, output.weights, gramian.detach(), {}, output.info)
