"""The sample contract every dataset meets, built-in or plugin: samples ``(x, {task: target})``, the in-memory
:class:`TensorTaskDataset`, the :class:`MultiTaskData` a builder's result becomes, and the checks that result
passes (:func:`validate`): its structure, the first sample of each split, and for a plugin every sample (in
memory at once; a lazily read val or test split read through once as it loads, a lazily read training split as
each batch is read), each fault one sentence naming the split and the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from mamo import dense
from mamo.data_plugins import raised_at
from mamo.errors import MamoError
from mamo.tasks import TASK_TYPES, TaskSpec, head_name, parse_tasks

SPLITS = ("train", "val", "test")


@dataclass
class MultiTaskData:
    """The three splits, the task specs and the shape of one input."""

    train: Dataset
    val: Dataset
    test: Dataset
    tasks: dict[str, TaskSpec]
    input_shape: tuple[int, ...]


class TensorTaskDataset(Dataset):
    """Samples ``(x[i], {task: targets[task][i]})`` from tensors held in memory.

    ``source_indices`` optionally records where each sample came from (the two-item image datasets store the
    indices of their two source images, shape (N, 2)).
    """

    def __init__(self, x: Tensor, targets: dict[str, Tensor], source_indices: Tensor | None = None):
        if not isinstance(x, Tensor):
            raise MamoError(f"TensorTaskDataset needs x as a torch.Tensor, got {type(x).__name__}; convert it first.")
        if not isinstance(targets, dict) or not targets:
            raise MamoError("TensorTaskDataset needs targets as a non-empty dict of task name -> tensor; pass one.")
        for name, target in targets.items():
            if not isinstance(target, Tensor) or len(target) != len(x):
                size = len(target) if isinstance(target, Tensor) else type(target).__name__
                raise MamoError(
                    f"TensorTaskDataset target '{name}' has {size} samples but x has {len(x)}; "
                    "give every target a tensor with the same first dimension as x."
                )
        self.x = x
        self.targets = dict(targets)
        self.source_indices = source_indices

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.x[i], {name: target[i] for name, target in self.targets.items()}


def _where(index: int, split: str) -> str:
    return f"sample {index} of the '{split}' split"


def _fetch(dataset: Dataset, index: int, split: str, what: str) -> object:
    """``dataset[index]``; an error reading it is one sentence naming the sample."""
    try:
        return dataset[index]
    except MamoError:
        raise  # already one sentence naming what to fix (a built-in dataset's bad file)
    except Exception as exc:
        raise MamoError(f"{what} raised {type(exc).__name__}{raised_at(exc)} reading {_where(index, split)}: {exc}; "
                        "fix the dataset.") from exc


def _as_tensors(sample: object, where: str, what: str) -> tuple[Tensor, dict[str, Tensor]]:
    """A sample as tensors; one that is no (x, {task: target}) pair of tensors is one sentence naming it."""
    if not isinstance(sample, (tuple, list)) or len(sample) != 2 or not isinstance(sample[1], dict):
        got = f"a {type(sample).__name__}" if not isinstance(sample, (tuple, list)) or len(sample) != 2 else (
            f"a pair whose targets are a {type(sample[1]).__name__}")
        raise MamoError(f"{what} gives {got} as {where}; make each sample a pair (x, {{task: target}}).")
    x, targets = sample
    try:
        return torch.as_tensor(x), {k: torch.as_tensor(v) for k, v in targets.items()}
    except (TypeError, ValueError, RuntimeError) as exc:
        raise MamoError(f"{what} gives {where} with values that are not tensors ({exc}); return tensors.") from exc


def _check_values(x: Tensor, targets: dict[str, Tensor], where: str, tasks: dict[str, TaskSpec], what: str) -> None:
    """One sample's input dtype and finiteness, and each task's target against its spec."""
    if x.dtype != torch.float32:
        raise MamoError(f"{what} gives {where} an input of dtype {x.dtype}; return float32 tensors (e.g. x.float()).")
    if not bool(torch.isfinite(x).all()):
        raise MamoError(f"{what} gives {where} an input with NaN or infinite values; clean or drop the sample.")
    for name, spec in tasks.items():
        if name not in targets:
            raise MamoError(
                f"task '{name}' from {what} is missing from the targets of {where} (which has "
                f"{', '.join(map(repr, targets)) or 'none'}); add it to the targets or remove the task."
            )
        target = targets[name]
        ok, expected = TASK_TYPES[spec.type].check_target(spec, target)
        nonfinite = ok and target.is_floating_point() and not bool(torch.isfinite(target).all())
        if nonfinite:
            ok, expected = False, "finite values"
        if not ok:
            if target.numel() == 1 and (target.dim() == 0 or nonfinite):  # else a 1-element shape is what is wrong
                got = f"{target.item()!r}"
            elif nonfinite:
                got = "NaN or infinite values"
            elif spec.shape and tuple(target.shape) == spec.shape:
                # The shape is right, so the values are what is wrong (a label map with 255 for "void", floats).
                dtype = str(target.dtype).removeprefix("torch.")
                got = f"{dtype} values from {target.min().item()!r} to {target.max().item()!r}"
            else:
                got = f"shape {tuple(target.shape)}"
            # A -1 is how a sample without a label is written: the spec's switch for it is the likely fix.
            unlabelled = (spec.type == "classification" and not spec.missing_labels and not target.is_floating_point()
                          and bool((target == -1).any()))
            raise MamoError(
                f"task '{name}' from {what} expects {expected} per sample but {where} has {got}; fix the targets or "
                "the task spec" + (" (for samples without a label, -1 with \"missing_labels\": true in the task's "
                                   "spec)." if unlabelled else ".")
            )


def _checked(
    sample: object, index: int, split: str, tasks: dict[str, TaskSpec], what: str
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sample ``index`` (already read) as tensors, checked against the task specs."""
    x, targets = _as_tensors(sample, _where(index, split), what)
    _check_values(x, targets, _where(index, split), tasks, what)
    return x, targets


