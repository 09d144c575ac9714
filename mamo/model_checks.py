"""Pre-flight checks of a model against the training settings: what would fail or train wrongly is refused
with one sentence before the run folder is made or the first step runs, by probing one sample through the model."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mamo.errors import MamoError
from mamo.model import MamoNet

STRIDED_CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _layers_seeing(model: torch.nn.Module, x: torch.Tensor, layer: Callable[[torch.nn.Module], bool],
                   sees: Callable[[torch.Tensor], bool]) -> list[str]:
    """The names of the ``layer`` modules whose input ``sees`` flags when one sample of ``x`` goes through the
    model in eval mode (a shape probe: batch-norm statistics stay untouched, and one sample is allowed)."""
    seen: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda mod, args, name=name: seen.append(name)
                                              if sees(args[0]) else None)
             for name, module in model.named_modules() if layer(module)]
    if not hooks:
        return []
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(seen))


def bf16_cpu_hazards(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """The strided convolutions that see feature maps one element wide on input ``x``.

    On the CPU, oneDNN's bf16 weight gradient for such a convolution (stride above 1, a kernel wider than 1)
    leaves whatever was in memory (NaN, inf or 1e30-sized values) in the kernel taps that see only padding:
    torch 2.14.1 with oneDNN 3.12 on an AVX-512 CPU, reproduced without mamo for maps of width 1 (1×1, 4×1,
    9×1, 1-D and 3-D alike; widths of 2 or more were right), docs/performance.md. Finite garbage passes the NaN
    check and corrupts the weights silently, so a bf16 run on the CPU with such a layer is refused.
    """
    return _layers_seeing(model, x, lambda m: isinstance(m, STRIDED_CONVOLUTIONS) and max(m.stride) > 1
                          and m.kernel_size[-1] > 1, lambda t: t.shape[-1] == 1)


def check_batch_of_one(model: MamoNet, batch_size: int, train_size: int, device: torch.device) -> None:
    """Refuse training batches of one sample (``train.batch_size`` 1, or a train split of one) through a batch
    norm that would then see one value per channel, which torch refuses in training: before the run folder is
    made, not at the first step (batches of one otherwise occur only as a last batch, which is dropped)."""
    if min(batch_size, train_size) != 1:
        return
    norms = _layers_seeing(model, torch.zeros(1, *model.space.input_shape, device=device),
                           lambda m: isinstance(m, torch.nn.modules.batchnorm._BatchNorm),
                           lambda t: t.numel() == t.shape[1])
    if norms:
        raise MamoError(f"a batch of one sample would reach the batch norm {norms[0]} as one value per channel, "
                        f"which cannot train; set train.batch_size to 2 or more (now {batch_size}) and give the "
                        f"train split at least 2 samples (now {train_size}).")


def check_precision(model: MamoNet, precision: str, device: torch.device) -> None:
    """Refuse ``precision`` where it would give wrong gradients on ``device`` (see :func:`bf16_cpu_hazards`)."""
    if precision != "bf16" or device.type != "cpu":
        return
    hazards = bf16_cpu_hazards(model, torch.zeros(1, *model.space.input_shape, device=device))
    if hazards:
        raise MamoError(f"train.precision=bf16 on the CPU would give wrong weight gradients in {hazards[0]} "
                        f"(a strided convolution on feature maps one element wide, where oneDNN's bf16 kernel "
                        f"leaves garbage; torch {torch.__version__}); use train.precision=fp32 on the CPU, or larger "
                        "inputs.")
