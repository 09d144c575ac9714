"""Per-task gradients: the two layouts give the same Gramians and updates, chunked products equal plain ones,
gradients autograd shares are not overwritten, and ``auto`` picks by device, size and number of tasks."""

from __future__ import annotations

import pytest
import torch
from step_cases import MLP, PATHS, RESNET, batch, frozen_step, make_model, mgda, reference

from mamo import task_gradients
from mamo.errors import MamoError
from mamo.task_gradients import (
    LAYOUTS,
    ParameterLayout,
    ParameterPartition,
    resolve_gradient_path,
    resolve_layout,
)
from mamo.tasks import task_loss

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("m", [2, 3])
def test_the_partition_is_what_autograd_connects_to_each_task(m):
    # An oracle apart from the graph's task sets (which the reference gradients use too): a parameter is shared
    # when two or more task losses reach it, specific to a task when only that one does. With m = 2 the trunk
    # and the grown module are reached by both tasks, so a wrong "at least two" reads all of them as specific.
    model = make_model(*MLP, m=m, grow=True)
    x, targets = batch(model)
    predictions = model(x)
    reached: dict[int, set[str]] = {id(p): set() for p in model.parameters()}
    for task in model.tasks:
        loss = task_loss(model.tasks[task], predictions[task], targets[task])
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
        for param, grad in zip(model.parameters(), grads, strict=True):
            if grad is not None:
                reached[id(param)].add(task)
    part = ParameterPartition(model)
    assert {id(p) for p in part.shared} == {key for key, tasks in reached.items() if len(tasks) >= 2}
    for task in model.tasks:
        assert {id(p) for p in part.specific[task]} == {key for key, tasks in reached.items() if tasks == {task}}
    assert part.shared and all(part.specific.values())


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backbone, shape, grow", [(*RESNET, False), (*MLP, True)])
@pytest.mark.parametrize("collect", [False, True], ids=["plain", "node-blocks"])
def test_both_layouts_give_the_reference_gramians_and_update(layout, path, backbone, shape, grow, collect,
                                                             monkeypatch):
    monkeypatch.setitem(task_gradients.DOT_CHUNK, "cpu", 7)  # several ragged chunks in every weight
    monkeypatch.setitem(task_gradients.GRAM_CHUNK, "cpu", 7)
    model = make_model(backbone, shape, grow=grow)
    x, targets = batch(model)
    jac, own, losses = reference(model, x, targets)
    step = frozen_step(model, mgda("relative"), gradient_path=path, gradient_layout=layout,
                       collect_gramians=collect)
    for _ in range(3):  # T = 1: the tensioner is active from the second call, so the weights are not MGDA's
        result = step(x, targets)
    assert step.layout_for(CPU) == layout
    torch.testing.assert_close(result.losses, losses)
    torch.testing.assert_close(result.gramian, jac @ jac.T, rtol=1e-4, atol=1e-6)
    part = step.partition
    if collect:
        assert list(result.node_gramians) == list(part.node_slices)
        for node, cols in part.node_slices.items():
            torch.testing.assert_close(result.node_gramians[node], jac[:, cols] @ jac[:, cols].T,
                                       rtol=1e-4, atol=1e-6)
    else:
        assert result.node_gramians == {}
    flat = torch.cat([p.grad.reshape(-1) for p in part.shared])
    torch.testing.assert_close(flat, result.weights.float() @ jac, rtol=1e-4, atol=1e-6)
    assert all(p.grad.shape == p.shape for p in part.shared)
    for task in part.tasks:
        for param, expected in zip(part.specific[task], own[task], strict=True):
            torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-7)
    assert (step.jacobian is not None) == (layout == "flat")


