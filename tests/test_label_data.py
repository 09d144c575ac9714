"""Missing labels (-1) in a plugin's splits: the sample checks accept them where the task allows them, in memory
and read lazily, and still name a wrong class behind them."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from mamo.data import TensorTaskDataset, iterate_batches, read_through
from mamo.errors import MamoError
from mamo.samples import validate

TASKS = {"a": {"type": "classification", "classes": 2, "missing_labels": True},
         "b": {"type": "classification", "classes": 2}}


class Lazy(Dataset):
    """Samples read one by one (not a TensorTaskDataset): checked batch by batch."""

    def __init__(self, x, targets):
        self.x, self.targets = x, targets

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], {name: target[index] for name, target in self.targets.items()}


def splits(wrap, bad_row: int | None = None) -> dict:
    x = torch.rand(12, 3)
    a, b = torch.tensor([0, -1, 1] * 4), torch.tensor([0, 1] * 6)
    if bad_row is not None:
        a[bad_row] = 5
    return {split: wrap(x, {"a": a, "b": b}) for split in ("train", "val", "test")} | {"tasks": TASKS}


@pytest.mark.parametrize("wrap", [TensorTaskDataset, Lazy], ids=["tensors", "lazy"])
def test_unlabelled_samples_pass_the_checks_and_batch(wrap) -> None:
    data = validate(splits(wrap), "a plugin", plugin=True)
    batches = list(iterate_batches(data.train, 4, shuffle=False, generator=None))
    assert torch.equal(torch.cat([targets["a"] for _, targets in batches]), torch.tensor([0, -1, 1] * 4))


@pytest.mark.parametrize("wrap", [TensorTaskDataset, Lazy], ids=["tensors", "lazy"])
def test_a_class_out_of_range_after_an_unlabelled_sample_is_still_named(wrap) -> None:
    with pytest.raises(MamoError, match=r"task 'a' from a plugin expects a single class index in \[0, 2\) or -1 "
                                        r"\(unlabelled\).* sample 7 of the 'train' split has 5"):
        data = validate(splits(wrap, bad_row=7), "a plugin", plugin=True)
        list(iterate_batches(data.train, 4, shuffle=False, generator=None))


def test_a_training_split_without_one_label_for_a_task_is_refused_before_training() -> None:
    # It trained without a word: the task's head never learned, and its val/test accuracy was a guess.
    data = splits(TensorTaskDataset)
    data["train"].targets["a"][:] = -1
    with pytest.raises(MamoError, match=r"^a plugin gives task 'a' no labelled sample in the 'train' split \(every "
                                        r"target is -1\), so it cannot learn; label some of its samples or remove "
                                        r"the task\.$"):
        validate(data, "a plugin", plugin=True)


def test_a_split_without_labels_names_the_task_among_tasks_of_one_type() -> None:
    # Two classification tasks: "no sample of the 'val' split has a classification target" did not say which.
    from mamo.scoring import MetricAccumulator
    from mamo.tasks import parse_tasks

    tasks = parse_tasks(TASKS | {"c": {"type": "classification", "classes": 2, "missing_labels": True}}, "a plugin")
    accumulator = MetricAccumulator(tasks)
    accumulator.update({name: torch.randn(2, 2) for name in tasks},
                       {"a": torch.tensor([0, 1]), "b": torch.tensor([1, 1]), "c": torch.tensor([-1, -1])})
    with pytest.raises(MamoError, match=r"^task 'c': no sample of the evaluated split has a classification target"):
        accumulator.compute()


@pytest.mark.parametrize("split", ["val", "test"])
def test_an_in_memory_split_without_one_label_stops_as_it_loads_not_after_training(split) -> None:
    # A test split without labels stopped the run only at the test, after every epoch of a search had run.
    data = splits(TensorTaskDataset)
    data[split] = TensorTaskDataset(data[split].x, {"a": torch.full((12,), -1), "b": data[split].targets["b"]})
    with pytest.raises(MamoError, match=rf"^a plugin gives task 'a' no labelled sample in the '{split}' split "
                                        r"\(-1 marks an unlabelled sample\), so its classification metrics there "
                                        r"are undefined; label some of that split's samples or remove the task\.$"):
        validate(data, "a plugin", plugin=True)


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_lazy_split_without_one_label_stops_as_it_loads_not_after_training(split) -> None:
    # It stopped when scored: a test split after the search's first phase had trained, which its resume repeats.
    data = splits(Lazy)
    data[split] = Lazy(data[split].x, {"a": torch.full((12,), -1), "b": data[split].targets["b"]})
    with pytest.raises(MamoError, match=rf"^a plugin gives task 'a' no labelled sample in the '{split}' split "
                                        r"\(-1 marks an unlabelled sample\), so its classification metrics there "
                                        r"are undefined; label some of that split's samples or remove the task\.$"):
        read_through(validate(data, "a plugin", plugin=True))


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_bad_sample_deep_in_a_lazy_evaluation_split_stops_as_it_loads(split) -> None:
    data = splits(Lazy)
    data[split].targets["b"] = data[split].targets["b"].clone()
    data[split].targets["b"][9] = 3
    with pytest.raises(MamoError, match=rf"sample 9 of the '{split}' split has 3"):
        read_through(validate(data, "a plugin", plugin=True))


def test_a_lazy_training_split_without_one_label_stops_once_an_epoch_has_read_it() -> None:
    # Read once as it trains (not twice to look): the sentence comes at the end of its first epoch.
    data = splits(Lazy)
    data["train"] = Lazy(data["train"].x, {"a": torch.full((12,), -1), "b": data["train"].targets["b"]})
    checked = validate(data, "a plugin", plugin=True)
    batches = iterate_batches(checked.train, 5, shuffle=True, generator=torch.Generator().manual_seed(0),
                              drop_single=True)
    assert len([next(batches), next(batches)]) == 2  # 10 of 12 samples read: the last two may hold a label
    with pytest.raises(MamoError, match=r"^a plugin gives task 'a' no labelled sample in the 'train' split \(every "
                                        r"target is -1\), so it cannot learn; label some of its samples or remove "
                                        r"the task\.$"):
        next(batches)


def test_a_lazy_training_split_with_its_only_label_last_trains() -> None:
    data = splits(Lazy)
    only_last = torch.full((12,), -1)
    only_last[11] = 1
    data["train"] = Lazy(data["train"].x, {"a": only_last, "b": data["train"].targets["b"]})
    checked = validate(data, "a plugin", plugin=True)
    for _ in range(3):
        assert len(list(iterate_batches(checked.train, 5, shuffle=False, generator=None))) == 3


def test_a_lazy_training_split_without_one_label_stops_in_its_first_epoch_though_a_sample_sits_out() -> None:
    # 13 samples in batches of 4: drop_single leaves one out of every epoch, so no epoch read every sample and a
    # one-epoch run trained task 'a' blind to the end without a word.
    data = splits(Lazy)
    x, b = torch.rand(13, 3), torch.tensor([0, 1] * 6 + [0])
    data["train"] = Lazy(x, {"a": torch.full((13,), -1), "b": b})
    checked = validate(data, "a plugin", plugin=True)
    with pytest.raises(MamoError, match=r"^a plugin gives task 'a' no labelled sample in the 'train' split"):
        list(iterate_batches(checked.train, 4, shuffle=True, generator=torch.Generator().manual_seed(0),
                             drop_single=True))


def test_a_lazy_training_split_whose_only_label_sits_out_the_first_epoch_trains() -> None:
    # The sample left out is read for its labels alone: its label is there, so the split is not refused.
    generator = torch.Generator().manual_seed(0)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base seed, drawn first
    left_out = torch.randperm(13, generator=generator)[-1].item()  # the sample the first epoch leaves out
    only = torch.full((13,), -1)
    only[left_out] = 1
    data = splits(Lazy) | {"train": Lazy(torch.rand(13, 3), {"a": only, "b": torch.tensor([0, 1] * 6 + [0])})}
    checked = validate(data, "a plugin", plugin=True)
    batches = list(iterate_batches(checked.train, 4, shuffle=True, generator=torch.Generator().manual_seed(0),
                                   drop_single=True))
    assert len(batches) == 3 and not any(bool((targets["a"] != -1).any()) for _, targets in batches)
