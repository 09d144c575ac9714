"""Datasets: built-ins are deterministic, disjoint and well-formed; plugins are validated; batching is exact."""

from __future__ import annotations

import gzip
import os
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from mamo import digits
from mamo.config import DataConfig
from mamo.data import (
    DATASETS,
    DEFAULT_SIZES,
    MultiTaskData,
    TensorTaskDataset,
    iterate_batches,
    load_data,
    unused_data_note,
)
from mamo.errors import MamoError
from mamo.tasks import LOSSES, TASK_TYPES, parse_tasks, task_loss

SMALL = {"train_size": 300, "val_size": 100, "test_size": 200}
FASHION_ROOT = Path(digits.DEFAULT_FASHION_ROOT)
needs_fashion = pytest.mark.skipif(
    not (FASHION_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed in {FASHION_ROOT} (apt-get install dataset-fashion-mnist)",
)


def build(name: str, seed: int = 0, **extra) -> MultiTaskData:
    return load_data(DataConfig(name=name, seed=seed, **{**SMALL, **extra}))


@pytest.fixture(scope="module")
def mnist() -> digits.Source:
    return digits.load_mnist()


@pytest.fixture(scope="module")
def multimnist() -> MultiTaskData:
    return build("multimnist")


@pytest.fixture(scope="module")
def recon() -> MultiTaskData:
    return build("multimnist_recon")


def splits(data: MultiTaskData) -> dict[str, TensorTaskDataset]:
    return {"train": data.train, "val": data.val, "test": data.test}


def used_indices(dataset: TensorTaskDataset, column: int) -> set[int]:
    return set(dataset.source_indices[:, column].tolist())


def assert_same(a: MultiTaskData, b: MultiTaskData) -> None:
    for split in ("train", "val", "test"):
        da, db = getattr(a, split), getattr(b, split)
        assert torch.equal(da.x, db.x)
        assert da.targets.keys() == db.targets.keys()
        assert all(torch.equal(da.targets[k], db.targets[k]) for k in da.targets)


# ------------------------------------------------------------------------------------------------- MultiMNIST


def test_multimnist_shapes_dtypes_and_ranges(multimnist: MultiTaskData) -> None:
    assert multimnist.input_shape == (1, 28, 28)
    assert {name: spec.to_dict() for name, spec in multimnist.tasks.items()} == {
        "left": {"type": "classification", "classes": 10},
        "right": {"type": "classification", "classes": 10},
    }
    for split, n in zip(("train", "val", "test"), SMALL.values(), strict=True):
        ds = getattr(multimnist, split)
        assert ds.x.shape == (n, 1, 28, 28) and ds.x.dtype == torch.float32
        assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0 and ds.x.max() > 0.5
        assert ds.source_indices.shape == (n, 2) and ds.source_indices.dtype == torch.int64
        for task in ("left", "right"):
            y = ds.targets[task]
            assert y.shape == (n,) and y.dtype == torch.int64
            assert 0 <= y.min() and y.max() <= 9
    x, y = multimnist.train[3]
    assert x.shape == (1, 28, 28) and set(y) == {"left", "right"}


def test_multimnist_labels_come_from_the_recorded_source_digits(multimnist: MultiTaskData, mnist) -> None:
    ds = multimnist.train
    assert torch.equal(ds.targets["left"], torch.from_numpy(mnist.labels[ds.source_indices[:, 0].numpy()]))
    assert torch.equal(ds.targets["right"], torch.from_numpy(mnist.labels[ds.source_indices[:, 1].numpy()]))
    assert (ds.source_indices[:, 0] != ds.source_indices[:, 1]).all()
    assert len(set(ds.targets["left"].tolist())) == 10


def test_multimnist_is_deterministic_per_seed(multimnist: MultiTaskData) -> None:
    assert_same(multimnist, build("multimnist", seed=0))
    other = build("multimnist", seed=1)
    assert not torch.equal(multimnist.train.x, other.train.x)
    assert not torch.equal(multimnist.test.targets["left"], other.test.targets["left"])


def test_changing_one_split_size_leaves_the_others_alone(multimnist: MultiTaskData) -> None:
    bigger = build("multimnist", test_size=250)
    assert torch.equal(bigger.train.x, multimnist.train.x) and torch.equal(bigger.val.x, multimnist.val.x)
    assert len(bigger.test) == 250


def test_digit_pools_are_disjoint_across_splits_and_seeds(multimnist: MultiTaskData, mnist) -> None:
    pools = mnist.pools
    assert {k: len(v) for k, v in pools.items()} == {"train": 3500, "val": 750, "test": 750}
    assert not set(pools["train"]) & set(pools["val"]) and not set(pools["train"]) & set(pools["test"])
    assert not set(pools["val"]) & set(pools["test"])
    other = build("multimnist", seed=7)
    used = {
        split: used_indices(ds, 0) | used_indices(ds, 1) | used_indices(getattr(other, split), 0)
        for split, ds in splits(multimnist).items()
    }
    assert not used["train"] & used["val"]
    assert not used["train"] & used["test"]
    assert not used["val"] & used["test"]


def test_default_sizes() -> None:
    assert dict(DEFAULT_SIZES) == {"train_size": 20_000, "val_size": 2_000, "test_size": 4_000}


def test_sum_task_is_the_sum_of_the_two_digits_on_the_same_images(multimnist: MultiTaskData) -> None:
    data = build("multimnist_sum")
    assert list(data.tasks) == ["left", "right", "sum"] and data.tasks["sum"].classes == 19
    for split, base in splits(multimnist).items():
        ds = getattr(data, split)
        assert torch.equal(ds.x, base.x)
        assert torch.equal(ds.targets["sum"], base.targets["left"] + base.targets["right"])
    assert set(data.train.targets["sum"].tolist()) <= set(range(19))


def test_recon_target_is_the_bottom_right_digit_alone(recon: MultiTaskData, multimnist: MultiTaskData) -> None:
    assert recon.tasks["right"].to_dict() == {"type": "reconstruction", "shape": [1, 28, 28]}
    assert recon.tasks["left"].classes == 10
    ds = recon.train
    target = ds.targets["right"]
    assert target.shape == (300, 1, 28, 28) and target.dtype == torch.float32
    assert target.min() >= 0.0 and target.max() <= 1.0
    assert (ds.x >= target - 1e-6).all()  # the composite is the max of the two placed digits
    assert not torch.equal(ds.x, target)
    # The digit sits bottom-right: the bottom-right quadrant holds most of its ink.
    assert target[..., 14:, 14:].sum() > 5 * target[..., :14, :14].sum()
    # Same seed, same construction: the composites equal those of the classification variant.
    assert torch.equal(ds.x, multimnist.train.x)


def test_bad_size_is_rejected() -> None:
    with pytest.raises(MamoError, match=r"data\.train_size must be a positive integer"):
        build("multimnist", train_size=0)


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


@needs_fashion
def test_multifashion_loads_with_disjoint_pools() -> None:
    data = build("multifashion", seed=3)
    assert data.input_shape == (1, 28, 28) and set(data.tasks) == {"left", "right"}
    assert data.train.x.shape == (300, 1, 28, 28) and data.train.x.dtype == torch.float32
    assert 0.0 <= data.train.x.min() and data.train.x.max() <= 1.0
    used = {s: used_indices(ds, 0) | used_indices(ds, 1) for s, ds in splits(data).items()}
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]
    assert min(used["test"]) >= 60_000  # the test pool is t10k
    assert_same(data, build("multifashion", seed=3))


