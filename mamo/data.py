"""Datasets: built-in multi-task problems, user plugins, and the batch iterator the trainer uses.

A dataset, built-in or plugin, is a function returning ``{"train": Dataset, "val": Dataset, "test": Dataset,
"tasks": {name: {"type": ..., ...}}}`` whose samples are ``(x, {task: target})``. Built-ins are entries of
:data:`DATASETS`; a plugin is named ``path/to/file.py:function`` or ``package.module:function`` (found and
called by :mod:`mamo.data_plugins`). :func:`load_data` builds and validates either and returns a
:class:`MultiTaskData`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mamo import digits, scenes
from mamo.config import DataConfig
from mamo.data_plugins import SIZE_KEYS, builder_arguments, load_plugin, plugin_source_digest, raised_at, raised_by_mamo
from mamo.errors import MamoError
from mamo.samples import SPLITS, CheckedDataset, MultiTaskData, TensorTaskDataset, validate

DEFAULT_SIZES = MappingProxyType({"train_size": 20_000, "val_size": 2_000, "test_size": 4_000})


# ---------------------------------------------------------------------------------------------------- built-ins


def _classes(k: int) -> dict:
    return {"type": "classification", "classes": k}


# Peak host memory per composite image while a split is built (canvases, float copies, the resized outputs):
# 17.8-18.0 KB measured for multimnist_recon (the larger case) at 50,000 and 100,000 images.
BYTES_PER_COMPOSITE = 18_000


def available_memory() -> int | None:
    """Bytes the machine can still give (Linux's MemAvailable), or None where that is not known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(sizes: dict[str, int]) -> None:
    """Refuse split sizes whose images cannot be built in this machine's memory: the kernel would kill the
    process part-way, with no message."""
    needed, free = sum(sizes.values()) * BYTES_PER_COMPOSITE, available_memory()
    if free is not None and needed > free:
        largest = max(sizes, key=sizes.get)
        raise MamoError(f"data.{largest}_size = {sizes[largest]} (with the other splits, {sum(sizes.values())} images) "
                        f"needs about {needed / 1e9:.1f} GB to build, and this machine has {free / 1e9:.1f} GB "
                        f"available; lower data.{largest}_size.")


def _two_item(
    left: digits.Source,
    right: digits.Source,
    seed: int,
    sizes: tuple[int | None, ...],
    names: tuple[str, str],
    right_alone: bool = False,
) -> dict:
    out: dict[str, Any] = {}
    counts = {split: default if size is None else size
              for split, size, default in zip(SPLITS, sizes, DEFAULT_SIZES.values(), strict=True)}
    _check_memory(counts)
    for split, n in counts.items():
        part = digits.make_split(left, right, split, n, seed, right_alone)
        second = part["right_image"] if right_alone else part["right"]
        out[split] = TensorTaskDataset(part["x"], {names[0]: part["left"], names[1]: second}, part["source_indices"])
    right_task = {"type": "reconstruction", "shape": [1, digits.OUT, digits.OUT]} if right_alone else _classes(10)
    out["tasks"] = {names[0]: _classes(10), names[1]: right_task}
    return out


def build_multimnist(
    *, seed: int, root: str | None, train_size: int | None, val_size: int | None, test_size: int | None
) -> dict:
    """MultiMNIST: two MNIST digits, tasks ``left`` and ``right`` (10 classes each). ``root`` is unused."""
    mnist = digits.load_mnist()
    return _two_item(mnist, mnist, seed, (train_size, val_size, test_size), ("left", "right"))


def build_multimnist_recon(
    *, seed: int, root: str | None, train_size: int | None, val_size: int | None, test_size: int | None
) -> dict:
    """MultiMNIST with ``right`` as reconstruction of the bottom-right digit alone (thesis §5.3)."""
    mnist = digits.load_mnist()
    return _two_item(mnist, mnist, seed, (train_size, val_size, test_size), ("left", "right"), right_alone=True)


def build_multimnist_sum(
    *, seed: int, root: str | None, train_size: int | None, val_size: int | None, test_size: int | None
) -> dict:
    """MultiMNIST with a third task ``sum``: the sum of the two digits (19 classes), which needs both of them.

    With three tasks a GMK's pair is not every task, so GMK mediation differs from the trunk's (DESIGN §4).
    """
    out = build_multimnist(seed=seed, root=root, train_size=train_size, val_size=val_size, test_size=test_size)
    for split in SPLITS:
        targets = out[split].targets
        targets["sum"] = targets["left"] + targets["right"]
    out["tasks"]["sum"] = _classes(19)
    return out


def build_multifashion(
    *, seed: int, root: str | None, train_size: int | None, val_size: int | None, test_size: int | None
) -> dict:
    """Multi-Fashion: two Fashion-MNIST items from the idx files in ``root``; tasks ``left`` and ``right``."""
    fashion = digits.load_fashion(root)
    return _two_item(fashion, fashion, seed, (train_size, val_size, test_size), ("left", "right"))


def build_multi_fashion_mnist(
    *, seed: int, root: str | None, train_size: int | None, val_size: int | None, test_size: int | None
) -> dict:
    """Multi-(Fashion+MNIST): an MNIST digit top-left, a Fashion-MNIST item bottom-right; tasks ``digit``, ``fashion``.

    ``source_indices[:, 0]`` indexes the MNIST digits, ``[:, 1]`` the Fashion-MNIST items (train files then t10k).
    """
    sizes = (train_size, val_size, test_size)
    return _two_item(digits.load_mnist(), digits.load_fashion(root), seed, sizes, ("digit", "fashion"))


GATES: MappingProxyType[str, Callable[[Tensor, Tensor], Tensor]] = MappingProxyType(
    {
        "and": lambda a, b: a & b,
        "or": lambda a, b: a | b,
        "xor": lambda a, b: a ^ b,
        "nand": lambda a, b: 1 - (a & b),
        "nor": lambda a, b: 1 - (a | b),
        "xnor": lambda a, b: 1 - (a ^ b),
    }
)


MAX_LOGIC_SCALE = 1e18  # data.options.scale of 'logic'
MAX_CONCAVE_D = 1_000_000  # data.options.d of 'concave'
# Built-in datasets whose splits are fixed, and what each split holds, and those that read no data.root: what a
# run sets of these is unused, which unused_data_note says (it was ignored without a word). A note, not a refusal:
# the sizes often come from a preset made for another dataset (quick's, with --set data.name=logic).
FIXED_SPLITS: MappingProxyType[str, str] = MappingProxyType({"logic": "the four input pairs",
                                                             "concave": "one constant input"})
NO_FOLDER = ("multimnist", "multimnist_recon", "multimnist_sum", "logic", "concave")


def build_logic(
    *,
    seed: int,
    root: str | None,
    train_size: int | None,
    val_size: int | None,
    test_size: int | None,
    gates: object = ("xor", "and"),  # a list of names from GATES (or one name), as YAML gives it
    scale: float = 1.0,
) -> dict:
    """Logic gates (thesis §5.2): the four binary pairs, one regression task (dim 1) per gate in ``gates``.

    The XOR target is multiplied by ``scale`` (the thesis' c). Train, val and test are the same four points,
    since fitting them is the whole problem; ``seed`` and ``root`` are ignored (sizes: :data:`FIXED_SPLITS`).
    """
    names = [gates] if isinstance(gates, str) else list(gates) if isinstance(gates, (list, tuple)) else None
    # Strings only before the look-up: a YAML list inside the list is unhashable (a TypeError, not this sentence).
    if (not names or not all(isinstance(name, str) for name in names) or any(name not in GATES for name in names)
            or len(set(names)) != len(names)):
        raise MamoError(
            f"data.options.gates for dataset 'logic' must be distinct names from {sorted(GATES)}, "
            f"got {gates!r}; fix the list."
        )
    # Its square (the MSE) must fit in float32: a larger one made NaN targets or blamed train.lr.
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) <= MAX_LOGIC_SCALE:
        raise MamoError(f"data.options.scale for dataset 'logic' must be a number in [-1e18, 1e18], got {scale!r}; "
                        "fix it (the thesis uses 1 and 10).")
    pairs = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    targets = {}
    for name in names:
        factor = float(scale) if name == "xor" else 1.0
        targets[name] = GATES[name](pairs[:, 0], pairs[:, 1]).to(torch.float32).unsqueeze(1) * factor
    dataset = TensorTaskDataset(pairs.to(torch.float32), targets)
    tasks = {name: {"type": "regression", "dim": 1} for name in names}
    return {"train": dataset, "val": dataset, "test": dataset, "tasks": tasks}