def _checked_sample(
    dataset: Dataset, index: int, split: str, tasks: dict[str, TaskSpec], what: str
) -> tuple[Tensor, dict[str, Tensor]]:
    return _checked(_fetch(dataset, index, split, what), index, split, tasks, what)


def _check_sample(dataset: Dataset, split: str, tasks: dict[str, TaskSpec], what: str) -> tuple[int, ...]:
    """The split's length and its first sample; returns the input's shape."""
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise MamoError(f"{what} returned a '{split}' dataset without __len__; give it one.") from exc
    if size < 1:
        raise MamoError(f"{what} returned an empty '{split}' split; give every split at least one sample.")
    shape = tuple(_checked_sample(dataset, 0, split, tasks, what)[0].shape)
    if not shape:  # every backbone takes vectors or images: "use larger inputs" could not help
        raise MamoError(f"{what} gives sample 0 of the '{split}' split a single number as its input (shape ()); "
                        "give each input the shape (1,), a split's x the shape (N, 1).")
    return shape


def _float32_input(value: object) -> bool:
    return (isinstance(value, Tensor) and value.dtype == torch.float32) or (
        isinstance(value, np.ndarray) and value.dtype == np.float32)


def _first_bad_row(x: Tensor, targets: dict[str, Tensor], tasks: dict[str, TaskSpec]) -> int | None:
    """The first row of a split's or a batch's tensors whose values :func:`_check_values` would refuse (shapes
    and dtypes are checked apart), found with whole-tensor operations; None when every row passes."""
    rows = len(x)
    floats = [x, *(targets[name] for name, spec in tasks.items() if targets[name].is_floating_point()
                   and spec.type not in ("classification", "segmentation"))]
    # A sum is finite when every value is (and rarely when not: finite values can overflow it); torch.isfinite
    # row by row takes 17 times as long on a CPU, so it runs only to find the row of a non-finite sum.
    bad = torch.zeros(rows, dtype=torch.bool, device=x.device)  # a plugin may hand out tensors on a GPU
    for values in floats:
        if not bool(torch.isfinite(values.sum())):
            bad |= ~torch.isfinite(values.reshape(rows, -1)).all(dim=1).to(bad.device)
    for name, spec in tasks.items():
        target = targets[name].reshape(rows, -1)
        if target.dtype == torch.bool:  # accepted as class 0/1, but bool tensors have no floor or order
            target = target.to(torch.uint8)
        if spec.type in ("classification", "segmentation"):
            # -1 (unlabelled) is a label map's and a missing_labels task's: flagged here, every batch holding one
            # went to the sample checks, which pass it, and a lazy split stopped as "samples that do not stack".
            low = dense.IGNORE if spec.may_be_unlabelled else 0
            wrong = (target < low) | (target >= spec.classes)
            if target.is_floating_point():
                wrong |= target != target.floor()
            bad |= wrong.any(dim=1).to(bad.device)
    found = bad.nonzero()
    return int(found[0]) if len(found) else None