@needs_fashion
def test_multi_fashion_mnist_pairs_a_digit_with_a_fashion_item(mnist) -> None:
    data = build("multi_fashion_mnist")
    assert set(data.tasks) == {"digit", "fashion"}
    ds = data.train
    assert torch.equal(ds.targets["digit"], torch.from_numpy(mnist.labels[ds.source_indices[:, 0].numpy()]))
    assert set(ds.targets["fashion"].tolist()) <= set(range(10))
    digits_used = {s: used_indices(d, 0) for s, d in splits(data).items()}
    assert not digits_used["train"] & (digits_used["val"] | digits_used["test"])


def test_missing_fashion_root_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(MamoError, match=r"Fashion-MNIST was not found in .*apt-get install dataset-fashion-mnist"):
        build("multifashion", root=str(tmp_path))


def write_idx(path: Path, magic: int, shape: tuple[int, ...], data: bytes | None = None) -> None:
    """An idx .gz file: big-endian magic and sizes, then ``data`` (by default, zeros for the whole shape)."""
    header = np.array([magic, *shape], dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + (bytes(int(np.prod(shape))) if data is None else data)))


def fake_fashion(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for images, labels in digits.FASHION_FILES.values():
        write_idx(folder / images, 2051, (n, 28, 28))
        write_idx(folder / labels, 2049, (n,))


def test_a_fashion_folder_missing_some_files_names_them(tmp_path: Path) -> None:
    fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MamoError, match=r"^Fashion-MNIST is incomplete \(t10k-labels-idx1-ubyte.gz missing\) in "):
        build("multifashion", root=str(tmp_path))


def test_fashion_root_may_start_with_a_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    fake_fashion(tmp_path / "fashion")
    source = digits.load_fashion("~/fashion")
    assert source.images.shape == (6, 28, 28) and source.labels.shape == (6,)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[: len(raw) // 2], r"is not a readable gzip file .*; replace it with the original file"),
        (lambda raw: b"not gzip at all", r"is not a readable gzip file .*; replace it with the original file"),
        (None, r"holds 100 bytes of data where its header promises 2352; replace it with the original file"),
    ],
    ids=["cut gzip", "not gzip", "cut idx"],
)
def test_a_damaged_fashion_file_is_named(tmp_path: Path, damage, message: str) -> None:
    fake_fashion(tmp_path)
    path = tmp_path / digits.FASHION_FILES["t10k"][0]
    if damage is None:
        write_idx(path, 2051, (3, 28, 28), bytes(100))
    else:
        path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(MamoError, match=rf"{path.name} {message}"):
        digits.load_fashion(str(tmp_path))


@pytest.mark.parametrize(
    ("part", "magic", "shape", "data", "message"),
    [
        (0, 2051, (3, 32, 32), None, r"holds images of shape \(32, 32\), not Fashion-MNIST's \(28, 28\)"),
        (1, 2049, (3,), bytes([1, 10, 2]), r"holds label 10, outside Fashion-MNIST's 0-9"),
    ],
    ids=["other image size", "label out of range"],
)
def test_a_well_formed_idx_file_of_other_data_is_named(tmp_path: Path, part, magic, shape, data, message) -> None:
    fake_fashion(tmp_path)
    path = tmp_path / digits.FASHION_FILES["t10k"][part]
    write_idx(path, magic, shape, data)
    with pytest.raises(MamoError, match=rf"^{tmp_path / path.name} {message}; replace it with the original file"):
        digits.load_fashion(str(tmp_path))


# ----------------------------------------------------------------------------------------------- logic, concave


def test_logic_truth_tables_and_scale() -> None:
    data = load_data(DataConfig(name="logic", options={"gates": ["xor", "and", "or", "nand", "nor", "xnor"]}))
    assert data.input_shape == (2,)
    assert torch.equal(data.train.x, torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]))
    tables = {"xor": [0, 1, 1, 0], "and": [0, 0, 0, 1], "or": [0, 1, 1, 1], "nand": [1, 1, 1, 0], "nor": [1, 0, 0, 0]}
    tables["xnor"] = [1, 0, 0, 1]
    for gate, table in tables.items():
        assert data.tasks[gate].to_dict() == {"type": "regression", "dim": 1}
        target = data.train.targets[gate]
        assert target.shape == (4, 1) and target.dtype == torch.float32
        assert target.squeeze(1).tolist() == table
    assert torch.equal(data.val.x, data.train.x) and torch.equal(data.test.x, data.train.x)

    scaled = load_data(DataConfig(name="logic", options={"scale": 3.0}))
    assert list(scaled.tasks) == ["xor", "and"]
    assert scaled.train.targets["xor"].squeeze(1).tolist() == [0.0, 3.0, 3.0, 0.0]
    assert scaled.train.targets["and"].squeeze(1).tolist() == [0.0, 0.0, 0.0, 1.0]


def test_logic_rejects_unknown_gate() -> None:
    with pytest.raises(MamoError, match=r"gates for dataset 'logic' must be distinct names"):
        load_data(DataConfig(name="logic", options={"gates": ["xor", "implies"]}))
    for gates in ([["xor"]], [{"a": 1}]):  # before: "unhashable type" from the look-up
        with pytest.raises(MamoError, match=r"gates for dataset 'logic' must be distinct names"):
            load_data(DataConfig(name="logic", options={"gates": gates}))


def test_concave_targets() -> None:
    data = load_data(DataConfig(name="concave", options={"d": 5}))
    assert data.input_shape == (1,) and len(data.train) == len(data.val) == len(data.test) == 1
    assert torch.equal(data.train.x, torch.ones(1, 1))
    expected = torch.full((1, 5), 5**-0.5)
    assert torch.allclose(data.train.targets["f1"], expected) and torch.allclose(data.train.targets["f2"], -expected)
    for task in ("f1", "f2"):
        assert data.tasks[task].to_dict() == {"type": "regression", "dim": 5, "head": "identity", "loss": "exp_mse"}
    assert load_data(DataConfig(name="concave")).tasks["f1"].dim == 20


