"""A task spec's options: class weights, missing labels and chosen metrics; the losses, the metrics, the specs
that ask for them, and a search with all three."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from step_cases import MLP, frozen_step, make_model

from mamo import graph as g
from mamo.config import load_config
from mamo.directions import MGDA
from mamo.errors import MamoError
from mamo.export import export, load_trained
from mamo.model import MamoNet
from mamo.report import delta, relative_changes
from mamo.scoring import MetricAccumulator
from mamo.search import run_search
from mamo.tasks import parse_tasks, task_loss
from mamo.tune_space import objective_metrics


def spec(**keys):
    return parse_tasks({"t": {"type": "classification", "classes": 3, **keys}}, "a plugin")["t"]


def test_a_plain_classification_loss_is_torchs_cross_entropy_to_the_bit() -> None:
    # The numbers of every run before class weights and missing labels stay what they were.
    pred, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert torch.equal(task_loss(spec(), pred, target), F.cross_entropy(pred, target))


def test_class_weights_give_torchs_weighted_mean_over_the_labelled_samples_and_its_gradient() -> None:
    pred, target = torch.randn(9, 3), torch.tensor([0, 1, 2, -1, 1, 1, -1, 0, 2])
    labelled = target != -1
    weights = torch.tensor([0.5, 3.0, 1.0])
    ours = pred.clone().requires_grad_()
    theirs = pred.clone().requires_grad_()
    loss = task_loss(spec(class_weights=[0.5, 3, 1], missing_labels=True), ours, target)
    expected = F.cross_entropy(theirs[labelled], target[labelled], weight=weights)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize("target", [[-1, -1, -1], [2, -1, 2]], ids=["none labelled", "only zero-weight classes"])
def test_a_batch_with_nothing_to_weigh_has_loss_0_and_no_gradient_not_nan(target) -> None:
    pred = torch.randn(3, 3, requires_grad=True)
    loss = task_loss(spec(class_weights=[1, 1, 0], missing_labels=True), pred, torch.tensor(target))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


def test_missing_labels_without_weights_average_over_the_labelled_samples() -> None:
    pred, target = torch.randn(6, 3), torch.tensor([1, -1, 0, 2, -1, 1])
    keep = target != -1
    torch.testing.assert_close(task_loss(spec(missing_labels=True), pred, target),
                               F.cross_entropy(pred[keep], target[keep]))


def test_segmentation_class_weights_weigh_the_labelled_pixels() -> None:
    seg = parse_tasks({"s": {"type": "segmentation", "classes": 4, "shape": [5, 6],
                             "class_weights": [1, 2, 0.25, 4]}}, "a plugin")["s"]
    pred, target = torch.randn(2, 4, 5, 6), torch.randint(-1, 4, (2, 5, 6))
    expected = F.cross_entropy(pred, target, weight=torch.tensor([1, 2, 0.25, 4]), ignore_index=-1)
    torch.testing.assert_close(task_loss(seg, pred, target), expected)


def test_accuracy_counts_the_labelled_samples_and_the_split_loss_ignores_the_batching() -> None:
    tasks = {"t": spec(class_weights=[1, 2, 0.5], missing_labels=True)}
    torch.manual_seed(0)
    pred, target = torch.randn(20, 3), torch.randint(-1, 3, (20,))
    target[:4] = torch.tensor([-1, 0, 1, 2])
    labelled = target != -1
    whole, batched = MetricAccumulator(tasks), MetricAccumulator(tasks)
    whole.update({"t": pred}, {"t": target})
    for rows in torch.arange(20).split(3):  # batches of 3: some without a labelled sample
        batched.update({"t": pred[rows]}, {"t": target[rows]})
    hits = (pred.argmax(1) == target)[labelled].float().mean().item()
    loss = F.cross_entropy(pred[labelled], target[labelled], weight=torch.tensor([1, 2, 0.5])).item()
    for result in (whole.compute(), batched.compute()):
        assert result["t"]["accuracy"] == pytest.approx(hits)
        assert result["t"]["loss"] == pytest.approx(loss, rel=1e-6)
    nothing = MetricAccumulator(tasks)
    nothing.update({"t": pred[:2]}, {"t": torch.tensor([-1, -1])})
    with pytest.raises(MamoError, match=r"no sample of the evaluated split has a classification target \(-1 marks"):
        nothing.compute()


@pytest.mark.parametrize("weights", [[1e-3, 2e-3, 1e-3], [1e-30, 1e-30, 3e-30], [1e-46, 1e-46, 2e-46],
                                     [1e38, 1e38, 2e38], [1e39, 1.0, 2.0]])
def test_the_loss_of_tiny_or_huge_class_weights_is_their_weighted_mean(weights) -> None:
    # The mean does not depend on the weights' scale, but a split's total weight under 1 was divided by 1 (its
    # evaluation loss 0.087 for a training loss of 2.7 with weights of 1e-3), and weights that are finite but
    # round to 0 or overflow in float32 gave a loss of 0 or NaN.
    tasks = {"t": spec(class_weights=weights)}
    torch.manual_seed(0)
    pred, target = torch.randn(16, 3) * 10, torch.tensor([0, 1, 2, 0] * 4)
    expected = F.cross_entropy(pred.double(), target, weight=torch.tensor(weights, dtype=torch.float64)).item()
    accumulator = MetricAccumulator(tasks)
    accumulator.update({"t": pred}, {"t": target})
    assert task_loss(tasks["t"], pred, target).item() == pytest.approx(expected, rel=1e-5)
    assert accumulator.compute()["t"]["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("keys", "error"), [
    ({"class_weights": [1, 2]}, r"has class_weights \[1, 2\]; give a list of 3 finite weights ≥ 0"),
    ({"class_weights": [1, -2, 1]}, "give a list of 3 finite weights"),
    ({"class_weights": [1, float("nan"), 1]}, "give a list of 3 finite weights"),
    ({"class_weights": [0, 0, 0]}, "not all 0"),
    ({"class_weights": [True, 1, 1]}, "give a list of 3 finite weights"),
    ({"class_weights": "balanced"}, "give a list of 3 finite weights"),
    ({"missing_labels": "yes"}, r"has missing_labels 'yes'; give true \(its targets may be -1"),
])
def test_bad_label_options_are_one_sentence_naming_the_task(keys, error) -> None:
    with pytest.raises(MamoError, match=rf"^task 't' from a plugin .*{error}"):
        spec(**keys)


@pytest.mark.parametrize("weights", [np.array([0.5, 2.0, 1.0]), torch.tensor([0.5, 2.0, 1.0])], ids=["numpy", "torch"])
def test_class_weights_may_be_an_array(weights) -> None:
    # scikit-learn's compute_class_weight gives a numpy array; it was refused with "give a list".
    assert spec(class_weights=weights).class_weights == (0.5, 2.0, 1.0)
    with pytest.raises(MamoError, match="give a list of 3 finite weights"):
        spec(class_weights=np.ones((3, 1)))


def test_chosen_metrics_are_the_tasks_metrics_in_their_order() -> None:
    both = parse_tasks({"r": {"type": "regression", "dim": 2, "metrics": ["mae", "mse"]}}, "a plugin")["r"]
    assert [m.name for m in both.metrics] == ["mae", "mse"] and both.to_dict()["metrics"] == ["mae", "mse"]
    one = parse_tasks({"r": {"type": "regression", "dim": 2, "metrics": ["mae"]}}, "a plugin")
    assert parse_tasks({"r": {"type": "regression", "dim": 2, "metrics": np.array(["mae"])}}, "a plugin") == one
    assert [m.name for m in one["r"].metrics] == ["mae"]
    assert objective_metrics(one) == [("r", "mae", False)]  # what tune --multi-objective optimises for the task
    tested, stl = {"r": {"mse": 2.0, "mae": 0.5, "loss": 1}}, {"r": {"mse": 1.0, "mae": 1.0, "loss": 1}}
    assert delta(tested, stl, one) == pytest.approx(50.0)  # mae halved; the doubled mse is not counted
    assert delta(tested, stl, parse_tasks({"r": {"type": "regression", "dim": 2}}, "a plugin")) == pytest.approx(-25)


@pytest.mark.parametrize("chosen", [[], ["accuracy"], ["mae", "mae"], "mae", [1]])
def test_bad_chosen_metrics_are_one_sentence(chosen) -> None:
    with pytest.raises(MamoError, match=r"^task 'r' from a plugin has metrics .*; give a list of distinct names from "
                                        r"mse, mae \(the main one first\), or leave metrics out for all of them\.$"):
        parse_tasks({"r": {"type": "regression", "dim": 2, "metrics": chosen}}, "a plugin")


@pytest.mark.parametrize(("raw", "error"), [
    ({"type": "regression", "dim": 1, "class_weights": [1]}, "its loss 'mse' does not take"),
    ({"type": "classification", "classes": 2, "loss": "exp_mse", "class_weights": [1, 1]}, "cannot score"),
    ({"type": "segmentation", "classes": 2, "shape": [2, 2], "missing_labels": True}, r"are -1 anyway\); remove it"),
    ({"type": "depth", "shape": [1, 2, 2], "missing_labels": True}, "only classification targets can be missing"),
])
def test_label_options_are_refused_where_they_cannot_apply(raw, error) -> None:
    with pytest.raises(MamoError, match=error):
        parse_tasks({"t": raw}, "a plugin")


LABEL_OPTIONS = {"a": {"type": "classification", "classes": 4, "missing_labels": True},
                 "b": {"type": "classification", "classes": 4, "class_weights": [1, 2.5, 0, 1]}}


def test_the_options_survive_the_architecture_graphs_round_trip() -> None:
    model = make_model(*MLP, tasks=LABEL_OPTIONS, grow=False)
    assert model.tasks == parse_tasks(LABEL_OPTIONS, "the test")
    assert MamoNet(g.graph_from_dict(g.graph_to_dict(model.graph))).tasks == model.tasks


class Recorder(MGDA):
    """MGDA, keeping the losses and Gramian it was given."""

    def weigh(self, gramian, losses):
        self.seen = (gramian.copy(), losses.copy())
        return super().weigh(gramian, losses)


@pytest.mark.parametrize("gradients", ["exact", "ub"])
def test_a_step_on_a_batch_without_labels_for_a_task_gives_it_loss_and_gradient_0(gradients) -> None:
    model = make_model(*MLP, tasks=LABEL_OPTIONS)
    recorder = Recorder()
    x = torch.randn(6, *model.space.input_shape)
    step = frozen_step(model, recorder, gradients=gradients)
    result = step(x, {"a": torch.full((6,), -1), "b": torch.tensor([0, 1, 2, 3, 1, 0])})
    gramian, losses = recorder.seen
    assert losses[0] == 0.0 and losses[1] > 0 and result.losses[0].item() == 0.0
    assert gramian[0, 0] == 0.0 and gramian[1, 1] > 0
    # MGDA's min-norm point of a hull holding the zero gradient is 0: the shared part stays, b's head learns.
    assert result.weights.tolist() == [1.0, 0.0]
    assert all(not p.grad.any() for p in step.partition.shared)
    assert any(p.grad.any() for p in step.partition.specific["b"])


PLUGIN = """
import torch
from mamo.data import TensorTaskDataset


