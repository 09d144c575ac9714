"""Shared by the step and task-gradient tests: tiny models with three tasks, a batch, a frozen step, and
per-task gradients by separate ``autograd.grad`` calls as the reference."""

from __future__ import annotations

import copy

import pytest
import torch

from mamo import graph as g
from mamo.config import DirectionConfig, ModelConfig, TensionerConfig
from mamo.directions import create_direction
from mamo.model import compile_model
from mamo.spaces import create_space
from mamo.step import TrainStep
from mamo.task_gradients import GRADIENT_PATHS, ParameterPartition
from mamo.tasks import parse_tasks, task_loss

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
PATHS = list(GRADIENT_PATHS)
# A tiny timm ResNet (convolution, batch-norm, pooling) and an MLP with a GMK the third task never reaches.
RESNET = ("timm:test_resnet", (3, 16, 16))
MLP = ("mlp", (6,))


def make_model(backbone: str = RESNET[0], shape: tuple = RESNET[1], m: int = 3, grow: bool = False,
               tasks: dict | None = None):
    raw = tasks or {f"t{i}": {"type": "classification", "classes": 4} for i in range(m)}
    space = create_space(ModelConfig(backbone=backbone, hidden=[8, 6], head_hidden=5), shape)
    graph = g.build_hps_graph(space, parse_tasks(raw, "the test"))
    if grow:
        g.grow(graph, (("t0", "t1"), 1))
    model = compile_model(graph, seed=0)
    if grow:  # a non-zero beta, so the branch really feeds the heads of t0 and t1
        with torch.no_grad():
            for beta in model.betas.values():
                beta.fill_(0.7)
    return model


def batch(model, n: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *model.space.input_shape, generator=gen)
    targets = {t: torch.randint(0, spec.classes or 1, (n,), generator=gen) for t, spec in model.tasks.items()}
    return x, targets


def mgda(formulation: str = "off"):
    return create_direction(DirectionConfig(name="mgda", tensioner=TensionerConfig(formulation=formulation, T=1)))


def frozen_step(model, direction=None, **kwargs) -> TrainStep:
    """A step whose optimizer does not move the weights, so gradients can be compared after it."""
    return TrainStep(model, direction or mgda(), torch.optim.SGD(model.parameters(), lr=0.0), **kwargs)


def reference(model, x, targets, precision: str = "fp32"):
    """Per-task gradients by separate autograd.grad calls on a copy: (J, own head gradients, losses). With
    ``precision="bf16"`` the forward runs under torch's own autocast and the losses take its predictions up to
    float32, as ``train.precision=bf16`` promises."""
    model = copy.deepcopy(model)
    part = ParameterPartition(model)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        predictions = model(x)
    losses = [task_loss(model.tasks[t], predictions[t].float(), targets[t]) for t in part.tasks]
    rows, own = [], {}
    for task, loss in zip(part.tasks, losses, strict=True):
        grads = torch.autograd.grad(loss, part.shared, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if gr is None else gr).reshape(-1)
                               for p, gr in zip(part.shared, grads, strict=True)]))
        own[task] = torch.autograd.grad(loss, part.specific[task], retain_graph=True)
    return torch.stack(rows), own, torch.stack(losses).detach()