def test_data_settings_a_dataset_does_not_use_are_noted() -> None:
    # Ignored without a word; a note, not a refusal, since they often come from a preset made for other data.
    assert unused_data_note(DataConfig(name="logic", train_size=3)) == (
        "note: dataset 'logic' has fixed splits (the four input pairs in each), so data.train_size is not used.")
    assert unused_data_note(DataConfig(name="concave", val_size=3, test_size=2, root="/data")) == (
        "note: dataset 'concave' has fixed splits (one constant input in each), so data.val_size and data.test_size "
        "and data.root are not used.")
    assert unused_data_note(DataConfig(name="multimnist", root="/nowhere")) == (
        "note: dataset 'multimnist' reads no folder, so data.root is not used.")
    assert unused_data_note(DataConfig(name="multimnist", train_size=100)) is None
    assert unused_data_note(DataConfig(name="multifashion", root="/data")) is None
    assert len(load_data(DataConfig(name="logic", train_size=3)).train) == 4


@pytest.mark.parametrize(("config", "message"), [
    # The huge values gave NaN targets (blamed on the targets or train.lr) or took 15 GB before a later check.
    (DataConfig(name="logic", options={"scale": 3.5e38}), "data.options.scale for dataset 'logic' must be a number "
     "in [-1e18, 1e18], got 3.5e+38; fix it (the thesis uses 1 and 10)."),
    (DataConfig(name="logic", options={"scale": float("nan")}), "must be a number in [-1e18, 1e18], got nan"),
    (DataConfig(name="concave", options={"d": 10**9}), "data.options.d for dataset 'concave' must be an integer in "
     "[1, 1,000,000], got 1000000000; fix it (Pareto MTL uses 20)."),
])
def test_the_fixed_datasets_bound_their_options(config: DataConfig, message: str) -> None:
    with pytest.raises(MamoError, match=re.escape(message)):
        load_data(config)


# ----------------------------------------------------------------------------------------------------- plugins

PLUGIN = """
import torch
from mamo.data import TensorTaskDataset


def make(seed, root, train_size=None, n_classes=3):
    g = torch.Generator().manual_seed(seed)
    n = train_size or 8
    ds = TensorTaskDataset(torch.randn(n, 4, generator=g), {"a": torch.arange(n) % n_classes, "b": torch.randn(n, 2)})
    return {"train": ds, "val": ds, "test": ds, "tasks": {"a": {"type": "classification", "classes": n_classes},
                                                         "b": {"type": "regression", "dim": 2}}}


def boom(seed, root):
    raise ValueError("boom")


def no_tasks(seed, root):
    ds = TensorTaskDataset(torch.zeros(2, 1), {"a": torch.zeros(2)})
    return {"train": ds, "val": ds, "test": ds}


def missing_target(seed, root):
    ds = TensorTaskDataset(torch.zeros(2, 1), {"a": torch.zeros(2)})
    return {"train": ds, "val": ds, "test": ds, "tasks": {"a": {"type": "regression", "dim": 1},
                                                         "c": {"type": "regression", "dim": 1}}}


def bad_type(seed, root):
    ds = TensorTaskDataset(torch.zeros(2, 1), {"a": torch.zeros(2)})
    return {"train": ds, "val": ds, "test": ds, "tasks": {"a": {"type": "ranking"}}}


def wrong_dim(seed, root):
    ds = TensorTaskDataset(torch.zeros(2, 1), {"a": torch.zeros(2, 3)})
    return {"train": ds, "val": ds, "test": ds, "tasks": {"a": {"type": "regression", "dim": 2}}}


def not_a_dict(seed, root):
    return [1, 2, 3]


def _one_task(task, target):
    ds = TensorTaskDataset(torch.zeros(2, 1), {"t": target})
    return {"train": ds, "val": ds, "test": ds, "tasks": {"t": task}}


def wrong_loss(seed, root):
    return _one_task({"type": "regression", "dim": 3, "loss": "cross_entropy"}, torch.zeros(2, 3))


def string_spec(seed, root):
    return _one_task("classification", torch.zeros(2))


def int_names(seed, root):
    ds = TensorTaskDataset(torch.zeros(2, 1), {0: torch.zeros(2), 1: torch.zeros(2)})
    return {"train": ds, "val": ds, "test": ds, "tasks": {0: {"type": "regression", "dim": 1},
                                                         1: {"type": "regression", "dim": 1}}}


def int_targets(seed, root):
    ds = TensorTaskDataset(torch.zeros(2, 1), {0: torch.zeros(2)})
    return {"train": ds, "val": ds, "test": ds, "tasks": {"0": {"type": "regression", "dim": 1}}}


def void_labels(seed, root):
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[:, 0, 0] = 255
    return _one_task({"type": "segmentation", "classes": 13, "shape": [4, 4]}, labels)
"""


@pytest.fixture()
def plugin_file(tmp_path: Path) -> str:
    path = tmp_path / "my_data.py"
    path.write_text(PLUGIN)
    return str(path)


def test_plugin_from_file(plugin_file: str) -> None:
    data = load_data(DataConfig(name=f"{plugin_file}:make", seed=4, train_size=6, options={"n_classes": 5}))
    assert data.input_shape == (4,) and len(data.train) == 6
    assert data.tasks["a"].classes == 5 and data.tasks["b"].dim == 2
    again = load_data(DataConfig(name=f"{plugin_file}:make", seed=4, train_size=6, options={"n_classes": 5}))
    assert torch.equal(data.train.x, again.train.x)


def test_a_plugin_gets_only_the_split_sizes_that_are_set(tmp_path: Path) -> None:
    # With data.train_size=null the plugin was called with train_size=None, overriding its own default of 5.
    path = tmp_path / "sized.py"
    path.write_text(PLUGIN + """

def sized(seed, root, train_size=5, val_size=3, test_size=2):
    return make(seed, root, train_size)


def keywords(seed, root, **kwargs):
    assert set(kwargs) == {"val_size"}, kwargs
    return make(seed, root)
""")
    data = load_data(DataConfig(name=f"{path}:sized", train_size=None, val_size=4))
    assert len(data.train) == 5
    assert load_data(DataConfig(name=f"{path}:keywords", val_size=4)).input_shape == (4,)


def test_plugin_from_module(plugin_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(plugin_file).parent))
    monkeypatch.delitem(sys.modules, "my_data", raising=False)
    data = load_data(DataConfig(name="my_data:make"))
    assert set(data.tasks) == {"a", "b"} and len(data.train) == 8