def build(seed, root, **sizes):
    x = torch.rand(160, 4, generator=torch.Generator().manual_seed(seed))
    a = (x[:, 0] > 0.5).long()
    a[::3] = -1  # every third sample has no label for task a
    if NO_VAL_LABELS:
        a[96:128] = -1
    b = (x[:, 1] > 0.7).long()  # a rare class 1, weighed up
    c = x[:, 2:3] * 2  # scored by its mae alone
    def split(part):
        return TensorTaskDataset(x[part], {"a": a[part], "b": b[part], "c": c[part]})
    return {"train": split(slice(0, 96)), "val": split(slice(96, 128)), "test": split(slice(128, 160)),
            "tasks": {"a": {"type": "classification", "classes": 2, "missing_labels": True},
                      "b": {"type": "classification", "classes": 2, "class_weights": [1.0, 2.5]},
                      "c": {"type": "regression", "dim": 1, "metrics": ["mae"]}}}
"""

SETTINGS = ["model.backbone=mlp", "model.hidden=[8, 8]", "model.head_hidden=0", "train.batch_size=32",
            "train.epochs=3", "search.pretrain_epochs=1", "search.round_epochs=1", "search.final_epochs=1",
            "train.device=cpu"]


def plugin(tmp_path, no_val_labels: bool = False) -> str:
    path = tmp_path / "partial.py"
    path.write_text(f"NO_VAL_LABELS = {no_val_labels}\n{PLUGIN}")
    return f"data.name={path}:build"


def test_a_search_trains_scores_and_exports_tasks_with_missing_labels_and_class_weights(tmp_path) -> None:
    config = load_config("quick", [plugin(tmp_path), *SETTINGS])
    metrics = run_search(config, tmp_path / "run", progress=False, quiet=True, loggers=False,
                         cache_root=tmp_path / "cache")
    labelled_test = sum(1 for i in range(128, 160) if i % 3)  # 21 of the test split's 32 samples
    for name, tested in [("mamo", metrics["tasks"]), *((k, v["tasks"]) for k, v in metrics["baselines"].items())]:
        accuracy = tested["a"]["accuracy"]
        assert accuracy * labelled_test == pytest.approx(round(accuracy * labelled_test)), name  # hits / 21
        assert 0 < accuracy <= 1 and all(v == v for task in tested.values() for v in task.values()), name  # no NaN
    saved = json.loads((tmp_path / "run" / "architecture.json").read_text())["graph"]["tasks"]
    assert saved["a"]["missing_labels"] is True and saved["b"]["class_weights"] == [1.0, 2.5]
    assert saved["c"]["metrics"] == ["mae"]
    # c's mse is still measured, but Δ, the report and the epoch lines read its mae alone.
    specs = parse_tasks(saved, "the run")
    stl = metrics["baselines"]["stl"]["tasks"]
    assert "mse" in metrics["tasks"]["c"] and set(relative_changes(metrics["tasks"], stl, specs)) == {
        ("a", "accuracy"), ("b", "accuracy"), ("c", "mae")}
    assert metrics["delta"] == pytest.approx(delta(metrics["tasks"], stl, specs))
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| c mae ↓ |" in report and "c mse" not in report
    assert ", c loss " in (tmp_path / "run" / "log.txt").read_text().split("final epoch")[1].split("\n")[0]
    assert " mae " in (tmp_path / "run" / "log.txt").read_text().split("final epoch")[1].split("\n")[0]
    export(tmp_path / "run", ["json"], tmp_path / "exported")
    exported = json.loads((tmp_path / "exported" / "architecture.json").read_text())["graph"]["tasks"]
    assert exported == saved and load_trained(tmp_path / "run").tasks["b"].class_weights == (1.0, 2.5)


def test_a_validation_split_without_one_label_for_a_task_stops_with_one_sentence(tmp_path) -> None:
    config = load_config("quick", [plugin(tmp_path, no_val_labels=True), *SETTINGS, "search.baselines=false"])
    with pytest.raises(MamoError, match=r"^data plugin '.*:build' gives task '\w+' no labelled sample in the 'val' "
                                        r"split \(-1 marks an unlabelled sample\), so its classification metrics "
                                        r"there are "):
        run_search(config, tmp_path / "run", progress=False, quiet=True, loggers=False)