class CheckedDataset(Dataset):
    """A plugin's lazily read Dataset, checked batch by batch as :func:`mamo.data.iterate_batches` reads it (load
    time checks the first sample only): a bad label, dtype, shape or value deep in a split is one sentence naming
    the sample, not a traceback mid-training. A batch is checked with a few whole-tensor operations; only a batch
    that fails is checked sample by sample, to name the sample (checking every sample alone cost 20–50 µs each:
    on 28 × 28 digits a fifth of a small model's step)."""

    def __init__(self, dataset: Dataset, split: str, tasks: dict[str, TaskSpec], what: str, input_shape: tuple):
        self.dataset, self.split, self.tasks, self.what, self.input_shape = dataset, split, tasks, what, input_shape
        first = self[0]
        targets = _checked(first, 0, split, tasks, what)[1]
        self.target_shapes = {name: tuple(targets[name].shape) for name in tasks}
        self._check_input_type(0, first[0])
        # Tasks not yet seen with a label, and which samples have been read, until each has one: a split read
        # through without a label for a task is refused (it trained blind, or was scored on nothing).
        self._unlabelled = [name for name, spec in tasks.items() if spec.may_be_unlabelled]
        self._read: bytearray | None = bytearray(len(self)) if self._unlabelled else None
        self._read_count = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> object:
        return _fetch(self.dataset, index, self.split, self.what)

    def batch(self, indices: list[int]) -> tuple[Tensor, dict[str, Tensor]]:
        """The samples at ``indices`` stacked (as a DataLoader would), checked."""
        samples = [self[index] for index in indices]
        try:
            # Each input's dtype before stacking, which would promote a uint8 or float16 one without a word.
            fits = all(_float32_input(sample[0]) for sample in samples)
            x, targets = default_collate(samples)
            fits = fits and self._fits(x, targets) and _first_bad_row(x, targets, self.tasks) is None
        except Exception:  # samples that do not stack (shapes, structure): the sample check below names which
            fits = False
        if fits:
            self._note_labels(indices, targets)
            return x, targets
        for index, sample in zip(indices, samples, strict=True):
            x, targets = _checked(sample, index, self.split, self.tasks, self.what)
            self._check_input_type(index, sample[0])
            if tuple(x.shape) != self.input_shape:
                raise MamoError(f"{self.what} gives sample {index} of the '{self.split}' split an input of shape "
                                f"{tuple(x.shape)}, not {self.input_shape} like sample 0; give every input one "
                                "shape.")
            for name, shape in self.target_shapes.items():
                if tuple(targets[name].shape) != shape:
                    raise MamoError(f"{self.what} gives sample {index} of the '{self.split}' split a '{name}' target "
                                    f"of shape {tuple(targets[name].shape)}, not {shape} like sample 0; give every "
                                    "target of a task one shape.")
        raise MamoError(f"{self.what} gives the '{self.split}' split samples that do not stack into one batch "
                        f"(samples {indices[0]}..{indices[-1]}); give every sample the same structure.")

    def _note_labels(self, indices: list[int], targets: dict[str, Tensor]) -> None:
        """Track the tasks without a label so far; once every sample has been read, refuse the first of them."""
        if self._read is None:
            return
        self._unlabelled = [name for name in self._unlabelled if not bool((targets[name] != dense.IGNORE).any())]
        if not self._unlabelled:
            self._read = None
            return
        for index in indices:  # distinct samples: with drop_single a different one sits out each epoch
            self._read_count += not self._read[index]
            self._read[index] = 1
        if self._read_count == len(self._read):
            name = self._unlabelled[0]
            raise no_label_error(self.what, self.split, name, self.tasks[name])

    def read_left_out(self, indices: list[int]) -> None:
        """Read the samples an epoch left out (``drop_single``'s one) while a task has no label yet: with k ×
        batch + 1 samples no epoch reads every sample, so a one-epoch run trained such a task blind to its end."""
        if self._read is not None and indices:
            self.batch(indices)

    def _check_input_type(self, index: int, raw: object) -> None:
        if not _float32_input(raw):  # a list passes the tensor conversion of the sample check, but not a batch
            raise MamoError(f"{self.what} gives sample {index} of the '{self.split}' split an input of type "
                            f"{type(raw).__name__}; return a float32 tensor, e.g. torch.as_tensor(x, "
                            "dtype=torch.float32).")

    def _fits(self, x: object, targets: object) -> bool:
        """The stacked batch's types, dtypes and shapes are sample 0's."""
        if not isinstance(x, Tensor) or x.dtype != torch.float32 or tuple(x.shape[1:]) != self.input_shape:
            return False
        if not isinstance(targets, dict) or not all(isinstance(targets.get(name), Tensor) for name in self.tasks):
            return False
        return all(tuple(targets[name].shape[1:]) == shape and not (
            spec.type == "segmentation" and targets[name].is_floating_point())
            for (name, shape), spec in zip(self.target_shapes.items(), self.tasks.values(), strict=True))