@pytest.mark.parametrize(
    ("function", "message"),
    [
        # With the line that raised: a sentence alone left a long plugin's author searching (a user audit).
        ("boom", r"data plugin '.*:boom' raised ValueError at \S+\.py:\d+ \(in boom\): boom; fix the plugin\."),
        ("no_tasks", r"returned a dict without 'tasks'"),
        ("missing_target", r"task 'c' from data plugin .* is missing from the targets of sample 0 of the 'train' "
                           r"split"),
        ("bad_type", r"task 'a' from data plugin .* has unknown type 'ranking'"),
        ("wrong_dim", r"task 'a' from data plugin .* expects 2 values per sample"),
        ("not_a_dict", r"returned list, not a dict with train, val, test and tasks"),
        ("wrong_loss", r"task 't' from data plugin .* is a regression task, which loss 'cross_entropy' cannot "
                       r"score; use one of mse, exp_mse or leave loss out\."),
        ("string_spec", r"task 't' from data plugin .* has spec 'classification', not a mapping; give a dict such as "
                        r"\{'type': 'classification', 'classes': 10\}\."),
        # The shape is right: the message gives the values that are wrong.
        ("void_labels", r"expects integer class indices of shape \(4, 4\) in \[-1, 13\) .* but sample 0 of the "
                        r"'train' split has int64 values from 0 to 255; fix the targets"),
        ("nowhere", r"has no function 'nowhere'"),
        # Before: a TypeError from the message's join of int keys, after the specs had passed as '0' and '1'.
        ("int_names", r"^task 0 from data plugin .* has a name of type int; name tasks with strings, such as '0', "
                      r"in the tasks and in the samples' targets alike\.$"),
        ("int_targets", r"task '0' from data plugin .* is missing from the targets of sample 0 of the 'train' split "
                        r"\(which has 0\); add it"),
    ],
)
def test_bad_plugins_are_named(plugin_file: str, function: str, message: str) -> None:
    with pytest.raises(MamoError, match=message):
        load_data(DataConfig(name=f"{plugin_file}:{function}"))


def test_an_empty_task_dict_is_refused_with_an_example() -> None:
    with pytest.raises(MamoError, match=r"^the tasks of a plugin must be a non-empty dict of task name -> spec, "
                                        r"got \{\}; give at least one, such as \{'digit': "):
        parse_tasks({}, "a plugin")


def test_a_task_name_with_a_dot_is_refused() -> None:
    # torch's ModuleDict, which holds the heads, raises a bare KeyError on it much later.
    with pytest.raises(MamoError, match=r"task 'depth\.v2' from a plugin has a '\.' in its name, which .*; rename "
                                        r"the task without one\.$"):
        parse_tasks({"depth.v2": {"type": "depth", "shape": [1, 4, 4]}}, "a plugin")


@pytest.mark.parametrize("name, mark, why", [("a+b", "+", "joins"), ("left@2", "@", "joins"),
                                             ('q"x', '"', r"torch\.export writes"),
                                             ("b\\x", "\\", r"torch\.export writes")])
def test_a_task_name_with_a_reserved_character_is_refused(name: str, mark: str, why: str) -> None:
    # Tasks 'a+b', 'c', 'a', 'b+c' made pairs (a+b, c) and (a, b+c) one module name: the second never grew; and
    # torch.export wrote head_q"x unescaped into the .pt2's Python source: written, then unloadable.
    digit = {"type": "classification", "classes": 10}
    with pytest.raises(MamoError, match=rf"^task '{re.escape(name)}' from a plugin has a '{re.escape(mark)}' in its "
                                        rf"name, which {why} .*; rename the task without one\.$"):
        parse_tasks({name: digit, "c": digit}, "a plugin")


@pytest.mark.parametrize("name, code", [("x\ny", "000A"), ("tab\tbed", "0009"), ("nb\u00a0sp", "00A0")])
def test_a_task_name_with_an_unprintable_character_is_refused(name: str, code: str) -> None:
    with pytest.raises(MamoError, match=rf"^task {re.escape(repr(name))} from a plugin has the unprintable "
                                        rf"character U\+{code} in its name, .*; rename the task without it\.$"):
        parse_tasks({name: {"type": "classification", "classes": 10}}, "a plugin")


def test_task_names_that_differ_only_in_type_are_refused_not_merged() -> None:
    # Before: 1 became '1' and replaced the task '1', which the run then trained without a word.
    digit = {"type": "classification", "classes": 10}
    with pytest.raises(MamoError, match=r"^task 1 from a plugin has a name of type int"):
        parse_tasks({"1": digit, 1: {"type": "regression", "dim": 1}}, "a plugin")


def test_unknown_spec_keys_of_mixed_types_are_listed() -> None:
    with pytest.raises(MamoError, match=r"^task 'a' from a plugin has unknown keys \['foo', 2\]; remove them\.$"):
        parse_tasks({"a": {"type": "classification", "classes": 2, "foo": 1, 2: 3}}, "a plugin")


def test_numpy_whole_numbers_are_sizes() -> None:
    # Before: np.int64(3) was refused ("give a positive whole number") where np.float64(3.0) passed.
    spec = parse_tasks({"a": {"type": "classification", "classes": np.int64(3)}}, "a plugin")["a"]
    assert spec.classes == 3 and type(spec.classes) is int


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_task_name_is_refused(name: str) -> None:
    with pytest.raises(MamoError, match=r"^task '\s*' from a plugin has an empty name; give it one"):
        parse_tasks({name: {"type": "classification", "classes": 10}}, "a plugin")


def sample_batch(kind: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A prediction and target batch of task type ``kind``, as its heads and a valid dataset give them."""
    torch.manual_seed(0)
    if kind == "classification":
        return torch.randn(4, 5), torch.randint(0, 5, (4,)), {"classes": 5}
    if kind == "regression":  # dim 1 as a (B,) target: the layout that breaks losses reading dim 1 as channels
        return torch.randn(4, 1), torch.randn(4), {"dim": 1}
    if kind == "reconstruction":
        return torch.rand(4, 1, 6, 6), torch.rand(4, 1, 6, 6), {"shape": [1, 6, 6]}
    if kind == "segmentation":
        return torch.randn(4, 5, 6, 6), torch.randint(-1, 5, (4, 6, 6)), {"classes": 5, "shape": [6, 6]}
    if kind == "depth":
        return torch.randn(4, 1, 6, 6), torch.rand(4, 1, 6, 6), {"shape": [1, 6, 6]}
    normal = torch.nn.functional.normalize(torch.randn(4, 3, 6, 6), dim=1)
    return torch.randn(4, 3, 6, 6), normal, {"shape": [3, 6, 6]}


@pytest.mark.parametrize("kind", sorted(TASK_TYPES))
def test_losses_fit_the_task_types_that_list_them_and_no_others(kind: str) -> None:
    pred, target, sizes = sample_batch(kind)
    fitting = TASK_TYPES[kind].losses
    assert fitting[0] == TASK_TYPES[kind].default_loss
    for loss in fitting:
        spec = parse_tasks({"t": {"type": kind, **sizes, "loss": loss}}, "test")["t"]
        value = task_loss(spec, pred.clone().requires_grad_(), target)
        assert value.shape == () and torch.isfinite(value), loss
    for loss in set(LOSSES) - set(fitting):
        with pytest.raises(MamoError, match=rf"is a {kind} task, which loss '{loss}' cannot score; use one of"):
            parse_tasks({"t": {"type": kind, **sizes, "loss": loss}}, "test")


def test_exp_mse_takes_the_norm_over_each_sample() -> None:
    # Pareto MTL Eq 19 per sample; for (B,) targets the old sum over the last axis ran over the batch.
    pred, target = torch.tensor([[1.0], [2.0]]), torch.tensor([0.0, 0.0])
    spec = parse_tasks({"t": {"type": "regression", "dim": 1, "loss": "exp_mse"}}, "test")["t"]
    expected = (1 - torch.exp(-torch.tensor([1.0, 4.0]))).mean()
    torch.testing.assert_close(task_loss(spec, pred, target), expected)


def test_plugin_error_chains_the_original(plugin_file: str) -> None:
    with pytest.raises(MamoError) as info:
        load_data(DataConfig(name=f"{plugin_file}:boom"))
    assert isinstance(info.value.__cause__, ValueError)


LATE_FAULTS = """
import torch
from torch.utils.data import Dataset
from mamo.data import TensorTaskDataset

TASKS = {"digit": {"type": "classification", "classes": 3}, "size": {"type": "regression", "dim": 1}}


def _in_memory(x, digit, size):
    data = TensorTaskDataset(x, {"digit": digit, "size": size})
    return {"train": data, "val": data, "test": data, "tasks": TASKS}


def label_out_of_range(*, seed, root):
    digit = torch.zeros(10, dtype=torch.long)
    digit[9] = 3
    return _in_memory(torch.zeros(10, 2), digit, torch.zeros(10, 1))


def nan_input(*, seed, root):
    x = torch.zeros(10, 2)
    x[6, 1] = float("nan")
    return _in_memory(x, torch.zeros(10, dtype=torch.long), torch.zeros(10, 1))


def infinite_target(*, seed, root):
    size = torch.zeros(10, 1)
    size[4] = float("inf")
    return _in_memory(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long), size)


