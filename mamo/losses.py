"""Task losses: the entries a task spec's ``loss`` names, each scoring one batch as a mean.

A loss is bound to a task once per device (:meth:`Loss.bind`): the task's class weights become a tensor on that
device then and not at every step (a CUDA graph cannot record a copy from host memory, and a step should not pay
for one). Each entry also says what its batch mean averages over (:attr:`Loss.mass`: the batch's samples, its
valid pixels, or the class weights of its labelled targets), so that an evaluation weighs every batch by it and a
split's loss does not depend on the evaluation batch size.

The cross-entropy losses read ``-1`` (:data:`mamo.dense.IGNORE`) as "no label here" where a task allows it (every
segmentation task; a classification task that sets ``missing_labels``): their mean runs over the labelled targets
only, weighted by their classes' weights where the task gives ``class_weights`` (the mean of a weighted
cross-entropy, Σ w_y·ℓ / Σ w_y, as torch's ``weight``), and is 0, with a zero gradient, for a batch without one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mamo import dense
from mamo.errors import MamoError

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.reshape(target.shape), target.to(pred.dtype))


def _exp_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Pareto MTL Eq 19: 1 - exp(-||x - t||^2), a concave front. The norm runs over each sample's whole target:
    # summing over the last axis alone would sum over the batch for (B,) targets and over rows for images.
    diff = pred.reshape(target.shape) - target.to(pred.dtype)
    return (1.0 - torch.exp(-(diff**2).reshape(diff.shape[0], -1).sum(dim=1))).mean()


def _cross_entropy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(pred, target.long())


def label_mass(target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """What a cross-entropy over ``target`` averages over: its labelled targets, each counted with its class's
    weight where there are ``weights`` (a 0-d tensor)."""
    target = target.long()
    if weights is None:
        return (target != dense.IGNORE).sum()
    return (weights[target.clamp_min(0)] * (target != dense.IGNORE)).sum()


def weighted_cross_entropy(weights: torch.Tensor) -> LossFunction:
    """Cross-entropy over the labelled targets with class weights (any target shape: (B,) or (B, H, W))."""

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        weight = weights.to(pred.dtype)
        total = F.cross_entropy(pred, target, weight=weight, ignore_index=dense.IGNORE, reduction="sum")
        mass = label_mass(target, weight)
        # A batch whose labelled targets all weigh 0 (none labelled, or only zero-weight classes) gives 0, not NaN.
        return total / torch.where(mass > 0, mass, torch.ones_like(mass))

    return loss


def _labelled_cross_entropy(weights: torch.Tensor | None) -> LossFunction:
    return dense.segmentation_loss if weights is None else weighted_cross_entropy(weights)


def _class_cross_entropy(weights: torch.Tensor | None, missing_labels: bool) -> LossFunction:
    # Plain targets keep torch's own mean (the numbers of every run before class weights and missing labels).
    return _cross_entropy if weights is None and not missing_labels else _labelled_cross_entropy(weights)


def _samples(target: torch.Tensor, weights: torch.Tensor | None) -> float:
    return float(target.shape[0])


def _labelled(target: torch.Tensor, weights: torch.Tensor | None) -> float:
    return float(label_mass(target, weights))


def _valid_pixels(target: torch.Tensor, weights: torch.Tensor | None) -> float:
    return dense.valid_pixels(target)


@dataclass(frozen=True)
class Loss:
    """One loss. ``make(weights, missing_labels)`` gives the batch function, with the task's class weights (a
    tensor on the training device, or None) and whether its targets may hold -1; ``mass(target, weights)`` is
    what one batch's value averages over; ``class_weighted``: it takes a task's ``class_weights``."""

    make: Callable[[torch.Tensor | None, bool], LossFunction]
    mass: Callable[[torch.Tensor, torch.Tensor | None], float] = _samples
    class_weighted: bool = False

    def bind(self, class_weights: tuple[float, ...], missing_labels: bool, device: torch.device) -> LossFunction:
        """The batch function for one task on ``device``."""
        return self.make(class_weight_tensor(class_weights, device), missing_labels)


def class_weight_tensor(class_weights: tuple[float, ...], device: torch.device) -> torch.Tensor | None:
    """A task's class weights as a float32 tensor on ``device``, scaled so the largest is 1; None for a task without
    them. The weighted mean does not depend on their scale, but float32 does: weights of 1e-46 became 0 (a loss
    of 0) and of 1e38 overflowed the weighted sum (a NaN loss), though both are finite."""
    if not class_weights:
        return None
    largest = max(class_weights)
    return torch.tensor([w / largest for w in class_weights], dtype=torch.float32, device=device)


LOSSES: dict[str, Loss] = {
    "cross_entropy": Loss(_class_cross_entropy, _labelled, class_weighted=True),
    "mse": Loss(lambda weights, missing: _mse),
    "exp_mse": Loss(lambda weights, missing: _exp_mse),
    "pixel_cross_entropy": Loss(lambda weights, missing: _labelled_cross_entropy(weights), _labelled,
                                class_weighted=True),
    "masked_l1": Loss(lambda weights, missing: dense.depth_loss, _valid_pixels),
    "cosine": Loss(lambda weights, missing: dense.normal_loss, _valid_pixels),
}


def label_options(spec: dict, where: str, task_type: str, classes: int, loss: str) -> tuple[tuple[float, ...], bool]:
    """A task spec's ``class_weights`` (one finite weight ≥ 0 per class, not all 0, for a loss that takes them)
    and ``missing_labels`` (a bool, classification only: segmentation always reads -1 so); ``where`` names the
    task in the error."""
    missing = spec.get("missing_labels", False)
    if not isinstance(missing, bool):
        raise MamoError(f"{where} has missing_labels {missing!r}; give true (its targets may be -1, unlabelled) or "
                        "false.")
    if missing and task_type != "classification":
        marks = "its pixels are unlabelled where they are -1 anyway" if task_type == "segmentation" else (
            "only classification targets can be missing (-1)")
        raise MamoError(f"{where} is a {task_type} task, so missing_labels does not apply ({marks}); remove it.")
    if "class_weights" not in spec:
        return (), missing
    weights = spec["class_weights"]
    if hasattr(weights, "tolist") and not isinstance(weights, (list, tuple)):  # numpy's or torch's, flattened
        weights = weights.tolist()  # (scikit-learn's compute_class_weight gives an array)
    if not LOSSES[loss].class_weighted:
        raise MamoError(f"{where} sets class_weights, which its loss '{loss}' does not take; remove them or use a "
                        "cross-entropy loss on a classification or segmentation task.")
    numbers_ok = isinstance(weights, (list, tuple)) and all(
        isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights)
    if not numbers_ok or len(weights) != classes or not any(weights):
        raise MamoError(f"{where} has class_weights {weights!r}; give a list of {classes} finite weights ≥ 0 (one "
                        "per class, in class order, not all 0), such as [1.0, 4.0] for a rare class 1 of 2.")
    return tuple(float(w) for w in weights), missing