def build_concave(
    *, seed: int, root: str | None, train_size: int | None, val_size: int | None, test_size: int | None, d: int = 20
) -> dict:
    """Pareto MTL's concave problem (Eq 19): minimise 1-exp(-||x∓1/sqrt(d)||²) over x in R^d.

    One constant input [1.0] per split; tasks ``f1``/``f2`` regress to ±1/sqrt(d) with the ``exp_mse`` loss
    through an identity head, so the network's output is x. ``seed`` and ``root`` are ignored (sizes:
    :data:`FIXED_SPLITS`).
    """
    # Bounded: d = 10**9 took 78 s and 15 GB before a later check refused it.
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_CONCAVE_D:
        raise MamoError(f"data.options.d for dataset 'concave' must be an integer in [1, {MAX_CONCAVE_D:,}], got "
                        f"{d!r}; fix it (Pareto MTL uses 20).")
    target = torch.full((1, d), 1.0 / math.sqrt(d))
    dataset = TensorTaskDataset(torch.ones(1, 1), {"f1": target, "f2": -target})
    task = {"type": "regression", "dim": d, "loss": "exp_mse", "head": "identity"}
    return {"train": dataset, "val": dataset, "test": dataset, "tasks": {"f1": dict(task), "f2": dict(task)}}


DATASETS: dict[str, Callable[..., dict]] = {
    "multimnist": build_multimnist,
    "multimnist_recon": build_multimnist_recon,
    "multimnist_sum": build_multimnist_sum,
    "multifashion": build_multifashion,
    "multi_fashion_mnist": build_multi_fashion_mnist,
    "logic": build_logic,
    "concave": build_concave,
    "nyuv2": scenes.build_nyuv2,
    "cityscapes": scenes.build_cityscapes,
}