def _rows(part: ParameterPartition, missing: set[tuple[int, int]], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = [[None if (t, k) in missing else torch.randn(p.shape, generator=gen) for k, p in enumerate(part.shared)]
            for t in range(len(part.tasks))]
    dense = torch.stack([torch.cat([torch.zeros(p.numel()) if grad is None else grad.reshape(-1)
                                    for p, grad in zip(part.shared, row, strict=True)]) for row in rows])
    return rows, dense


@pytest.mark.parametrize("width", [None, 3, 64])
def test_parameter_layout_on_plain_tensors_with_missing_gradients(width, monkeypatch):
    if width:
        monkeypatch.setitem(task_gradients.DOT_CHUNK, "cpu", width)
    else:  # whole parameters, as on a device without an entry
        monkeypatch.delitem(task_gradients.DOT_CHUNK, "cpu")
    part = ParameterPartition(make_model(*MLP, grow=True))
    n = len(part.shared)
    # parameter 0: no task reaches it; 1: only task 2; 2: tasks 0 and 2; the rest: every task
    missing = {(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (1, 2)}
    rows, dense = _rows(part, missing)
    layout = ParameterLayout(part, CPU)
    for t, row in enumerate(rows):
        layout.load(t, tuple(row))
    (whole,) = layout.gramians(by_node=False)
    torch.testing.assert_close(whole, dense @ dense.T, rtol=1e-5, atol=1e-5)
    blocks = layout.gramians(by_node=True)
    for block, cols in zip(blocks, part.node_slices.values(), strict=True):
        torch.testing.assert_close(block, dense[:, cols] @ dense[:, cols].T, rtol=1e-5, atol=1e-5)
    weights = torch.tensor([0.2, -0.5, 1.3], dtype=torch.float64)
    expected = weights.float() @ dense
    grads = layout.combine(weights)
    assert len(grads) == n and all(grad.shape == p.shape for grad, p in zip(grads, part.shared, strict=True))
    torch.testing.assert_close(torch.cat([grad.reshape(-1) for grad in grads]), expected, rtol=1e-5, atol=1e-6)
    assert grads[0].abs().max() == 0  # nobody reached it: a zero gradient, as the flat layout gives


@pytest.mark.parametrize("weights", [[0.2, 0.5, 0.3], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0],
                                     [0.6, 0.4, 0.0], [0.2, -0.5, 1.3], [0.5, 0.5, 0.5]])
def test_the_combination_is_the_weighted_sum_on_and_off_the_simplex(weights):
    # On the simplex the combination lerps toward each task (zero weights and zero running sums included);
    # off it (a negative weight, a sum other than 1) it scales and adds. Both are the same weighted sum.
    part = ParameterPartition(make_model(*MLP, grow=True))
    rows, dense = _rows(part, {(1, 2), (0, 3)}, seed=3)
    layout = ParameterLayout(part, CPU)
    for t, row in enumerate(rows):
        layout.load(t, tuple(row))
    w = torch.tensor(weights, dtype=torch.float64)
    grads = layout.combine(w)
    torch.testing.assert_close(torch.cat([grad.reshape(-1) for grad in grads]), w.float() @ dense,
                               rtol=1e-5, atol=1e-6)


def test_parameter_layout_does_not_write_through_shared_or_expanded_gradients():
    part = ParameterPartition(make_model(*MLP))
    rows, _ = _rows(part, set())
    big = max(range(len(part.shared)), key=lambda k: part.shared[k].numel())
    small = min(range(len(part.shared)), key=lambda k: part.shared[k].numel())
    # Task 0's gradient of `small` is the start of its gradient of `big` (one storage, as autograd can hand
    # out), and another parameter's is an expanded scalar (the gradient of a sum).
    rows[0][small] = rows[0][big].reshape(-1)[: part.shared[small].numel()].view(part.shared[small].shape)
    expanded = next(k for k in range(len(part.shared)) if k not in (big, small))
    rows[0][expanded] = torch.full((), 0.5).expand(part.shared[expanded].shape)
    dense = torch.stack([torch.cat([grad.reshape(-1).clone() for grad in row]) for row in rows])
    layout = ParameterLayout(part, CPU)
    for t, row in enumerate(rows):
        layout.load(t, tuple(row))
    weights = torch.tensor([0.3, 0.9, -0.4], dtype=torch.float64)
    grads = layout.combine(weights)
    torch.testing.assert_close(torch.cat([grad.reshape(-1) for grad in grads]), weights.float() @ dense,
                               rtol=1e-5, atol=1e-6)


def test_the_combination_copies_gradients_that_autograd_shares_or_expands():
    a = torch.randn(4, 3)
    expanded = torch.ones(()).expand(4, 3)  # what autograd hands back for the gradient of a sum
    first = torch.randn(4, 3)
    out = task_gradients._writable([first, a, expanded, a])  # the gradient of `x + y`: one tensor twice
    assert out[0] is first and out[1] is a  # owned and contiguous: written in place, no copy
    assert out[2] is not expanded and out[2].is_contiguous() and torch.equal(out[2], expanded)
    assert out[3] is not a and torch.equal(out[3], a)
    for grad in out:
        grad.mul_(2.0)  # writes each once: the shared one is not doubled twice
    torch.testing.assert_close(out[1], out[3])


def test_auto_layout_depends_on_device_size_and_tasks(monkeypatch):
    rule = task_gradients.PARAMETERS_LAYOUT["cpu"]
    assert resolve_layout("auto", CPU, rule.min_size - 1, 2) == "flat"
    assert resolve_layout("auto", CPU, rule.min_size, rule.max_tasks) == "parameters"
    assert resolve_layout("auto", CPU, rule.min_size, rule.max_tasks + 1) == "flat"
    assert resolve_layout("auto", torch.device("cuda"), 10**9, 2) == "flat"
    assert resolve_layout("parameters", torch.device("cuda"), 1, 9) == "parameters"
    with pytest.raises(MamoError, match=r"unknown gradient layout 'dense' \(train.gradient_layout\)"):
        resolve_layout("dense", CPU)
    with pytest.raises(MamoError, match="train.gradient_layout"):
        frozen_step(make_model(*MLP), gradient_layout="dense")
    model = make_model(*MLP)
    assert frozen_step(model).layout_for(CPU) == "flat"  # a tiny model stays in cache
    monkeypatch.setitem(task_gradients.PARAMETERS_LAYOUT, "cpu", task_gradients.ParametersLayoutRule(1, 3))
    step = frozen_step(model)
    assert step.layout_for(CPU) == "parameters"
    step(*batch(model))
    assert step.jacobian is None
    assert frozen_step(make_model(*MLP, m=4)).layout_for(CPU) == "flat"  # four tasks: more pairs than copies


def test_gram_blocks_in_cpu_chunks_equal_one_matmul(monkeypatch):
    monkeypatch.setitem(task_gradients.GRAM_CHUNK, "cpu", 7)  # many ragged chunks per node
    model = make_model(*MLP)
    x, targets = batch(model)
    result = frozen_step(model, gradient_layout="flat")(x, targets)
    jac = reference(model, x, targets)[0]
    torch.testing.assert_close(result.gramian, jac @ jac.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [None, 4, 7, 64])
def test_gram_block_by_chunks_equals_the_plain_product(width):
    jac = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    for cols in (None, slice(0, 200), slice(13, 110), slice(50, 57)):  # None: all of J
        piece = jac[:, cols if cols is not None else slice(None)].double()
        torch.testing.assert_close(task_gradients.gram_block(jac, cols, width).double(), piece @ piece.T,
                                   rtol=1e-5, atol=1e-5)


def test_auto_batches_where_the_device_rule_says_and_never_under_bf16():
    cuda, rule = torch.device("cuda"), task_gradients.BATCHED_PATH["cuda"]
    assert "cpu" not in task_gradients.BATCHED_PATH  # measured slower on CPU at every size
    assert resolve_gradient_path("auto", CPU, size=1 << 30, tasks=10) == "loop"
    assert resolve_gradient_path("auto", cuda, size=rule.min_size, tasks=rule.min_tasks) == "batched"
    assert resolve_gradient_path("auto", cuda, size=rule.min_size - 1, tasks=rule.min_tasks) == "loop"
    assert resolve_gradient_path("auto", cuda, size=rule.min_size, tasks=rule.min_tasks - 1) == "loop"
    assert resolve_gradient_path("auto", cuda, size=rule.min_size, tasks=rule.min_tasks, precision="bf16") == "loop"
    assert resolve_gradient_path("batched", CPU) == "batched"
