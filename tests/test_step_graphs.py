"""``train.cuda_graphs``: the device half of a step replayed from CUDA graphs trains exactly like the eager step.
The CUDA tests are skipped where no CUDA device exists; on a CPU the setting changes nothing."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from step_cases import batch, make_model, mgda, needs_cuda

from mamo.directions.equal import Equal
from mamo.step import TrainStep
from mamo.step_graphs import WARMUP, StepGraphs

DIRECTIONS = {"equal": Equal, "mgda + tensioner": lambda: mgda("thesis")}


def _train(model, direction, cuda_graphs: bool, batches, precision: str = "fp32", lr_after: int | None = None,
           grads: list | None = None, **step_options):
    """Losses per step and the step object after training on ``batches``; from step ``lr_after`` on the learning
    rate is lower (the optimizer's update stays outside the graphs, so a new rate must take effect). ``grads``
    collects every step's gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = TrainStep(model, direction, optimizer, precision=precision, cuda_graphs=cuda_graphs, **step_options)
    losses = []
    for i, (x, targets) in enumerate(batches):
        if i == lr_after:
            optimizer.param_groups[0]["lr"] = 0.02
        losses.append(step(x, targets).losses)
        if grads is not None:
            grads.append(torch.cat([p.grad.reshape(-1).float() for p in model.parameters()]).cpu())
    return torch.stack(losses), step


def _batches(model, device: torch.device, sizes: list[int]):
    out = []
    for seed, n in enumerate(sizes):
        x, targets = batch(model, n=n, seed=seed)
        out.append((x.to(device), {t: y.to(device) for t, y in targets.items()}))
    return out


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_cuda_graphs_on_a_cpu_change_nothing(direction):
    model = make_model()
    batches = _batches(model, torch.device("cpu"), [6, 6, 6, 6, 4])
    eager, _ = _train(copy.deepcopy(model), DIRECTIONS[direction](), False, batches)
    graphed, step = _train(model, DIRECTIONS[direction](), True, batches)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    assert step._graphs.recordings == {}  # nothing recorded off CUDA


@needs_cuda
@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize("grown", [False, True], ids=["hps", "grown"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_graphed_steps_train_like_eager_ones(direction, precision, grown):
    model = make_model(grow=grown).cuda()  # grown: a GMK that the third task's loss never reaches
    # Full batches and a smaller last one of each epoch: both shapes are recorded and replayed, while the
    # weights move, and the learning rate changes on the way.
    sizes = ([6] * (WARMUP + 2) + [4]) * (WARMUP + 2)
    batches = _batches(model, torch.device("cuda"), sizes)
    eager_model = copy.deepcopy(model)
    eager_grads, graphed_grads = [], []
    eager, _ = _train(eager_model, DIRECTIONS[direction](), False, batches, precision, len(sizes) // 2, eager_grads)
    graphed, step = _train(model, DIRECTIONS[direction](), True, batches, precision, len(sizes) // 2, graphed_grads)
    assert sum(r.graph is not None for r in step._graphs.recordings.values()) == 2
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-7)
    for ours, theirs in zip(graphed_grads, eager_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    for ours, theirs in zip(model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    for ours, theirs in zip(model.buffers(), eager_model.buffers(), strict=True):  # batch-norm statistics
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=1e-7)


@needs_cuda
@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize("layout", ["flat", "parameters"])
@pytest.mark.parametrize("path", ["loop", "batched"])
def test_graphed_steps_by_every_gradient_path_and_layout(path, layout):
    model = make_model().cuda()
    batches = _batches(model, torch.device("cuda"), [6] * (WARMUP + 3))
    eager_model = copy.deepcopy(model)
    options = {"gradient_path": path, "gradient_layout": layout}
    eager, _ = _train(eager_model, mgda("thesis"), False, batches, **options)
    graphed, step = _train(model, mgda("thesis"), True, batches, **options)
    assert [r.graph is not None for r in step._graphs.recordings.values()] == [True]
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-7)
    for ours, theirs in zip(model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@needs_cuda
@pytest.mark.usefixtures("deterministic_cudnn")
def test_conflict_statistics_steps_replay_graphs_of_their_own_and_a_refresh_records_anew():
    model = make_model(grow=True).cuda()
    batches = _batches(model, torch.device("cuda"), [6] * (WARMUP + 2))
    steps = {graphs: TrainStep(m, mgda(), torch.optim.SGD(m.parameters(), lr=0.01), cuda_graphs=graphs)
             for graphs, m in ((False, copy.deepcopy(model)), (True, model))}
    for collecting in (True, False, True):  # a detection round, plain training, another round
        for x, targets in batches:
            results = {}
            for graphs, step in steps.items():
                context = step.collecting_conflicts() if collecting else contextlib.nullcontext()
                with context:
                    results[graphs] = step(x, targets)
            assert bool(results[True].node_gramians) == collecting
            for node, block in results[False].node_gramians.items():
                torch.testing.assert_close(results[True].node_gramians[node], block, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(results[True].gramian, results[False].gramian, rtol=1e-5, atol=1e-7)
    graphed = steps[True]
    assert sorted(key[0] for key, r in graphed._graphs.recordings.items() if r.graph is not None) == [
        "exact/by node", "exact/whole"]
    streams = dict(graphed._graphs.side_streams)
    graphed.refresh()  # what growth calls: the old graphs replay the old network's memory
    assert graphed._graphs.recordings == {}
    assert graphed._graphs.side_streams == streams != {}  # the warm-up stream is kept


@needs_cuda
def test_a_step_that_cannot_be_recorded_runs_eagerly_after_one_warning():
    weight = torch.nn.Parameter(torch.ones(3, device="cuda"))

    def half(x, targets):
        scale = float(targets["t"].sum().item())  # a value on the host: not recordable
        loss = (weight * x).sum() * scale
        loss.backward()
        return loss.detach()

    graphs = StepGraphs(lambda: [weight])
    x, targets = torch.ones(3, device="cuda"), {"t": torch.full((2,), 2.0, device="cuda")}
    for _ in range(WARMUP):
        weight.grad = None
        assert graphs.run("odd", half, x, targets).item() == 12.0
    weight.grad = None
    with pytest.warns(UserWarning, match="could not be recorded as a CUDA graph"):
        assert graphs.run("odd", half, x, targets).item() == 12.0
    torch.testing.assert_close(weight.grad, torch.full((3,), 4.0, device="cuda"))  # not the half-recorded one
    weight.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert graphs.run("odd", half, x, targets).item() == 12.0


def test_cuda_graphs_asked_for_off_cuda_are_noted_once_in_the_log():
    from mamo.config import load_config
    from mamo.data import load_data
    from mamo.session import start_notes

    config = load_config("quick", ["train.cuda_graphs=true"])
    data = load_data(config.data)
    notes = start_notes(config, data, torch.device("cpu"))
    assert [n for n in notes if "cuda_graphs" in n] == [
        "note: train.cuda_graphs is on, but the run trains on cpu, which has no CUDA graphs; the setting changes "
        "nothing here."]
    assert not [n for n in start_notes(config, data, torch.device("cuda")) if "cuda_graphs" in n]
    assert not [n for n in start_notes(load_config("quick"), data, torch.device("cpu")) if "cuda_graphs" in n]