def nan_in_a_vector_target(*, seed, root):
    x, digits = torch.zeros(10, 2), torch.zeros(10, dtype=torch.long)
    sizes = torch.zeros(10, 2)
    sizes[4, 1] = float("nan")
    return {"train": TensorTaskDataset(x, {"digit": digits, "size": sizes}),
            "val": TensorTaskDataset(x, {"digit": digits, "size": torch.zeros(10, 2)}),
            "test": TensorTaskDataset(x, {"digit": digits, "size": torch.zeros(10, 2)}),
            "tasks": {"digit": {"type": "classification", "classes": 3},
                      "size": {"type": "regression", "dim": 2}}}


class Lazy(Dataset):
    def __init__(self, fault):
        self.fault = fault

    def __len__(self):
        return 10

    def __getitem__(self, i):
        x, digit, size = torch.zeros(2), torch.tensor(0), torch.zeros(1)
        if i == 7:
            if self.fault == "label":
                digit = torch.tensor(5)
            elif self.fault == "dtype":
                x = x.double()
            elif self.fault == "shape":
                x = torch.zeros(3)
            elif self.fault == "raises":
                raise OSError("the disk went away")
            elif self.fault == "nan":
                x = torch.tensor([0.0, float("nan")])
            elif self.fault == "uint8":  # stacked with float32 inputs, it would be promoted without a word
                x = torch.zeros(2, dtype=torch.uint8)
            elif self.fault == "list":
                x = [0.0, 0.0]
        if self.fault == "bool":
            digit = torch.tensor(i % 2 == 0)
        targets = {"digit": digit, "size": size}
        if self.fault == "extra" and i != 7:
            targets["note"] = torch.tensor(1)  # a key sample 7 lacks: the batch cannot be stacked
        return x, targets


def lazy(*, seed, root, fault):
    return {"train": Lazy(fault), "val": Lazy(None), "test": Lazy(None), "tasks": TASKS}


def lazy_test(*, seed, root, fault):
    return {"train": Lazy(None), "val": Lazy(None), "test": Lazy(fault), "tasks": TASKS}
"""


@pytest.mark.parametrize(("function", "message"), [
    ("label_out_of_range", r"task 'digit' .* expects a single class index in \[0, 3\) .* per sample but sample 9 "
                           r"of the 'train' split has 3; fix the targets"),
    ("nan_input", r"gives sample 6 of the 'train' split an input with NaN or infinite values; clean or drop"),
    ("infinite_target", r"task 'size' .* expects finite values per sample but sample 4 of the 'train' split has inf"),
    # Said "has shape (2,)", the right shape.
    ("nan_in_a_vector_target", r"task 'size' .* expects finite values per sample but sample 4 of the 'train' split "
                               r"has NaN or infinite values; fix the targets"),
])
def test_every_sample_of_a_plugins_in_memory_data_is_checked_when_it_loads(
    tmp_path: Path, function: str, message: str
) -> None:
    # Only sample 0 was checked: a label out of range at sample 9 stopped training with "IndexError: Target 3 is
    # out of bounds" and a traceback, after the run folder was made.
    (tmp_path / "late.py").write_text(LATE_FAULTS)
    with pytest.raises(MamoError, match=message):
        load_data(DataConfig(name=f"{tmp_path / 'late.py'}:{function}"))


@pytest.mark.parametrize(("fault", "message"), [
    ("label", r"expects a single class index in \[0, 3\) .* per sample but sample 7 of the 'train' split has 5"),
    ("dtype", r"gives sample 7 of the 'train' split an input of dtype torch.float64; return float32"),
    ("shape", r"gives sample 7 of the 'train' split an input of shape \(3,\), not \(2,\) like sample 0"),
    ("raises", r"raised OSError at \S+late\.py:\d+ \(in __getitem__\) reading sample 7 of the 'train' split: the disk "
               r"went away; fix the dataset\."),
    ("nan", r"gives sample 7 of the 'train' split an input with NaN or infinite values"),
    ("uint8", r"gives sample 7 of the 'train' split an input of dtype torch.uint8; return float32"),
    ("list", r"gives sample 7 of the 'train' split an input of type list; return a float32 tensor"),
    ("extra", r"gives the 'train' split samples that do not stack into one batch \(samples 4\.\.7\); give every"),
])
def test_a_plugins_lazy_samples_are_checked_as_they_are_read(tmp_path: Path, fault: str, message: str) -> None:
    (tmp_path / "late.py").write_text(LATE_FAULTS)
    data = load_data(DataConfig(name=f"{tmp_path / 'late.py'}:lazy", options={"fault": fault}))
    assert data.train[6][1]["digit"] == 0  # the samples before it read as they are
    with pytest.raises(MamoError, match=message):
        list(iterate_batches(data.train, 4, shuffle=False, generator=None))


def test_a_fault_deep_in_a_plugins_lazy_test_split_stops_it_as_it_loads(tmp_path: Path, capsys) -> None:
    # It stopped a search only when the test split was first scored, after a whole phase of training.
    (tmp_path / "late.py").write_text(LATE_FAULTS)
    with pytest.raises(MamoError, match=r"sample 7 of the 'test' split has 5"):
        load_data(DataConfig(name=f"{tmp_path / 'late.py'}:lazy_test", options={"fault": "label"}), progress=True)
    assert "checking the 'test' split" in capsys.readouterr().err  # the read-through shows its bar
    assert load_data(DataConfig(name=f"{tmp_path / 'late.py'}:lazy_test", options={"fault": None})).test[7]


def test_class_targets_of_shape_n_by_1_are_refused_when_the_data_loads(tmp_path: Path) -> None:
    # Each sample was a (1,) tensor with one valid index, so the check passed and cross-entropy failed at the first
    # step with "0D or 1D target tensor expected" and a traceback, after the run folder was made (a helper's audit).
    (tmp_path / "column.py").write_text(
        "import torch\n"
        "from mamo.data import TensorTaskDataset\n"
        "def build(*, seed, root):\n"
        "    split = TensorTaskDataset(torch.rand(8, 4), {'c': torch.randint(0, 3, (8, 1))})\n"
        "    return {'train': split, 'val': split, 'test': split, 'tasks': {'c': {'type': 'classification', "
        "'classes': 3}}}\n")
    with pytest.raises(MamoError, match=r"task 'c' .* expects a single class index in \[0, 3\) \(a 0-d tensor: "
                                        r"class targets of shape \(N,\), not \(N, 1\)\) per sample but sample 0 of the "
                                        r"'train' split has shape \(1,\); fix the targets"):
        load_data(DataConfig(name=f"{tmp_path / 'column.py'}:build"))


def test_bool_class_labels_are_still_accepted(tmp_path: Path) -> None:
    # The whole-split check called floor() on them, which bool tensors lack (they trained before it).
    (tmp_path / "late.py").write_text(LATE_FAULTS + """

