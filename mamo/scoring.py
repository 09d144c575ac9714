"""Scoring a split: every task's metrics and its mean loss, summed batch by batch (:class:`MetricAccumulator`)."""

from __future__ import annotations

import torch

from mamo import dense
from mamo.losses import LOSSES, Loss, LossFunction, class_weight_tensor
from mamo.tasks import TASK_TYPES, TaskSpec, loss_name


class MetricAccumulator:
    """Sums per-sample metric values over batches; :meth:`compute` gives the means. A task's loss is the mean
    over everything its loss averages (samples, labelled targets weighed by their class weights, or valid pixels
    for the masked losses) in the whole split."""

    def __init__(self, tasks: dict[str, TaskSpec]):
        self.tasks = tasks
        self.sums: dict[str, dict[str, float]] = {name: {} for name in tasks}
        self.loss_sums: dict[str, float] = {name: 0.0 for name in tasks}
        self.loss_counts: dict[str, float] = {name: 0.0 for name in tasks}
        self.count = 0
        # Per task, bound at its first batch (on the evaluation's device): its loss, the function, its class weights.
        self._losses: dict[str, tuple[Loss, LossFunction, torch.Tensor | None]] = {}

    def update(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
        batch = next(iter(targets.values())).shape[0]
        self.count += batch
        for name, spec in self.tasks.items():
            pred, target = outputs[name].detach(), targets[name]
            for metric, value in TASK_TYPES[spec.type].batch_sums(pred, target).items():
                self.sums[name][metric] = self.sums[name].get(metric, 0.0) + value
            if name not in self._losses:
                entry, weights = LOSSES[loss_name(spec)], class_weight_tensor(spec.class_weights, pred.device)
                self._losses[name] = (entry, entry.make(weights, spec.missing_labels), weights)
            entry, loss, weights = self._losses[name]
            weight = entry.mass(target, weights)
            self.loss_sums[name] += loss(pred.float(), target).item() * weight
            self.loss_counts[name] += weight

    def compute(self) -> dict[str, dict[str, float]]:
        """``{task: {metric: value, ..., "loss": mean loss}}``."""
        return {
            name: {**self._finalize(name, spec),
                   # Over the mass itself, not at least 1: class weights summing under 1 in a split shrank it.
                   "loss": self.loss_sums[name] / self.loss_counts[name] if self.loss_counts[name] > 0 else 0.0}
            for name, spec in self.tasks.items()
        }

    def _finalize(self, name: str, spec: TaskSpec) -> dict[str, float]:
        try:
            return TASK_TYPES[spec.type].finalize(self.sums[name], self.count)
        except dense.NoTargets as exc:
            raise exc.of_task(name) from None
