"""The training step: per-task gradients by both paths, who gets which gradient, Gramians, MGDA-UB, NaN, bf16."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from step_cases import MLP, PATHS, RESNET, batch, frozen_step, make_model, mgda, needs_cuda, reference

from mamo import graph as g
from mamo import task_gradients
from mamo.directions import Equal
from mamo.errors import MamoError
from mamo.step import TrainStep
from mamo.task_gradients import ParameterPartition
from mamo.tasks import task_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backbone, shape, grow", [(*RESNET, False), (*MLP, True)])
def test_per_task_gradients_equal_separate_autograd(path, backbone, shape, grow):
    model = make_model(backbone, shape, grow=grow)
    x, targets = batch(model)
    jac, own, losses = reference(model, x, targets)
    step = frozen_step(model, gradient_path=path)
    result = step(x, targets)
    assert step.jacobian.shape == jac.shape
    torch.testing.assert_close(step.jacobian, jac, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.losses, losses)
    if grow:  # the GMK of {t0, t1} is shared but has an exactly zero gradient for t2
        cols = step.partition.node_slices[g.branch_id(("t0", "t1"), 1)]
        assert step.jacobian[2, cols].abs().max() == 0 and step.jacobian[0, cols].abs().max() > 0


@pytest.mark.parametrize("gradients", ["exact", "ub"])
def test_the_direction_gets_each_tasks_loss_beside_its_gramian_row(gradients):
    # Distinct targets give each task its own loss; the tensioner reads L_t by position, so a permutation of the
    # losses against the Gramian's rows would pull toward the wrong task (only the bench test noticed before).
    from mamo.directions import MGDA

    class Spy(MGDA):
        def weigh(self, gramian, losses):
            self.seen = (gramian.copy(), losses.copy())
            return super().weigh(gramian, losses)

    model = make_model(*MLP)
    x, targets = batch(model)
    spy = Spy()
    frozen_step(model, spy, gradients=gradients)(x, targets)
    jac, _, losses = reference(model, x, targets)
    gramian, seen_losses = spy.seen
    assert len(set(losses.tolist())) == len(losses)
    torch.testing.assert_close(torch.from_numpy(seen_losses), losses.double(), rtol=1e-6, atol=0)
    if gradients == "exact":  # ub's Gramian is of the shared representation's gradients, not of J
        torch.testing.assert_close(torch.from_numpy(gramian), (jac @ jac.T).double(), rtol=1e-4, atol=1e-7)


def test_loop_and_batched_paths_agree():
    model = make_model()
    x, targets = batch(model)
    rows = []
    for path in PATHS:
        step = frozen_step(copy.deepcopy(model), gradient_path=path)
        result = step(x, targets)
        rows.append((step.jacobian.clone(), result.gramian, result.weights))
    torch.testing.assert_close(rows[0][0], rows[1][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rows[0][1], rows[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_each_task_parameter_gets_only_its_own_gradient_and_shared_get_weighted_sum(path):
    model = make_model(*MLP, grow=True)
    x, targets = batch(model)
    jac, own, _ = reference(model, x, targets)
    step = frozen_step(model, mgda("relative"), gradient_path=path)
    for _ in range(3):  # T = 1: the tensioner is active from the second call, so weights are not MGDA's
        result = step(x, targets)
    part = step.partition
    for task in part.tasks:
        assert part.specific[task], "every task has its own head"
        for param, expected in zip(part.specific[task], own[task], strict=True):
            torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-7)
    combined = result.weights.float() @ jac
    flat = torch.cat([p.grad.reshape(-1) for p in part.shared])
    torch.testing.assert_close(flat, combined, rtol=1e-4, atol=1e-6)
    assert result.info["active"].item() == 1.0


def test_a_plain_step_computes_the_gramian_in_one_product_without_node_blocks():
    model = make_model(*MLP, grow=True)
    x, targets = batch(model)
    step = frozen_step(model)
    result = step(x, targets)
    assert result.node_gramians == {}
    torch.testing.assert_close(result.gramian, step.jacobian @ step.jacobian.T, rtol=1e-5, atol=1e-6)


def test_node_gramians_are_keyed_by_node_and_sum_to_the_gramian():
    model = make_model(*MLP, grow=True)
    x, targets = batch(model)
    step = frozen_step(model, collect_gramians=True)
    result = step(x, targets)
    jac = step.jacobian
    cells = [g.cell_id(k) for k in range(g.num_cells(model.graph))]
    assert set(cells) <= set(result.node_gramians)
    assert g.branch_id(("t0", "t1"), 1) in result.node_gramians
    torch.testing.assert_close(sum(result.node_gramians.values()), result.gramian)
    torch.testing.assert_close(result.gramian, jac @ jac.T, rtol=1e-5, atol=1e-6)
    for node, cols in step.partition.node_slices.items():
        torch.testing.assert_close(result.node_gramians[node], jac[:, cols] @ jac[:, cols].T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", list(task_gradients.LAYOUTS))
@pytest.mark.parametrize("grow", [False, True])
def test_exact_steps_overwrite_every_gradient_after_a_summed_one(grow, layout):
    # The exact step does not clear gradients (it sets them); one left by a summed step must not leak in.
    model = make_model(*MLP, grow=grow)
    x, targets = batch(model)
    step = frozen_step(model, Equal(), gradient_layout=layout)  # summed, or exact while collecting statistics
    predictions = model(x)
    total = sum(task_loss(model.tasks[t], predictions[t], targets[t]) for t in model.tasks)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(total, params, allow_unused=True)
    for collect in (False, True, True, False, True):
        step.collect_gramians = collect  # False: one summed backward; True: the exact path
        step(x, targets)
        for param, grad in zip(params, expected, strict=True):
            got = param.grad if param.grad is not None else torch.zeros_like(param)
            torch.testing.assert_close(got, grad if grad is not None else torch.zeros_like(param),
                                       rtol=1e-5, atol=1e-6)


def test_equal_weighting_is_one_summed_backward():
    model = make_model()
    x, targets = batch(model)
    jac, _, _ = reference(model, x, targets)
    step = frozen_step(model, Equal())
    result = step(x, targets)
    assert step.jacobian is None and result.gramian is None  # no per-task pass was made
    flat = torch.cat([p.grad.reshape(-1) for p in step.partition.shared])
    torch.testing.assert_close(flat, jac.sum(0), rtol=1e-4, atol=1e-6)


def test_collect_gramians_forces_exact_per_cell_blocks_even_in_ub_mode():
    model = make_model()
    x, targets = batch(model)
    result = frozen_step(model, Equal(), gradients="ub", collect_gramians=True)(x, targets)
    assert {g.cell_id(k) for k in range(g.num_cells(model.graph))} <= set(result.node_gramians)
    torch.testing.assert_close(result.weights, torch.ones(3, dtype=torch.float64))


def test_collecting_conflicts_gives_node_blocks_inside_and_restores_the_step_after_an_error():
    # A detection round trains inside it; a stop or a crash in the round must not leave a step that keeps
    # paying for per-node blocks (and exact gradients under ub) after the round.
    model = make_model()
    x, targets = batch(model)
    step = frozen_step(model, gradients="ub")
    with step.collecting_conflicts():
        inside = step(x, targets)
    assert set(inside.node_gramians) >= {g.cell_id(k) for k in range(g.num_cells(model.graph))}
    assert inside.gramian_space == "parameters"
    with pytest.raises(KeyboardInterrupt), step.collecting_conflicts():
        raise KeyboardInterrupt
    after = step(x, targets)
    assert not step.collect_gramians and after.node_gramians == {} and after.gramian_space == "representation"


def test_ub_uses_representation_gradients():
    model = make_model()
    x, targets = batch(model)
    ref = copy.deepcopy(model)
    step = frozen_step(model, gradients="ub")
    result = step(x, targets)
    assert result.node_gramians == {}
    features = ref.forward_features(x)
    (rep,) = features.values()
    predictions = ref.forward_heads(features)
    losses = [task_loss(ref.tasks[t], predictions[t], targets[t]) for t in ref.tasks]
    z = torch.stack([torch.autograd.grad(loss, rep, retain_graph=True)[0].reshape(-1) for loss in losses])
    torch.testing.assert_close(result.gramian, z @ z.T, rtol=1e-4, atol=1e-8)
    weighted = sum(w * loss for w, loss in zip(result.weights.float(), losses, strict=True))
    part = ParameterPartition(ref)
    expected = torch.autograd.grad(weighted, part.shared)
    for param, grad in zip(step.partition.shared, expected, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)
    # The ub step accumulates into the shared parameters' .grad (one backward through the trunk), so it must
    # clear them first: a second step on the same batch gives the same gradient, not twice it.
    step(x, targets)
    for param, grad in zip(step.partition.shared, expected, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)


def test_ub_on_a_grown_network_uses_every_representation_and_gives_heads_their_own_gradient():
    # A GMK of {t0, t1} ends in the last cell: the representation is the trunk's and the branch's outputs, and t2's
    # head never reads the branch. Each head runs on its own detached copy of them in one backward pass, so a copy
    # mixed up between tasks, or a head or beta given another task's gradient, shows here.
    model = make_model(*MLP, grow=True)
    x, targets = batch(model)
    ref = copy.deepcopy(model)
    _, own, _ = reference(model, x, targets)
    step = frozen_step(model, gradients="ub")
    result = step(x, targets)
    features = ref.forward_features(x)
    assert len(features) == 2
    predictions = ref.forward_heads(features)
    losses = [task_loss(ref.tasks[t], predictions[t], targets[t]) for t in ref.tasks]
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(features.values()), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(z) if gr is None else gr).reshape(-1)
                               for z, gr in zip(features.values(), grads, strict=True)]))
    z = torch.stack(rows)
    assert result.gramian[2, 2] > 0 and (result.gramian[0, 1] != 0)
    torch.testing.assert_close(result.gramian, z @ z.T, rtol=1e-4, atol=1e-8)
    weighted = sum(w * loss for w, loss in zip(result.weights.float(), losses, strict=True))
    expected = torch.autograd.grad(weighted, ParameterPartition(ref).shared)
    for param, grad in zip(step.partition.shared, expected, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)
    for task, grads in own.items():
        assert len(grads) == len(step.partition.specific[task]) > 0
        for param, grad in zip(step.partition.specific[task], grads, strict=True):
            torch.testing.assert_close(param.grad, grad, rtol=1e-5, atol=1e-7)


def test_switching_between_ub_and_exact_restarts_the_tensioner_history():
    # The search runs detection rounds in exact mode inside ub training: a tensioner must not compare
    # representation-gradient norms with parameter-gradient norms.
    from mamo.directions import MGDA, Tensioner

    model = make_model()
    x, targets = batch(model)
    direction = Tensioner(MGDA(), "relative", T=2, alpha=0.5)
    step = frozen_step(model, direction, gradients="ub")
    for _ in range(3):
        step(x, targets)
    assert direction.iteration == 3
    ub_norms = [list(queue) for queue in direction.state_dict()["norms"]]
    with step.collecting_conflicts():  # what a detection round does
        step(x, targets)
        assert direction.iteration == 1  # a fresh history, holding this step's parameter-gradient norms only
        exact_norms = [queue[-1] for queue in direction.state_dict()["norms"]]
        assert all(abs(e - u[-1]) > 1e-3 * u[-1] for e, u in zip(exact_norms, ub_norms, strict=True))
        step(x, targets)
        assert direction.iteration == 2  # no reset while the mode stays
    step(x, targets)
    assert direction.iteration == 1

@pytest.mark.parametrize("direction", [Equal(), mgda()], ids=["summed", "exact"])
def test_nan_loss_raises_naming_the_task(direction):
    tasks = {"good": {"type": "classification", "classes": 3}, "bad": {"type": "regression", "dim": 2}}
    model = make_model(*MLP, tasks=tasks)
    x = torch.randn(4, 6)
    targets = {"good": torch.zeros(4, dtype=torch.long), "bad": torch.full((4, 2), float("nan"))}
    before = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(model, direction, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(FloatingPointError, match="task 'bad' became NaN"):
        step(x, targets)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # no update applied


def test_unknown_names_raise_mamo_errors():
    model = make_model(*MLP)
    with pytest.raises(MamoError, match="train.gradient_path"):
        frozen_step(model, gradient_path="fast")
    with pytest.raises(MamoError, match="train.precision"):
        frozen_step(model, precision="fp8")
    with pytest.raises(MamoError, match="train.gradients"):
        frozen_step(model, gradients="approx")


def _unbatchable(model):
    # .item() inside a gradient hook cannot run under vmap: the batched path fails, the loop does not.
    first = next(iter(model.blocks[g.cell_id(0)].parameters()))
    first.register_hook(lambda grad: grad * (1.0 + 0.0 * grad.sum().item()))


def test_auto_falls_back_to_the_loop_when_an_op_cannot_be_batched(monkeypatch):
    monkeypatch.setitem(task_gradients.BATCHED_PATH, "cpu", task_gradients.BatchedPathRule(min_tasks=1, min_size=0))
    model = make_model(*MLP)
    x, targets = batch(model)
    jac = reference(model, x, targets)[0]
    _unbatchable(model)
    step = frozen_step(model, gradient_path="auto")
    with pytest.warns(UserWarning, match="using the loop"):
        step(x, targets)
    torch.testing.assert_close(step.jacobian, jac, rtol=1e-5, atol=1e-7)
    assert step.path_for(torch.device("cpu")) == "loop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        step(x, targets)


def test_explicit_batched_path_does_not_hide_failures():
    model = make_model(*MLP)
    _unbatchable(model)
    with pytest.raises(RuntimeError, match=r"vmap: .*calling \.item\(\)"):  # torch's own error, not a retry's
        frozen_step(model, gradient_path="batched")(*batch(model))


def test_refresh_after_growth_covers_the_new_branch():
    model = make_model(*MLP)
    x, targets = batch(model)
    step = frozen_step(model, collect_gramians=True)
    step(x, targets)
    size = step.partition.size
    g.grow(model.graph, (("t0", "t2"), 0))
    model.sync()
    step.optimizer.add_param_group({"params": [p for p in model.parameters()
                                               if all(p is not q for q in step.optimizer.param_groups[0]["params"])]})
    step.refresh()
    result = step(x, targets)
    assert step.partition.size > size and step.jacobian.shape == (3, step.partition.size)
    assert g.branch_id(("t0", "t2"), 0) in result.node_gramians


def _train(precision: str, path: str = "auto", steps: int = 60):
    model = make_model(*MLP, m=2)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(3))
    targets = {"t0": x[:, :4].argmax(1), "t1": x[:, 2:].argmax(1)}  # learnable labels
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = TrainStep(model, mgda(), optimizer, precision=precision, gradient_path=path)
    losses = [step(x, targets).losses for _ in range(steps)]
    return losses[0], losses[-1], step


@pytest.mark.parametrize("path", PATHS)
def test_bf16_on_cpu_trains_and_stays_close_to_fp32(path):
    first32, last32, _ = _train("fp32")
    first16, last16, step = _train("bf16", path)
    assert step.jacobian.dtype == torch.float32  # gradients and Gramian stay float32 under autocast
    assert (last16 < 0.6 * first16).all()  # it trains
    # bf16 rounds activations to 8 bits of mantissa: 60 steps stay within 5% (plus 0.01 absolute) of fp32.
    torch.testing.assert_close(last16, last32, rtol=0.05, atol=0.01)


@pytest.mark.parametrize("gradients", ["exact", "ub"])
def test_bf16_losses_are_float32_losses_of_the_autocast_predictions(gradients):
    # Only the forward runs under autocast: the losses take the bf16 predictions up to float32 first, so they
    # are not rounded to bf16's 8-bit mantissa (≈ 4e-3 relative), and neither are their gradients.
    model = make_model(*MLP)
    x, targets = batch(model)
    ref = copy.deepcopy(model).train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        predictions = ref(x)
    assert all(p.dtype == torch.bfloat16 for p in predictions.values())  # autocast really rounds the forward
    expected = torch.stack([task_loss(ref.tasks[t], predictions[t].float(), targets[t]) for t in ref.tasks])
    result = frozen_step(model, precision="bf16", gradients=gradients)(x, targets)
    assert result.losses.dtype == torch.float32
    torch.testing.assert_close(result.losses, expected.detach(), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize(("shape", "layer"), [((3, 16, 16), "blocks.cell4.0.0.conv1"),  # sees 1 × 1
                                             ((3, 32, 8), "blocks.cell3.0.0.conv2")])  # sees 4 × 1
def test_bf16_on_the_cpu_refuses_a_strided_convolution_on_maps_one_wide(shape, layer):
    # oneDNN's bf16 weight gradient for it holds garbage (pure-torch repros, docs/performance.md).
    from mamo.model_checks import bf16_cpu_hazards

    model = make_model(RESNET[0], shape)  # timm's test_resnet
    x, targets = batch(model)
    assert bf16_cpu_hazards(model, x)[0] == layer
    assert model.training  # the probe leaves the mode as it found it
    with pytest.raises(MamoError, match=rf"train.precision=bf16 on the CPU would give wrong weight gradients in "
                                        rf"{re.escape(layer)} .*use train.precision=fp32 on the CPU"):
        frozen_step(model, precision="bf16")(x, targets)
    frozen_step(model, precision="fp32")(x, targets)  # fp32 has no such kernel: it trains
    wide = make_model(RESNET[0], (3, 28, 28))  # the narrowest maps at a strided convolution: 2 × 2
    assert bf16_cpu_hazards(wide, batch(wide)[0]) == []


def test_the_step_asks_auto_for_its_path_with_its_size_tasks_and_precision(monkeypatch):
    monkeypatch.setitem(task_gradients.BATCHED_PATH, "cpu", task_gradients.BatchedPathRule(min_tasks=3, min_size=1))
    cpu = torch.device("cpu")
    two, three = make_model(*MLP, m=2), make_model(*MLP, m=3)
    assert frozen_step(two).path_for(cpu) == "loop" and frozen_step(three).path_for(cpu) == "batched"
    assert frozen_step(three, precision="bf16").path_for(cpu) == "loop"


# ----- CUDA: skipped where no CUDA device exists ------------------------------------------------------------
@pytest.fixture
def ieee_float32():
    """cuDNN runs float32 convolutions in TF32 by default (about 5e-4 relative error a product): a comparison
    with the CPU's float32 at 1e-3 must turn that off, as `train.precision=fp32` on a GPU does not."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@needs_cuda