def _check_every_sample(dataset: Dataset, split: str, tasks: dict[str, TaskSpec], what: str,
                        input_shape: tuple) -> Dataset:
    """A plugin's split with all of it checked: in memory at once, otherwise batch by batch as it is read."""
    if not isinstance(dataset, TensorTaskDataset):
        return CheckedDataset(dataset, split, tasks, what, input_shape)
    row = _first_bad_row(dataset.x, dataset.targets, tasks)
    if row is not None:
        _checked_sample(dataset, row, split, tasks, what)  # raises the sentence that names what is wrong
    for name, spec in tasks.items():  # a split without one label: said as it loads, not after the training
        if spec.may_be_unlabelled and not bool((dataset.targets[name] != dense.IGNORE).any()):
            raise no_label_error(what, split, name, spec)
    return dataset


def no_label_error(what: str, split: str, name: str, spec: TaskSpec) -> MamoError:
    """The sentence for a split that has no labelled target of task ``name``."""
    if split == "train":  # never scored, so without this it trained blind
        return MamoError(f"{what} gives task '{name}' no labelled sample in the 'train' split (every target is -1), "
                         "so it cannot learn; label some of its samples or remove the task.")
    unit = "pixel" if spec.type == "segmentation" else "sample"
    # Naming the source too: a search's log did not say which of its data the split came from.
    return MamoError(f"{what} gives task '{name}' no labelled {unit} in the '{split}' split (-1 marks an unlabelled "
                     f"{unit}), so its {spec.type} metrics there are undefined; label some of that split's {unit}s "
                     "or remove the task.")