def unused_data_note(cfg: DataConfig) -> str | None:
    """A note naming the data settings ``cfg`` sets that its built-in dataset does not use, or None."""
    unused = [f"data.{key}" for key in SIZE_KEYS if getattr(cfg, key) is not None] if cfg.name in FIXED_SPLITS else []
    unused += ["data.root"] if cfg.name in NO_FOLDER and cfg.root is not None else []
    if not unused:
        return None
    why = f"has fixed splits ({FIXED_SPLITS[cfg.name]} in each)" if cfg.name in FIXED_SPLITS else "reads no folder"
    return (f"note: dataset '{cfg.name}' {why}, so {' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not "
            "used.")


def load_data(cfg: DataConfig, progress: bool = False) -> MultiTaskData:
    """Build the dataset ``cfg.name`` (built-in or plugin) with ``cfg.options`` and validate what it returns
    (``progress``: a status while it is built, a bar while a plugin's lazily read evaluation split is checked)."""
    if not -(2**63) <= cfg.seed < 2**63:  # what a 64-bit generator (numpy's, torch's, a plugin's) can take
        raise MamoError(f"data.seed must be an integer in [-2**63, 2**63), got {cfg.seed}; set e.g. data.seed=0.")
    if cfg.name in DATASETS:
        builder, what, plugin = DATASETS[cfg.name], f"dataset '{cfg.name}'", False
    elif ":" in cfg.name:
        builder, what, plugin = load_plugin(cfg.name), f"data plugin '{cfg.name}'", True
    else:
        raise MamoError(
            f"unknown dataset '{cfg.name}'; use one of {', '.join(DATASETS)} or a plugin 'file.py:function'."
        )
    kwargs = builder_arguments(builder, cfg, what, plugin)
    # After the imports' seconds, the build (1 s for the 20,000-image sets, a scene folder's file headers, a
    # plugin's own work) left the terminal blank before a run's first line: a status names it until it is built.
    with tqdm(desc=f"loading {what}", bar_format="{desc}", disable=not progress, leave=False):
        if not plugin:
            return validate(builder(**kwargs), what)
        try:
            result = builder(**kwargs)
        except MamoError as exc:
            # mamo's helpers (TensorTaskDataset) name neither plugin nor line; the plugin's own sentence stays.
            if raised_by_mamo(exc) and (where := raised_at(exc)):
                raise MamoError(f"{what} failed{where}: {exc}") from exc
            raise
        except Exception as exc:
            raise MamoError(f"{what} raised {type(exc).__name__}{raised_at(exc)}: {exc}; fix the plugin.") from exc
    data = validate(result, what, plugin=True)
    read_through(data, progress)
    return data


def read_through(data: MultiTaskData, progress: bool = False) -> None:
    """Read and check every sample of a plugin's lazily read val and test splits now, in evaluation batches:
    their faults (a bad sample, a task without a label) otherwise stopped the run only when scored, the test
    split after a whole phase of training, which a resume with the fixed plugin trained again (the plugin's
    source is part of the baseline cache's key). The training split is checked as its first epoch reads it."""
    size = evaluation_batch_size(1, data.input_shape)
    # Batches taken directly, not through iterate_batches, which draws from torch's global generator as a
    # DataLoader does: an extra epoch of draws here would change every later random number of the run.
    for dataset in (data.val, data.test):
        if not isinstance(dataset, CheckedDataset):
            continue
        for start in tqdm(range(0, len(dataset), size), desc=f"checking the '{dataset.split}' split",
                          disable=not progress, leave=False, dynamic_ncols=True):
            dataset.batch(list(range(start, min(start + size, len(dataset)))))


LoadData = Callable[[DataConfig, bool], MultiTaskData]  # load_data, or a DataMemo in its place


