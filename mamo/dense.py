"""Dense-prediction tasks (NYUv2, Cityscapes): per-pixel losses and metrics, as in MTAN's protocol.

Targets, one sample each (the layout of MTAN's pre-processed .npy files, channels first):

* ``segmentation``: (H, W) class indices, ``-1`` where a pixel is unlabelled; the network gives (K, H, W)
  logits. Loss: cross-entropy over labelled pixels. Metrics: mIoU and pixel accuracy.
* ``depth``: (1, H, W), ``0`` where depth is missing. Loss: L1 over valid pixels. Metrics: absolute and
  relative error.
* ``normal``: (3, H, W) unit vectors, all ``0`` where missing. Loss: 1 − cosine over valid pixels (the
  prediction is normalised first). Metrics: mean and median angle error (degrees) and the share of valid
  pixels within 11.25°, 22.5° and 30°.

Metrics are computed over every pixel of a split (a confusion matrix for mIoU, pixel counts otherwise), not
averaged per batch as MTAN's evaluation loop does, so they do not depend on the batch size (LibMTL's
segmentation and depth metrics are whole-split too). Each
``*_sums`` function returns additive counts for one batch; the matching ``*_metrics`` turns their totals
over a split into the metrics. The median angle is read off a 0.1° histogram (to within 0.05°).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mamo.errors import MamoError

IGNORE = -1  # segmentation label of an unlabelled pixel
ANGLE_BIN = 0.1  # degrees per bin of the angle-error histogram
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)


def within_name(threshold: float) -> str:
    """The metric name of the share within ``threshold`` degrees (no dot: names join as task.metric)."""
    return f"within_{threshold:g}".replace(".", "_")


def _valid(target: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) mask of pixels whose target has any non-zero channel (MTAN and LibMTL test the channels'
    sum, which also drops a unit normal whose components sum to 0)."""
    return (target != 0).any(dim=1, keepdim=True)


def valid_pixels(target: torch.Tensor) -> float:
    """How many pixels of a depth or normal batch the masked losses average over."""
    return float(_valid(target).sum())


def _labelled(target: torch.Tensor) -> torch.Tensor:
    """How many pixels of a segmentation batch carry a label (a 0-d tensor)."""
    return (target.long() != IGNORE).sum()


# ----------------------------------------------------------------------------------------------------- losses


def segmentation_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Summed and divided by the labelled pixels: the mean over them, and 0 (not NaN) for a batch with none.
    target = target.long()
    total = F.cross_entropy(pred, target, ignore_index=IGNORE, reduction="sum")
    return total / _labelled(target).clamp_min(1)


def depth_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.to(pred.dtype)
    mask = _valid(target).to(pred.dtype)
    return ((pred - target).abs() * mask).sum() / mask.sum().clamp_min(1.0)


def normal_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.to(pred.dtype)
    mask = _valid(target).to(pred.dtype)
    cosine = (F.normalize(pred, dim=1) * target).sum(dim=1, keepdim=True)
    return 1.0 - (cosine * mask).sum() / mask.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------------- metrics


class NoTargets(MamoError):
    """A split without one valid pixel (or labelled sample) for a task has no metrics for it (they were 0: a
    perfect error)."""

    def __init__(self, task_type: str, marker: str, split: str = "evaluated", unit: str = "pixel",
                 task: str | None = None):
        where = "files" if unit == "pixel" else "targets"  # dense targets come from files, class targets from data
        named = f"task '{task}': " if task is not None else ""  # several tasks may share a type
        super().__init__(f"{named}no {unit} of the {split} split has a {task_type} target ({marker}), so its "
                         f"{task_type} metrics are undefined; check that split's {task_type} {where}.")
        self.task_type, self.marker, self.split, self.unit, self.task = task_type, marker, split, unit, task

    def of_split(self, split: str) -> NoTargets:
        """The same sentence naming the split (the metrics do not know which split they sum)."""
        return NoTargets(self.task_type, self.marker, f"'{split}'", self.unit, self.task)

    def of_task(self, task: str) -> NoTargets:
        """The same sentence naming the task (the metrics do not know which task they score)."""
        return NoTargets(self.task_type, self.marker, self.split, self.unit, task)


