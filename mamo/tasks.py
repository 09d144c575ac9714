"""Tasks: what a task's target looks like, its loss, and its metrics with their directions.

A dataset describes its tasks with plain dicts (the stable plugin contract):
``{"type": "classification", "classes": K}``, ``{"type": "regression", "dim": D}``,
``{"type": "reconstruction", "shape": [C, H, W]}``, and the dense-prediction types of :mod:`mamo.dense`:
``{"type": "segmentation", "classes": K, "shape": [H, W]}``, ``{"type": "depth", "shape": [1, H, W]}``,
``{"type": "normal", "shape": [3, H, W]}``. A classification or segmentation task may weigh its classes
(``"class_weights": [w_0, ..., w_{K-1}]``), and a classification task may leave samples unlabelled
(``"missing_labels": True``, their target -1), as a segmentation task's pixels always may (:mod:`mamo.losses`).
:func:`parse_tasks` turns them into :class:`TaskSpec`.
Each task type is one entry of :data:`TASK_TYPES`; adding a type means adding an entry, not a branch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mamo import dense
from mamo.errors import MamoError
from mamo.losses import LOSSES, LossFunction, label_options


@dataclass(frozen=True)
class Metric:
    """A metric name and whether a larger value is better."""

    name: str
    higher_is_better: bool


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name, type, output size and optional head/loss overrides."""

    name: str
    type: str
    classes: int = 0
    dim: int = 0
    shape: tuple[int, ...] = ()
    head: str = "default"
    loss: str = "default"
    class_weights: tuple[float, ...] = ()
    missing_labels: bool = False
    chosen_metrics: tuple[str, ...] = ()  # the spec's "metrics": those Δ, Win and the report use, the first the main

    @property
    def output_size(self) -> int:
        """Number of outputs the head must produce (flattened)."""
        return TASK_TYPES[self.type].output_size(self)

    @property
    def may_be_unlabelled(self) -> bool:
        """Whether a target may be -1 (unlabelled): a segmentation pixel always, a classification sample with
        ``missing_labels``."""
        return self.type == "segmentation" or self.missing_labels

    @property
    def metrics(self) -> tuple[Metric, ...]:
        every = TASK_TYPES[self.type].metrics
        if not self.chosen_metrics:
            return every
        by_name = {metric.name: metric for metric in every}
        return tuple(by_name[name] for name in self.chosen_metrics)

    def to_dict(self) -> dict:
        out: dict = {"type": self.type}
        if self.classes:
            out["classes"] = self.classes
        if self.dim:
            out["dim"] = self.dim
        if self.shape:
            out["shape"] = list(self.shape)
        if self.head != "default":
            out["head"] = self.head
        if self.loss != "default":
            out["loss"] = self.loss
        if self.class_weights:
            out["class_weights"] = list(self.class_weights)
        if self.missing_labels:
            out["missing_labels"] = True
        if self.chosen_metrics:
            out["metrics"] = list(self.chosen_metrics)
        return out


def _per_sample_means(sums: dict[str, float], count: int) -> dict[str, float]:
    return {name: value / max(count, 1) for name, value in sums.items()}


@dataclass(frozen=True)
class TaskType:
    """How one kind of task is trained and scored.

    ``batch_sums`` gives additive totals of one batch; ``finalize`` turns their totals over a split (and the
    number of samples) into the metrics (by default: per-sample sums divided by the count). ``check_target``
    says whether one sample's target fits the spec, and what was expected (data validation); ``needs`` names
    the spec keys the type requires; ``default_head`` is the head a task of this type gets by default, and
    ``mlp_output`` the layers an ``mlp`` head ends with (a squashing or reshaping of its flat output), and
    ``mlp_range`` the values such a head can output where it squashes them.
    ``losses`` are the entries of :data:`LOSSES` that can score the type (the default first): each takes the
    type's targets and the predictions of its heads, and means on them what its name says.
    """

    default_loss: str
    losses: tuple[str, ...]
    metrics: tuple[Metric, ...]
    output_size: Callable[[TaskSpec], int]
    batch_sums: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] = field(repr=False)
    check_target: Callable[[TaskSpec, torch.Tensor], tuple[bool, str]] = field(repr=False)
    needs: str = "dim"
    default_head: str = "mlp"
    finalize: Callable[[dict[str, float], int], dict[str, float]] = field(default=_per_sample_means, repr=False)
    mlp_output: Callable[[TaskSpec], list[torch.nn.Module]] = field(default=lambda spec: [], repr=False)
    mlp_range: tuple[float, float] | None = None