def bool_labels(*, seed, root):
    return _in_memory(torch.zeros(10, 2), torch.arange(10) % 2 == 0, torch.zeros(10, 1))
""")
    in_memory = load_data(DataConfig(name=f"{tmp_path / 'late.py'}:bool_labels"))
    lazy = load_data(DataConfig(name=f"{tmp_path / 'late.py'}:lazy", options={"fault": "bool"}))
    for data in (in_memory, lazy):
        (_, targets), *_ = iterate_batches(data.train, 4, shuffle=False, generator=None)
        assert targets["digit"].tolist() == [True, False, True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_a_plugins_data_on_the_gpu_is_checked_where_it_is() -> None:
    from mamo.samples import _first_bad_row
    from mamo.tasks import parse_tasks

    tasks = parse_tasks({"digit": {"type": "classification", "classes": 3}}, "test")
    x, digit = torch.zeros(6, 2, device="cuda"), torch.tensor([0, 1, 2, 3, 0, 1], device="cuda")
    assert _first_bad_row(x, {"digit": digit}, tasks) == 3


def test_a_checked_lazy_split_gives_the_batches_a_dataloader_gives(tmp_path: Path) -> None:
    (tmp_path / "late.py").write_text(LATE_FAULTS.replace("torch.zeros(2), torch.tensor(0), torch.zeros(1)",
                                                          "torch.full((2,), float(i)), torch.tensor(i % 3), "
                                                          "torch.full((1,), float(i))"))
    data = load_data(DataConfig(name=f"{tmp_path / 'late.py'}:lazy", options={"fault": None}))
    raw = data.train.dataset

    def epochs(dataset, batch_size: int, shuffle: bool, seeded: bool) -> tuple[list, torch.Tensor]:
        # Three epochs from one generator (a partial last batch advances it once more in a DataLoader), then
        # the global random state, which a DataLoader draws from too.
        torch.manual_seed(11)
        generator = torch.Generator().manual_seed(3) if seeded else None
        batches = [batch for _ in range(3) for batch in iterate_batches(dataset, batch_size, shuffle, generator,
                                                                        drop_single=True)]
        return batches, torch.get_rng_state()

    for batch_size in (4, 3, 5):  # 10 samples: a partial last batch, a single sample left out, none left
        for shuffle, seeded in ((True, True), (False, False), (True, False)):
            (checked, state), (plain, plain_state) = (epochs(d, batch_size, shuffle, seeded) for d in (data.train, raw))
            assert torch.equal(state, plain_state)
            assert len(checked) == len(plain)
            for (x, targets), (x_raw, targets_raw) in zip(checked, plain, strict=True):
                assert torch.equal(x, x_raw) and all(torch.equal(targets[k], targets_raw[k]) for k in targets_raw)


def test_missing_plugin_file_and_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MamoError, match=r"data plugin file '.*nope\.py' was not found"):
        load_data(DataConfig(name=f"{tmp_path}/nope.py:make"))
    with pytest.raises(MamoError, match=r"data plugin module 'no_such_pkg_xyz\.data' could not be imported"):
        load_data(DataConfig(name="no_such_pkg_xyz.data:make"))
    with pytest.raises(MamoError, match=r"data plugin '.*' is a folder, not a \.py file; name the file"):
        load_data(DataConfig(name=f"{tmp_path}:make"))
    for name in (":make", ".:make", "..x:make", ".mamo.data:build_logic"):  # were ValueError/TypeError tracebacks
        with pytest.raises(MamoError, match=rf"data plugin '{re.escape(name)}' names no module before ':'; write "
                                            r"module:function"):
            load_data(DataConfig(name=name))
    monkeypatch.chdir(tmp_path)
    # A module name for a file beside the user: `python cli.py` and the `mamo` script do not search the current
    # folder (python -m pytest does, so it is taken off the path here).
    (tmp_path / "beside_me_xyz.py").write_text("def build(**kw): pass\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", os.getcwd())])
    with pytest.raises(MamoError, match=r"module 'beside_me_xyz' could not be imported .*; a file in the current "
                                        r"folder is named by its path: data\.name=\./beside_me_xyz\.py:build\.$"):
        load_data(DataConfig(name="beside_me_xyz:build"))
    with pytest.raises(MamoError, match=rf"was not found \(a relative path is read from the current folder, "
                                        rf"{re.escape(str(tmp_path))}\)"):
        load_data(DataConfig(name="plugins/nope.py:make"))


def test_a_file_plugin_imports_the_modules_beside_it(tmp_path: Path) -> None:
    # A plugin split into files failed with "No module named 'helpers'": its folder was not importable.
    (tmp_path / "mamo_test_helpers_beside.py").write_text(
        "import torch\nfrom mamo.data import TensorTaskDataset\n\n"
        "def split(n):\n    x = torch.randn(n, 3)\n    return TensorTaskDataset(x, {'a': (x[:, 0] > 0).long(), "
        "'b': (x[:, 1] > 0).long()})\n")
    (tmp_path / "uses_helper.py").write_text(
        "from mamo_test_helpers_beside import split\n\n"
        "def make(*, seed, root):\n    return {'train': split(8), 'val': split(4), 'test': split(4), 'tasks': "
        "{'a': {'type': 'classification', 'classes': 2}, 'b': {'type': 'classification', 'classes': 2}}}\n")
    data = load_data(DataConfig(name=f"{tmp_path / 'uses_helper.py'}:make"))
    assert set(data.tasks) == {"a", "b"} and len(data.train) == 8


def test_plugin_size_it_does_not_take(plugin_file: str) -> None:
    with pytest.raises(MamoError, match=r"data\.val_size is set but data plugin .* takes no 'val_size' argument; "
                                        r"unset it \(--set data\.val_size=null, or remove the lines from the preset\)"):
        load_data(DataConfig(name=f"{plugin_file}:make", val_size=3))
    # A copied preset sets them all: named at once, where they were refused one command at a time (a user audit).
    with pytest.raises(MamoError, match=r"^data\.val_size and data\.test_size are set but data plugin .* takes no "
                                        r"'val_size' or 'test_size' argument; unset them \(--set data\.val_size=null "
                                        r"--set data\.test_size=null, or remove the lines from the preset\) or add"):
        load_data(DataConfig(name=f"{plugin_file}:make", train_size=8, val_size=3, test_size=3))


# ------------------------------------------------------------------------------------------------ bad names


def test_unknown_option_names_option_dataset_and_valid_ones() -> None:
    with pytest.raises(MamoError, match=r"unknown option 'gate' .* dataset 'logic'; valid options: gates, scale\."):
        load_data(DataConfig(name="logic", options={"gate": ["xor"]}))
    with pytest.raises(MamoError, match=r"unknown option 'd' .* dataset 'multimnist'; valid options: none\."):
        load_data(DataConfig(name="multimnist", options={"d": 3}))
    with pytest.raises(MamoError, match=r"data\.options\.seed is reserved"):
        load_data(DataConfig(name="logic", options={"seed": 3}))


def test_an_option_key_that_is_no_word_is_the_configs_fault_not_the_plugins(plugin_file: str) -> None:
    # Before: a **kwargs plugin was called with {1: 2} and blamed ("raised TypeError: keywords must be strings").
    (Path(plugin_file).parent / "loose.py").write_text(
        "from my_data import make\n\ndef loose(seed, root, **kwargs):\n    return make(seed, root)\n")
    with pytest.raises(MamoError, match=r"^data\.options has the key 1, which is no argument name; name each "):
        load_data(DataConfig(name=f"{Path(plugin_file).parent / 'loose.py'}:loose", options={1: 2}))


def test_unknown_dataset() -> None:
    with pytest.raises(MamoError, match=r"unknown dataset 'mnist'; use one of multimnist, .* 'file\.py:function'"):
        load_data(DataConfig(name="mnist"))
    assert {"multimnist", "multimnist_recon", "multifashion", "multi_fashion_mnist", "logic", "concave"} <= set(
        DATASETS
    )


# ----------------------------------------------------------------------------------------------------- batching


class ListDataset(Dataset):
    """A non-tensor Dataset, to exercise the DataLoader path."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), {"t": i}