def _check_pixels(pixels: float, task_type: str, marker: str) -> None:
    if pixels == 0:
        raise NoTargets(task_type, marker)


def segmentation_sums(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The batch's confusion matrix, flattened as ``confusion/<true>/<predicted>`` counts."""
    classes = pred.shape[1]
    labels = target.long().reshape(-1)
    guesses = pred.argmax(dim=1).reshape(-1)
    keep = (labels >= 0) & (labels < classes)
    counts = torch.bincount(labels[keep] * classes + guesses[keep], minlength=classes * classes).tolist()
    return {f"confusion/{k // classes}/{k % classes}": float(n) for k, n in enumerate(counts)}


def segmentation_metrics(sums: dict[str, float], count: int) -> dict[str, float]:
    """mIoU over the classes that occur (in the labels or the predictions), and pixel accuracy."""
    classes = math.isqrt(sum(key.startswith("confusion/") for key in sums))
    matrix = [[sums.get(f"confusion/{i}/{j}", 0.0) for j in range(classes)] for i in range(classes)]
    total = sum(map(sum, matrix))
    _check_pixels(total, "segmentation", "-1 marks an unlabelled pixel")
    hits = [matrix[k][k] for k in range(classes)]
    unions = [sum(matrix[k]) + sum(row[k] for row in matrix) - hits[k] for k in range(classes)]
    ious = [hit / union for hit, union in zip(hits, unions, strict=True) if union > 0]
    return {"miou": sum(ious) / len(ious), "pixel_accuracy": sum(hits) / total}


def depth_sums(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    target = target.float()
    mask = _valid(target)
    error = (pred.float() - target).abs()[mask]
    return {"abs_sum": error.sum().item(), "rel_sum": (error / target[mask]).sum().item(),
            "pixels": float(mask.sum().item())}


def depth_metrics(sums: dict[str, float], count: int) -> dict[str, float]:
    pixels = sums.get("pixels", 0.0)
    _check_pixels(pixels, "depth", "0 marks missing depth")
    return {"abs_err": sums.get("abs_sum", 0.0) / pixels, "rel_err": sums.get("rel_sum", 0.0) / pixels}


def normal_sums(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Angle errors of the valid pixels as a histogram of ANGLE_BIN-wide bins, and their sum."""
    target = target.float()
    mask = _valid(target)[:, 0]
    cosine = (F.normalize(pred.float(), dim=1) * target).sum(dim=1)[mask].clamp(-1.0, 1.0)
    angles = torch.rad2deg(torch.acos(cosine))
    bins = round(180 / ANGLE_BIN)
    histogram = torch.bincount((angles / ANGLE_BIN).long().clamp(0, bins - 1), minlength=bins).tolist()
    sums = {f"angles/{b}": float(n) for b, n in enumerate(histogram) if n}
    return {**sums, "angle_sum": angles.sum().item(), "pixels": float(angles.numel())}


def normal_metrics(sums: dict[str, float], count: int) -> dict[str, float]:
    pixels = sums.get("pixels", 0.0)
    _check_pixels(pixels, "normal", "all 0 marks a missing normal")
    histogram = sorted((int(key.split("/")[1]), n) for key, n in sums.items() if key.startswith("angles/"))

    def ranked(rank: float) -> float:
        """The centre of the bin holding the rank-th smallest angle (0-based)."""
        seen = 0.0
        for b, n in histogram:
            seen += n
            if seen > rank:
                return (b + 0.5) * ANGLE_BIN
        return 0.0

    # As numpy's median: the middle angle, or the mean of the two middle ones; within half a bin.
    median = (ranked((pixels - 1) // 2) + ranked(pixels // 2)) / 2
    metrics = {"mean_angle": sums.get("angle_sum", 0.0) / pixels, "median_angle": median}
    for threshold in ANGLE_THRESHOLDS:
        # A bin counts when it lies wholly below the threshold (11.25 splits a bin: its share is interpolated).
        below = sum(n * min(1.0, max(0.0, threshold / ANGLE_BIN - b)) for b, n in histogram)
        metrics[within_name(threshold)] = below / pixels
    return metrics
