"""The max-pooling of the built-in ``lenet`` and ``cnn`` backbones: :class:`torch.nn.MaxPool2d` with the same
numbers, faster on CPU.

torch's CPU kernel for a contiguous (NCHW) map took 3.2 ms for LeNet's first pooling at batch 128 (10 × 24 × 24
maps), against 1.6 ms for the channels-last kernel on a copy, with the same values and the same argmax indices
(the first maximum of each window in both; a third of MultiMNIST's windows tie, on the empty background).
Pooling forward there is then channels-last and its backward the NCHW kernel, fed the channels-last indices: an
MGDA step's one forward and m = 2 backward passes through LeNet's trunk ran 8-10% faster at one thread and 5% at
two (measured 2026-11-26 on the 2-core EPYC; docs/performance.md), with bit-identical outputs and gradients
(tested). Other devices, a map that is not contiguous, tracing and export take the plain module's path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Non-overlapping ``size`` × ``size`` max-pooling of an NCHW map, forward through the channels-last kernel."""

    @staticmethod
    def forward(x: Tensor, size: int) -> tuple[Tensor, Tensor]:
        pooled, indices = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), size, return_indices=True)
        return pooled.contiguous(), indices.contiguous()

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        x, ctx.size = inputs
        ctx.save_for_backward(x, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor, _: Tensor) -> tuple[Tensor, None]:
        x, indices = ctx.saved_tensors
        window = [ctx.size, ctx.size]
        # The NCHW kernel, fast for a backward pass, with the indices the forward found: what F.max_pool2d's
        # own backward computes from its own (identical) indices.
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, window, window, [0, 0], [1, 1], False,
                                                               indices), None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(size)`` (stride = size, no padding), computed as described in this module's docstring."""

    def __init__(self, size: int):  # only these arguments: the channels-last path knows no stride or padding
        super().__init__(size)

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous() or torch.jit.is_tracing()
                or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return super().forward(x)
        if not (torch.is_grad_enabled() and x.requires_grad):  # evaluation: no indices to keep
            return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), self.kernel_size).contiguous()
        return _ChannelsLastMaxPool.apply(x, self.kernel_size)[0]