def epoch(dataset: Dataset, seed: int | None, shuffle: bool = True) -> list[int]:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    order = []
    for x, targets in iterate_batches(dataset, 7, shuffle, generator):
        assert len(x) <= 7 and len(targets["t"]) == len(x)
        assert torch.equal(x.reshape(-1).long(), targets["t"].reshape(-1).long())
        order += x.reshape(-1).long().tolist()
    return order


@pytest.mark.parametrize(
    "dataset",
    [TensorTaskDataset(torch.arange(23.0).unsqueeze(1), {"t": torch.arange(23)}), ListDataset(23)],
    ids=["tensor", "list"],
)
def test_iterate_batches_covers_each_sample_once_and_is_deterministic(dataset: Dataset) -> None:
    first = epoch(dataset, seed=0)
    assert sorted(first) == list(range(23))
    assert first == epoch(dataset, seed=0)
    assert first != epoch(dataset, seed=1)
    assert first != list(range(23))
    assert epoch(dataset, seed=None, shuffle=False) == list(range(23))


def _numbered(n: int) -> TensorTaskDataset:
    return TensorTaskDataset(torch.arange(float(n)).unsqueeze(1), {"t": torch.arange(n)})


@pytest.mark.parametrize("make", [_numbered, ListDataset], ids=["tensor", "list"])
def test_training_batches_skip_a_last_batch_of_one_sample(make) -> None:
    # Batch-norm in training mode raises on one value per channel; a different sample sits out each epoch.
    sizes = [len(x) for x, _ in iterate_batches(make(15), 7, True, torch.Generator().manual_seed(0), drop_single=True)]
    assert sizes == [7, 7]
    assert [len(x) for x, _ in iterate_batches(make(15), 7, True, None)] == [7, 7, 1]  # evaluation keeps it
    assert [len(x) for x, _ in iterate_batches(make(16), 7, True, None, drop_single=True)] == [7, 7, 2]
    assert [len(x) for x, _ in iterate_batches(make(1), 7, True, None, drop_single=True)] == [1]  # nothing else
    left_out = {frozenset(range(15)) - {int(v) for x, _ in
                iterate_batches(make(15), 7, True, torch.Generator().manual_seed(s), drop_single=True)
                for v in x.reshape(-1)} for s in range(6)}
    assert len(left_out) > 1


def test_iterate_batches_on_a_built_dataset(multimnist: MultiTaskData) -> None:
    batches = list(iterate_batches(multimnist.val, 32, True, torch.Generator().manual_seed(0)))
    assert [len(x) for x, _ in batches] == [32, 32, 32, 4]
    x, targets = batches[0]
    assert x.shape == (32, 1, 28, 28) and targets["left"].shape == (32,)


def test_tensor_dataset_checks_lengths() -> None:
    with pytest.raises(MamoError, match=r"target 'y' has 3 samples but x has 4"):
        TensorTaskDataset(torch.zeros(4, 2), {"y": torch.zeros(3)})


def test_a_data_seed_beyond_64_bits_is_refused() -> None:
    # torch.Generator.manual_seed raised "Overflow when unpacking long long" mid-load for the scene datasets.
    with pytest.raises(MamoError, match=r"data.seed must be an integer in \[-2\*\*63, 2\*\*63\), got 1"):
        load_data(DataConfig(name="logic", seed=10**23))


def test_split_sizes_beyond_the_machines_memory_are_one_sentence(monkeypatch) -> None:
    # Before: data.train_size=10000000 took ~30 GB and the kernel killed the process (exit 137, no message).
    import mamo.data

    monkeypatch.setattr(mamo.data, "available_memory", lambda: 10**9)
    with pytest.raises(MamoError, match=r"^data.train_size = 100000 \(with the other splits, 100128 images\) needs "
                                        r"about 1.8 GB to build, and this machine has 1.0 GB available; lower"):
        load_data(DataConfig(name="multimnist", train_size=100_000, val_size=64, test_size=64))
    assert len(load_data(DataConfig(name="multimnist", train_size=64, val_size=64, test_size=64)).train) == 64