def _has_shape(spec: TaskSpec, target: torch.Tensor) -> tuple[bool, str]:
    return tuple(target.shape) == spec.shape, f"shape {spec.shape}"


def _is_class(spec: TaskSpec, target: torch.Tensor) -> tuple[bool, str]:
    # 0-d: a (1,) sample (targets of shape (N, 1)) passed here and then failed in cross-entropy with a traceback.
    lowest = dense.IGNORE if spec.may_be_unlabelled else 0
    ok = target.dim() == 0 and float(target).is_integer() and lowest <= int(target) < spec.classes
    unlabelled = " or -1 (unlabelled)" if spec.missing_labels else ""
    return ok, (f"a single class index in [0, {spec.classes}){unlabelled} (a 0-d tensor: class targets of shape "
                "(N,), not (N, 1))")


def _is_label_map(spec: TaskSpec, target: torch.Tensor) -> tuple[bool, str]:
    ok = tuple(target.shape) == spec.shape and not target.is_floating_point()
    ok = ok and bool(((target >= dense.IGNORE) & (target < spec.classes)).all())
    return ok, f"integer class indices of shape {spec.shape} in [-1, {spec.classes}) (-1: unlabelled)"


def _classification_sums(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    # An unlabelled target (-1, where the task allows it) matches no prediction and is not counted.
    target = target.long()
    hits, labelled = torch.stack([(pred.argmax(dim=-1) == target).sum(), (target != dense.IGNORE).sum()]).tolist()
    return {"accuracy": hits, "labelled": labelled}


def _classification_metrics(sums: dict[str, float], count: int) -> dict[str, float]:
    """Accuracy over the labelled samples (all of them unless the task has ``missing_labels``)."""
    labelled = sums.get("labelled", 0.0)
    if count and not labelled:
        raise dense.NoTargets("classification", "-1 marks an unlabelled sample", unit="sample")
    return {"accuracy": sums.get("accuracy", 0.0) / max(labelled, 1.0)}


def _regression_sums(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    diff = pred.reshape(target.shape).float() - target.float()
    per_sample = diff.reshape(diff.shape[0], -1)
    return {"mse": (per_sample**2).mean(dim=1).sum().item(), "mae": per_sample.abs().mean(dim=1).sum().item()}


def _map_size(spec: TaskSpec, channels: int) -> int:
    """Outputs of a dense head: ``channels`` per pixel of the target's (H, W), or 0 (invalid) without both."""
    return channels * math.prod(spec.shape[-2:]) if len(spec.shape) >= 2 and channels > 0 else 0


def _map_shape(channels: int) -> Callable[[TaskSpec], int]:
    # A (C, H, W) target of exactly ``channels`` channels.
    return lambda spec: _map_size(spec, channels) if len(spec.shape) == 3 and spec.shape[0] == channels else 0


TASK_TYPES: dict[str, TaskType] = {
    "classification": TaskType(
        default_loss="cross_entropy",
        # pixel_cross_entropy on a (B, K) prediction is cross-entropy over the labelled samples (those not -1).
        losses=("cross_entropy", "pixel_cross_entropy"),
        metrics=(Metric("accuracy", True),),
        output_size=lambda spec: spec.classes,
        batch_sums=_classification_sums,
        check_target=_is_class,
        needs="classes",
        finalize=_classification_metrics,
    ),
    "regression": TaskType(
        default_loss="mse",
        # Not masked_l1 or cosine: they read 0 as missing and dim 1 as channels, which a (B,) target lacks.
        losses=("mse", "exp_mse"),
        metrics=(Metric("mse", False), Metric("mae", False)),
        output_size=lambda spec: spec.dim,
        batch_sums=_regression_sums,
        check_target=lambda spec, target: (target.numel() == spec.dim, f"{spec.dim} values"),
    ),
    "reconstruction": TaskType(
        default_loss="mse",
        losses=("mse", "exp_mse"),
        metrics=(Metric("mse", False), Metric("mae", False)),
        output_size=lambda spec: math.prod(spec.shape),
        batch_sums=_regression_sums,
        check_target=_has_shape,
        needs="shape",
        # Targets are intensities in [0, 1], in the target's shape.
        mlp_output=lambda spec: [torch.nn.Sigmoid(), torch.nn.Unflatten(1, spec.shape)],
        mlp_range=(0.0, 1.0),
    ),
    "segmentation": TaskType(
        default_loss="pixel_cross_entropy",
        # Not cross_entropy: it fails on the -1 of unlabelled pixels.
        losses=("pixel_cross_entropy",),
        metrics=(Metric("miou", True), Metric("pixel_accuracy", True)),
        output_size=lambda spec: _map_size(spec, spec.classes) if len(spec.shape) == 2 else 0,
        batch_sums=dense.segmentation_sums,
        check_target=_is_label_map,
        needs="classes and shape [H, W]",
        default_head="dense",
        finalize=dense.segmentation_metrics,
        # An mlp head's flat output as the (K, H, W) logits the loss and metrics read.
        mlp_output=lambda spec: [torch.nn.Unflatten(1, (spec.classes, *spec.shape))],
    ),
    "depth": TaskType(
        default_loss="masked_l1",
        # Not exp_mse: its norm over a whole map saturates, so the loss stops giving gradient.
        losses=("masked_l1", "mse"),
        metrics=(Metric("abs_err", False), Metric("rel_err", False)),
        output_size=_map_shape(1),
        batch_sums=dense.depth_sums,
        check_target=_has_shape,
        needs="shape [1, H, W]",
        default_head="dense",
        finalize=dense.depth_metrics,
        mlp_output=lambda spec: [torch.nn.Unflatten(1, spec.shape)],
    ),
    "normal": TaskType(
        default_loss="cosine",
        losses=("cosine", "masked_l1", "mse"),
        metrics=(Metric("mean_angle", False), Metric("median_angle", False),
                 *(Metric(dense.within_name(t), True) for t in dense.ANGLE_THRESHOLDS)),
        output_size=_map_shape(3),
        batch_sums=dense.normal_sums,
        check_target=_has_shape,
        needs="shape [3, H, W]",
        default_head="dense",
        finalize=dense.normal_metrics,
        mlp_output=lambda spec: [torch.nn.Unflatten(1, spec.shape)],
    ),
}


def loss_name(spec: TaskSpec) -> str:
    """The entry of :data:`LOSSES` that trains ``spec``."""
    return TASK_TYPES[spec.type].default_loss if spec.loss == "default" else spec.loss


def head_name(spec: TaskSpec) -> str:
    """The head that ``spec``'s task gets: its own, or its type's default."""
    return TASK_TYPES[spec.type].default_head if spec.head == "default" else spec.head


def bind_loss(spec: TaskSpec, device: torch.device) -> LossFunction:
    """``spec``'s training loss as a function of one batch's (predictions, targets), its class weights on
    ``device``: bound once, called every step."""
    return LOSSES[loss_name(spec)].bind(spec.class_weights, spec.missing_labels, device)


def task_loss(spec: TaskSpec, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss of one task on one batch (a scalar); binds it anew (:func:`bind_loss` for a loop)."""
    return bind_loss(spec, pred.device)(pred, target)


def _size(value: object, key: str, name: str, source: str) -> int:
    """A task's ``classes``/``dim`` or one entry of its ``shape``: a whole number (floats like 10.0 are fine)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value:  # numpy's too
        raise MamoError(f"task '{name}' from {source} has {key} {value!r}; give a positive whole number.")
    return int(value)


# Characters a task name cannot hold, and why: most join task names into the names of other things, so a task
# called "a+b" made pair (a+b, c) and pair (a, b+c) one module name, and the second pair could never grow; quotes
# and backslashes broke the exported .pt2 (found by a helper's export audit).
RESERVED_IN_TASK_NAMES = {
    ".": "torch's module names cannot hold (its head lives in one) and metric names use as task.metric",
    "+": "joins the two task names of a pair (gmk_a+b_3, conflicts/Q/a+b/cell3)",
    "@": "joins a pair and a cell into a position (a+b@cell3)",
    '"': "torch.export writes its head's module name into Python source unescaped (the .pt2 would not load)",
    "\\": "torch.export writes its head's module name into Python source unescaped (the .pt2 would not load)",
}


def _chosen_metrics(spec: dict, where: str, kind: str) -> tuple[str, ...]:
    """The spec's ``metrics``: distinct names of its type's metrics, the main one first; () for all of them."""
    if "metrics" not in spec:
        return ()
    chosen, known = spec["metrics"], [metric.name for metric in TASK_TYPES[kind].metrics]
    if hasattr(chosen, "tolist") and not isinstance(chosen, (list, tuple)):  # a numpy array, as class_weights takes
        chosen = chosen.tolist()
    if (not isinstance(chosen, (list, tuple)) or not chosen or any(name not in known for name in chosen)
            or len(set(chosen)) != len(chosen)):
        raise MamoError(f"{where} has metrics {chosen!r}; give a list of distinct names from {', '.join(known)} (the "
                        "main one first), or leave metrics out for all of them.")
    return tuple(chosen)


def parse_tasks(raw: object, source: str) -> dict[str, TaskSpec]:
    """Validate a dataset's ``tasks`` dict and build specs; ``source`` names where it came from."""
    if not isinstance(raw, dict) or not raw:
        raise MamoError(f"the tasks of {source} must be a non-empty dict of task name -> spec, got {raw!r}; give "
                        "at least one, such as {'digit': {'type': 'classification', 'classes': 10}}.")
    specs: dict[str, TaskSpec] = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            raise MamoError(
                f"task '{name}' from {source} has spec {spec!r}, not a mapping; give a dict such as "
                "{'type': 'classification', 'classes': 10}."
            )
        if not isinstance(name, str):  # a plugin's 1 and '1' were one task (one replaced the other silently)
            raise MamoError(f"task {name!r} from {source} has a name of type {type(name).__name__}; name tasks with "
                            f"strings, such as '{name}', in the tasks and in the samples' targets alike.")
        if not name.strip():
            raise MamoError(f"task {name!r} from {source} has an empty name; give it one to show in reports, such as "
                            "'digit'.")
        hidden = next((ch for ch in str(name) if not ch.isprintable()), None)
        if hidden is not None:
            raise MamoError(f"task {name!r} from {source} has the unprintable character U+{ord(hidden):04X} in its "
                            f"name, which the exported programs (a .pt2, ONNX) cannot carry and a table cannot show; "
                            f"rename the task without it.")
        for mark, why in RESERVED_IN_TASK_NAMES.items():
            if mark in str(name):
                raise MamoError(f"task '{name}' from {source} has a '{mark}' in its name, which {why}; rename the "
                                f"task without one.")
        kind = spec.get("type")
        if not isinstance(kind, str) or kind not in TASK_TYPES:
            raise MamoError(
                f"task '{name}' from {source} has unknown type {kind!r}; use one of {', '.join(sorted(TASK_TYPES))}."
            )
        extra = set(spec) - {"type", "classes", "dim", "shape", "head", "loss", "class_weights", "missing_labels",
                             "metrics"}
        if extra:
            raise MamoError(f"task '{name}' from {source} has unknown keys {sorted(extra, key=repr)}; remove them.")
        loss = spec.get("loss", "default")
        if loss != "default" and (not isinstance(loss, str) or loss not in LOSSES):
            raise MamoError(f"task '{name}' from {source} has unknown loss {loss!r}; use one of "
                            f"{', '.join(sorted(LOSSES))}.")
        fitting = TASK_TYPES[kind].losses
        if loss != "default" and loss not in fitting:
            raise MamoError(
                f"task '{name}' from {source} is a {kind} task, which loss {loss!r} cannot score; "
                f"use one of {', '.join(fitting)} or leave loss out."
            )
        shape = spec.get("shape", ())
        if not isinstance(shape, (list, tuple)):
            raise MamoError(f"task '{name}' from {source} has shape {shape!r}; give a list such as [1, 28, 28].")
        task = TaskSpec(
            name=str(name),
            type=kind,
            classes=_size(spec.get("classes", 0), "classes", name, source),
            dim=_size(spec.get("dim", 0), "dim", name, source),
            shape=tuple(_size(s, "shape", name, source) for s in shape),
            head=str(spec.get("head", "default")),
            loss=loss,
        )
        if task.output_size <= 0 or any(s <= 0 for s in task.shape):
            need = TASK_TYPES[task.type].needs
            raise MamoError(f"task '{name}' from {source} of type {task.type} needs positive {need}; fix its spec.")
        weights, missing = label_options(spec, f"task '{name}' from {source}", task.type, task.classes,
                                         loss_name(task))
        task = dataclasses.replace(task, class_weights=weights, missing_labels=missing,
                                   chosen_metrics=_chosen_metrics(spec, f"task '{name}' from {source}", kind))
        specs[task.name] = task
    return specs