def validate(result: object, what: str, plugin: bool = False) -> MultiTaskData:
    """``result`` of the builder ``what`` names, checked, as a :class:`MultiTaskData` (a plugin's lazily read val
    and test splits are then read through by :func:`mamo.data.read_through`)."""
    if not isinstance(result, dict):
        raise MamoError(
            f"{what} returned {type(result).__name__}, not a dict with train, val, test and tasks; return that dict."
        )
    missing = [key for key in ("train", "val", "test", "tasks") if key not in result]
    if missing:
        raise MamoError(
            f"{what} returned a dict without {', '.join(repr(k) for k in missing)}; "
            "return keys train, val, test and tasks."
        )
    for split in SPLITS:
        if not isinstance(result[split], Dataset):
            raise MamoError(
                f"{what} returned '{split}' as {type(result[split]).__name__}, not a torch Dataset; "
                "wrap it, e.g. in mamo.data.TensorTaskDataset."
            )
    tasks = parse_tasks(result["tasks"], what)
    shapes = {split: _check_sample(result[split], split, tasks, what) for split in SPLITS}
    if len(set(shapes.values())) > 1:
        raise MamoError(f"{what} gives inputs of different shapes per split ({shapes}); make them equal.")
    splits = {split: result[split] for split in SPLITS}
    if plugin:  # the built-ins are tested; a user's data is checked beyond its first sample
        splits = {split: _check_every_sample(data, split, tasks, what, shapes["train"])
                  for split, data in splits.items()}
    return MultiTaskData(splits["train"], splits["val"], splits["test"], tasks, shapes["train"])


def targets_without_a_task(data: MultiTaskData) -> list[str]:
    """The training targets no task spec names (a plugin's ``tasks`` that left one out): nothing trains them.
    Only in-memory :class:`TensorTaskDataset` targets are looked at, as in :func:`unreachable_target_notes`."""
    train = data.train
    return [name for name in train.targets if name not in data.tasks] if isinstance(train, TensorTaskDataset) else []


def no_task_spec(targets: list[str]) -> str:
    """``target 'reg' has no task spec`` (or ``targets 'a', 'b' have ...``), for a note or an error."""
    several = len(targets) > 1
    return f"target{'s' if several else ''} {', '.join(map(repr, targets))} {'have' if several else 'has'} no task spec"


def untrained_target_notes(data: MultiTaskData) -> list[str]:
    """A note for targets no task trains: a task left out of ``tasks`` trained nothing without a word."""
    extra = targets_without_a_task(data)
    if not extra:
        return []
    it = "them" if len(extra) > 1 else "it"
    return [f"note: the data's {no_task_spec(extra)}, so nothing trains on {it}; add {it} to the tasks to train {it}."]


def unreachable_target_notes(data: MultiTaskData) -> list[str]:
    """Notes for training targets outside what their task's ``mlp`` head can output (a reconstruction's sigmoid):
    not refused, since the loss still trains toward them, but the task cannot fit them. Only in-memory
    :class:`TensorTaskDataset` targets are looked at; a lazy dataset is not read twice for a note."""
    train, notes = data.train, []
    if not isinstance(train, TensorTaskDataset):
        return notes
    for name, task in data.tasks.items():
        kind = TASK_TYPES[task.type]
        if kind.mlp_range is None or head_name(task) != "mlp" or name not in train.targets or not len(train):
            continue
        (bottom, top), target = kind.mlp_range, train.targets[name]
        low, high = target.min().item(), target.max().item()
        if low < bottom or high > top:
            notes.append(f"note: task '{name}' has training targets in [{low:.4g}, {high:.4g}], but its mlp head "
                         f"outputs only [{bottom:g}, {top:g}]; scale the targets into [{bottom:g}, {top:g}] for it to "
                         "reach them.")
    return notes