def test_the_machines_available_memory_is_read_where_linux_reports_it() -> None:
    from mamo.data import available_memory

    free = available_memory()
    if sys.platform.startswith("linux"):  # /proc/meminfo's MemAvailable; elsewhere None and no check is made
        assert isinstance(free, int) and free > 0


def test_a_plugin_error_names_the_plugins_own_line_not_torchs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "raised AttributeError: 'Tensor' object has no attribute 'reshpe'; fix the plugin." named no file or line.
    (tmp_path / "typo.py").write_text("import torch\n\n\ndef helper(r):\n    return torch.cat([r.reshpe(-1, 2)])\n\n\n"
                                      "def build(seed, root):\n    return helper(torch.zeros(4))\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MamoError) as failed:
        load_data(DataConfig(name="typo.py:build"))
    assert str(failed.value) == ("data plugin 'typo.py:build' raised AttributeError at typo.py:5 (in helper): 'Tensor' "
                                 "object has no attribute 'reshpe'; fix the plugin.")
    (tmp_path / "deep.py").write_text("import torch\n\n\ndef build(seed, root):\n    return torch.ones(2) @ "
                                      "torch.ones(3)\n")
    with pytest.raises(MamoError, match=r"raised RuntimeError at deep\.py:5 \(in build\): "):  # torch's C++ frames
        load_data(DataConfig(name="deep.py:build"))


def tensor_plugin(folder: Path, name: str, body: str, signature: str = "seed, root") -> str:
    """``data.name`` of a plugin file whose ``build`` runs ``body`` (which sets x and targets, and tasks unless
    every target is a two-class task: TWO_CLASSES) and returns them as one TensorTaskDataset for all splits."""
    if "tasks =" not in body:
        body += "tasks = {task: TWO_CLASSES for task in targets}\n"
    (folder / f"{name}.py").write_text(
        "import torch\nfrom mamo.samples import TensorTaskDataset\n\nTWO_CLASSES = {'type': 'classification', "
        f"'classes': 2}}\n\n\ndef build({signature}):\n" + textwrap.indent(body, "    ")
        + "    ds = TensorTaskDataset(x, targets)\n    return {'train': ds, 'val': ds, 'test': ds, 'tasks': tasks}\n")
    return f"{folder / name}.py:build"


def test_a_plugin_of_single_number_inputs_is_told_the_shape_to_give(tmp_path: Path) -> None:
    # "backbone 'mlp' fails at cell 0 on inputs of shape [] ...; use larger inputs or a backbone that downsamples
    # less (model.backbone=cnn fits any size)", advice that could not help (cnn refuses vectors; a user audit).
    name = tensor_plugin(tmp_path, "scalar", "x = torch.randn(8)\n"
                                             "targets = {'a': (x > 0).long(), 'b': (x > 1).long()}\n")
    with pytest.raises(MamoError, match=r"gives sample 0 of the 'train' split a single number as its input \(shape "
                                        r"\(\)\); give each input the shape \(1,\), a split's x the shape \(N, 1\)\.$"):
        load_data(DataConfig(name=name))


def test_a_target_no_task_names_is_noted_not_dropped_without_a_word(tmp_path: Path) -> None:
    # A plugin whose tasks left out its 'reg' target trained 'cls' alone without a word, and a search said only
    # "the data has 1 task (cls)" (a user audit).
    from mamo.samples import untrained_target_notes
    from mamo.search_plan import check_search_tasks

    name = tensor_plugin(tmp_path, "extra", "x = torch.randn(16, 4)\n"
                                            "targets = {'cls': (x[:, 0] > 0).long(), 'reg': x[:, 1:3].clone()}\n"
                                            "tasks = {'cls': TWO_CLASSES}\n")
    data = load_data(DataConfig(name=name))
    assert untrained_target_notes(data) == ["note: the data's target 'reg' has no task spec, so nothing trains on "
                                            "it; add it to the tasks to train it."]
    with pytest.raises(MamoError, match=r"^the data has 1 task \(cls\) \(its target 'reg' has no task spec\), and a "):
        check_search_tasks(data)
    assert untrained_target_notes(load_data(DataConfig(name="logic"))) == []  # every target has its task


def test_a_mistyped_plugin_function_gets_the_near_name(tmp_path: Path) -> None:
    (tmp_path / "named.py").write_text("def build(seed, root):\n    return {}\n")
    with pytest.raises(MamoError, match=r"has no function 'biuld' \(did you mean '.*named\.py:build'\?\); define "):
        load_data(DataConfig(name=f"{tmp_path / 'named.py'}:biuld"))
    with pytest.raises(MamoError, match=r"has no function 'nowhere'; define it"):  # nothing near: no guess
        load_data(DataConfig(name=f"{tmp_path / 'named.py'}:nowhere"))


def test_a_minus_one_label_points_at_missing_labels(tmp_path: Path) -> None:
    # A -1 got only the shape hint; -1 is how an unlabelled sample is written (a user audit).
    name = tensor_plugin(tmp_path, "m1", "x = torch.randn(8, 4)\na = (x[:, 0] > 0).long()\na[3] = label\n"
                                         "targets = {'a': a, 'b': (x[:, 1] > 0).long()}\n", "seed, root, label=-1")
    with pytest.raises(MamoError, match=r"sample 3 of the 'train' split has -1; fix the targets or the task spec \(for "
                                        r"samples without a label, -1 with \"missing_labels\": true in the task's "
                                        r"spec\)\.$"):
        load_data(DataConfig(name=name))
    with pytest.raises(MamoError, match=r"has 5; fix the targets or the task spec\.$"):  # not for other values
        load_data(DataConfig(name=name, options={"label": 5}))


def test_a_tensor_dataset_built_wrong_names_the_plugin_and_its_line(tmp_path: Path, monkeypatch) -> None:
    # "TensorTaskDataset target 'cls' has 50 samples but x has 60" named neither the plugin nor where (an audit).
    monkeypatch.chdir(tmp_path)
    name = tensor_plugin(tmp_path, "short", "x = torch.randn(6, 4)\n"
                                            "targets = {'a': (x[:5, 0] > 0).long(), 'b': (x[:, 1] > 0).long()}\n")
    with pytest.raises(MamoError, match=r"^data plugin '.*short\.py:build' failed at short\.py:11 \(in build\): "
                                        r"TensorTaskDataset target 'a' has 5 samples but x has 6; "):
        load_data(DataConfig(name=name))
    (tmp_path / "own.py").write_text("from mamo.errors import MamoError\n\n\ndef build(seed, root):\n"
                                     "    raise MamoError('image_size must be positive; set it above 0.')\n")
    with pytest.raises(MamoError, match=r"^image_size must be positive; set it above 0\.$"):  # its own: as it is
        load_data(DataConfig(name="own.py:build"))
