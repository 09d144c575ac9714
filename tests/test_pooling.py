"""mamo's max-pooling gives nn.MaxPool2d's numbers (outputs, gradients, evaluation), on every gradient path, and
leaves tracing and export to the plain module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mamo.pooling import MaxPool2d


def _maps(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    maps = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    maps[:, :, : shape[2] // 2] = 0.25  # tied windows, as an empty image background gives after a convolution
    return maps


@pytest.mark.parametrize("shape,size", [((128, 10, 24, 24), 2), ((3, 20, 8, 8), 2), ((2, 4, 7, 9), 2),
                                        ((1, 1, 2, 2), 2), ((128, 10, 24, 24), 3), ((3, 20, 8, 8), 3),
                                        ((2, 4, 7, 9), 3)])
def test_outputs_gradients_and_evaluation_are_nn_maxpool2ds_bit_for_bit(shape, size) -> None:
    maps = _maps(shape)
    maps[0, 0, -1, -1] = float("nan")  # a NaN wins its window in both
    ours, plain = maps.clone().requires_grad_(), maps.clone().requires_grad_()
    pooled, expected = MaxPool2d(size)(ours), nn.MaxPool2d(size)(plain)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0, equal_nan=True)
    assert pooled.is_contiguous()
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.autograd.grad(pooled, ours, cotangent)[0],
                       torch.autograd.grad(expected, plain, cotangent)[0])
    with torch.no_grad():
        torch.testing.assert_close(MaxPool2d(size)(maps), nn.MaxPool2d(size)(maps), rtol=0, atol=0, equal_nan=True)


def test_a_lenet_trunk_gets_the_same_gradients_on_the_loop_and_the_batched_path() -> None:
    # The batched path vmaps autograd.grad over one-hot cotangents, calling the backward with batched tensors.
    def trunk(pool: type[nn.Module]) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 10, 5), pool(2), nn.ReLU(), nn.Conv2d(10, 20, 5), pool(2), nn.ReLU(),
                             nn.Flatten(), nn.Linear(320, 2))

    images = _maps((16, 1, 28, 28))
    for vmapped in (False, True):
        grads = []
        for pool in (MaxPool2d, nn.MaxPool2d):
            net = trunk(pool)
            losses = net(images).pow(2).mean(0)  # two "task" losses of one shared trunk
            params = list(net.parameters())
            if vmapped:
                grads.append(torch.func.vmap(lambda v, losses=losses, params=params: torch.autograd.grad(
                    losses, params, v, retain_graph=True))(torch.eye(2)))
            else:
                grads.append([g for t in range(2) for g in torch.autograd.grad(losses[t], params, retain_graph=True)])
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_export_sees_a_plain_max_pooling() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), MaxPool2d(2))
    program = torch.export.export(net, (torch.randn(2, 1, 10, 10),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.max_pool2d.default" in targets
    assert not any("contiguous" in target or "clone" in target for target in targets)


def test_a_channels_last_map_keeps_the_plain_modules_layout() -> None:
    maps = _maps((2, 3, 6, 6)).contiguous(memory_format=torch.channels_last)
    pooled, expected = MaxPool2d(2)(maps), nn.MaxPool2d(2)(maps)
    assert torch.equal(pooled, expected) and pooled.stride() == expected.stride()