@pytest.mark.usefixtures("ieee_float32")
@pytest.mark.parametrize("layout", list(task_gradients.LAYOUTS))
@pytest.mark.parametrize("path", PATHS)
def test_cuda_paths_match_cpu_reference(path, layout):
    model = make_model()
    x, targets = batch(model)
    jac = reference(model, x, targets)[0]
    cuda = torch.device("cuda")
    model = model.to(cuda)
    pinned_x = x.pin_memory()
    assert pinned_x.is_pinned()
    x_dev = pinned_x.to(cuda, non_blocking=True)
    t_dev = {t: y.pin_memory().to(cuda, non_blocking=True) for t, y in targets.items()}
    step = frozen_step(model, gradient_path=path, gradient_layout=layout)
    result = step(x_dev, t_dev)
    assert result.losses.device.type == "cpu"
    if layout == "flat":
        assert step.jacobian.device.type == "cuda"
        torch.testing.assert_close(step.jacobian.cpu(), jac, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(result.gramian, jac @ jac.T, rtol=1e-3, atol=1e-5)
    assert all(p.grad.device.type == "cuda" for p in step.partition.shared)
    flat = torch.cat([p.grad.reshape(-1).cpu() for p in step.partition.shared])
    torch.testing.assert_close(flat, result.weights.float() @ jac, rtol=1e-3, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("gradients", ["summed", "ub"])
def test_cuda_summed_and_ub_steps_match_the_cpu(gradients, ieee_float32):
    model = make_model()
    x, targets = batch(model)
    direction = Equal() if gradients == "summed" else mgda()
    cpu_step = frozen_step(copy.deepcopy(model), direction, gradients="exact" if gradients == "summed" else "ub")
    expected = cpu_step(x, targets)
    cuda = torch.device("cuda")
    step = frozen_step(model.to(cuda), direction, gradients="exact" if gradients == "summed" else "ub")
    result = step(x.to(cuda), {t: y.to(cuda) for t, y in targets.items()})
    assert result.losses.device.type == "cpu"  # loggers read the host copy: no further syncs
    torch.testing.assert_close(result.losses, expected.losses, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.weights, expected.weights, rtol=1e-3, atol=1e-6)
    for ours, theirs in zip(step.partition.shared, cpu_step.partition.shared, strict=True):
        torch.testing.assert_close(ours.grad.cpu(), theirs.grad, rtol=1e-3, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("path", ["loop", "auto"])
def test_cuda_bf16_gives_the_gradients_of_torchs_autocast_in_float32(path):
    # bf16 moves a step's gradients by far more than rounding (this model's Gramian by up to 14% of its largest
    # entry, measured on an H200 and on CPU), so the reference is torch's own autocast forward, not float32;
    # `auto` takes the loop under bf16 (the batched path's batch-norm rule fails there), asked for or not.
    model = make_model().cuda()
    x, targets = batch(model)
    x, targets = x.cuda(), {t: y.cuda() for t, y in targets.items()}
    jac, _, losses = reference(model, x, targets, "bf16")
    step = frozen_step(model, precision="bf16", gradient_path=path)
    assert step.path_for(x.device) == "loop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no batched attempt that failed and fell back
        result = step(x, targets)
    assert step.jacobian.dtype == torch.float32
    torch.testing.assert_close(result.losses, losses.cpu(), rtol=1e-5, atol=0.0)
    gramian = (jac @ jac.T).cpu()
    torch.testing.assert_close(result.gramian, gramian, rtol=2e-2, atol=1e-3 * gramian.abs().max().item())



def test_step_benchmark_times_every_method_beside_equal_and_the_floor():
    from mamo.bench import step as bench
    from mamo.bench import step_tables

    setup = bench.build_setup("timm:test_resnet", (3, 16, 16), 3, 4, torch.device("cpu"), "fp32")
    results, rounds = bench.measure(setup, torch.device("cpu"), warmup=0, rounds=2, clock="process")
    assert rounds == 2 and set(results) == set(bench.methods())
    ran = {name: res for name, res in results.items() if "error" not in res}
    assert {"equal", "forward + m backward", "mgda (loop path)", "mgda-ub", "conflict statistics"} <= set(ran)
    assert all(res["equal"] and res["forward + m backward"] and res["times"] for res in ran.values())
    assert results["equal"]["equal"] == [1.0] * len(results["equal"]["equal"])
    table = step_tables.step_table("t", results)
    assert [row[0] for row in table["rows"]] == list(results)
    from mamo.directions import DIRECTIONS

    assert {"optimizer update alone"} | set(DIRECTIONS) - {"mgda", "central"} <= set(ran)  # a row per direction
    # The floor target without the update: the method's × floor measured beside the floor in its own session,
    # the update's share of the floor taken out of both sides; × equal medians of other sessions do not enter.
    paired = {"mgda + tensioner": {"equal": [1.60, 1.40, 1.50], "forward + m backward": [1.10, 1.12, 1.08]},
              "forward + m backward": {"equal": [1.25, 1.45, 1.35], "forward + m backward": [1.0, 1.0, 1.0]},
              "optimizer update alone": {"equal": [0.05, 0.04, 0.06], "forward + m backward": [0.03, 0.02, 0.04]}}
    assert step_tables._passes_ratio(paired) == pytest.approx((1.10 - 0.03) / (1.0 - 0.03))


def test_the_benchmark_floor_sets_each_tasks_gradients_like_the_exact_step():
    from mamo.bench import step as bench

    setup = bench.build_setup("lenet", (1, 28, 28), 2, 4, torch.device("cpu"), "fp32")
    part = setup.part
    for param in setup.model.parameters():
        param.grad = torch.full_like(param, 7.0)  # a previous row's gradients: to be replaced, not added to
    setup.optimizer = lambda: torch.optim.SGD(setup.model.parameters(), lr=0.0)  # keep the weights for the check
    bench._floor(setup)()
    losses = setup.losses(setup.model(setup.x))
    last = torch.autograd.grad(losses[-1], part.inputs[-1], retain_graph=True)
    first_own = torch.autograd.grad(losses[0], part.specific[part.tasks[0]])
    for param, grad in zip(part.inputs[-1], last, strict=True):
        torch.testing.assert_close(param.grad, grad)  # shared: the last task's gradients, set
    for param, grad in zip(part.specific[part.tasks[0]], first_own, strict=True):
        torch.testing.assert_close(param.grad, grad)


def test_a_non_finite_loss_names_its_tasks_in_a_sentence() -> None:
    # "the loss of task 'left', 'right' became NaN or infinite" (a user audit): plural, and joined as a sentence.
    from types import SimpleNamespace

    from mamo.step import TrainStep

    step = SimpleNamespace(partition=SimpleNamespace(tasks=["left", "right", "and"]))
    for losses, sentence in [
        ([1.0, math.nan, 2.0], "the loss of task 'right' became NaN or infinite"),
        ([math.inf, math.nan, 2.0], "the losses of tasks 'left' and 'right' became NaN or infinite"),
        ([math.inf, math.nan, -math.inf], "the losses of tasks 'left', 'right' and 'and' became NaN or infinite"),
    ]:
        with pytest.raises(FloatingPointError) as raised:
            TrainStep._check(step, losses)
        assert str(raised.value) == sentence
    TrainStep._check(step, [1.0, 2.0, 3.0])  # finite: no word