class DataMemo:
    """:func:`load_data` that keeps what it built, for a process that runs many searches on one dataset (a tune
    worker's trials): building took 0.6–1.2 s per trial for the built-in sets (a fifth of a 2.9 s quick-preset
    trial, measured) and a lazily read plugin's read-through more. Called like :func:`load_data`; the data is built
    again when the settings, or a plugin's source, differ from the last call's. Files a dataset reads are not
    compared, and a memo pickles empty (a spawned worker builds its own, rather than receive tensors).

    Sharing the data is safe because a run never changes it and seeds torch's generators after loading it, so
    a trial on remembered data trains as one that built it (a plugin drawing from numpy's or Python's global
    generator as it reads samples aside).
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._data: MultiTaskData | None = None

    @staticmethod
    def key(cfg: DataConfig) -> str:
        plugin = plugin_source_digest(cfg.name) if ":" in cfg.name else None
        return repr((dataclasses.astuple(cfg), plugin))

    def keep(self, cfg: DataConfig, data: MultiTaskData) -> None:
        """Remember ``data`` as what ``cfg`` builds (the study's reference loaded it before the first trial)."""
        self._key, self._data = self.key(cfg), data

    def __call__(self, cfg: DataConfig, progress: bool = False) -> MultiTaskData:
        key = self.key(cfg)
        if self._data is None or key != self._key:
            self._key, self._data = None, None  # the old data is freed before the new one is built
            self._data, self._key = load_data(cfg, progress), key
        return self._data

    def __getstate__(self) -> dict:
        return {"_key": None, "_data": None}


# ----------------------------------------------------------------------------------------------------- batching


def batches_per_epoch(size: int, batch_size: int, drop_single: bool = False) -> int:
    """How many batches :func:`iterate_batches` yields for ``size`` samples."""
    full, rest = divmod(size, batch_size)
    return full + (rest > 1 or (rest == 1 and not (drop_single and full)))


# Evaluation keeps no graph, so it takes batches of up to 256, but never more input values than this: 256
# NYUv2 images (3 × 288 × 384) made 1.5 GB of segmentation logits and a 15 GB peak RSS in a search (measured).
EVALUATION_INPUT_VALUES = 2**22


def evaluation_batch_size(train_batch: int, input_shape: tuple[int, ...]) -> int:
    """Samples per evaluation batch: 256 for small inputs (digits: 256), fewer for large ones (NYUv2: 12), never
    fewer than the training batch."""
    return max(train_batch, min(256, EVALUATION_INPUT_VALUES // max(1, math.prod(input_shape))))


def iterate_batches(
    dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None, drop_single: bool = False
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """One epoch of ``(x, {task: target})`` batches; the order depends only on ``generator`` when shuffling.

    ``drop_single`` (training) skips a last batch of one sample after full ones: batch-norm in training mode
    raises on one value per channel, which one image gives once its feature map has shrunk to 1 × 1 (timm's
    ResNets on 32 × 32 inputs). With shuffling a different sample sits out each epoch.

    A :class:`TensorTaskDataset` is sliced directly (a DataLoader would collate sample by sample, which
    dominates the time on small models); any other Dataset goes through a DataLoader in the main process.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MamoError(f"batch size must be a positive integer, got {batch_size!r}; fix train.batch_size.")
    count = batches_per_epoch(len(dataset), batch_size, drop_single)
    if isinstance(dataset, TensorTaskDataset):
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if shuffle else None
        for start in range(0, count * batch_size, batch_size):
            if order is None:
                rows: slice | Tensor = slice(start, start + batch_size)
            else:
                rows = order[start : start + batch_size]
            yield dataset.x[rows], {name: target[rows] for name, target in dataset.targets.items()}
        return
    if isinstance(dataset, CheckedDataset):
        yield from _checked_batches(dataset, batch_size, shuffle, generator, count)
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)
    for batch in itertools.islice(loader, count):
        # default_collate turns the (x, targets) pair into a list; keep the promised tuple.
        yield batch[0], batch[1]


def _checked_batches(
    dataset: CheckedDataset, batch_size: int, shuffle: bool, generator: torch.Generator | None, count: int
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """The ``count`` batches a DataLoader gives, in its order and with its random draws (so results, and the
    random streams after them, are what they were), but with their indices, so that a batch that fails its
    check can name the sample."""
    n = len(dataset)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's workers' base seed
    order = list(range(n))
    if shuffle:
        if generator is None:  # RandomSampler's own generator, seeded from the global one
            generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        order = torch.randperm(n, generator=generator).tolist()
    for start in range(0, count * batch_size, batch_size):
        if shuffle and start + batch_size > n:
            # A last, partial batch exhausts RandomSampler, which then draws an empty tail: randperm(n)[:0].
            torch.randperm(n, generator=generator)
        yield dataset.batch(order[start : start + batch_size])
    dataset.read_left_out(order[count * batch_size :])  # the sample drop_single left out, for its labels
