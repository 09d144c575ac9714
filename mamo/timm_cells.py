"""timm backbones as cells: a ``features_only`` model whose stages run one after another, cut after each stage
(:data:`TIMM_STAGES` says how, by wrapper class), built for the data's input size and from a local weights file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mamo.errors import MamoError
from mamo.weights import load_backbone_weights


class _Permute(nn.Module):
    """Reorders a feature map's dimensions (between timm's channels-last stages and channels-first cells)."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def _list_net_stages(model: nn.Module) -> list[nn.Module] | None:
    """timm's FeatureListNet (ResNet, RegNet, ConvNeXt, ...): its modules in order, cut after each returned layer.

    Some families (MambaOut, ...) run channels-last; their cells convert so that every cell reads and gives (C, H, W),
    which the heads and the GMK mean expect.
    """
    fmt = getattr(model, "output_fmt", "NCHW")
    channels_last = str(getattr(fmt, "value", fmt)) == "NHWC"
    cells, pending = [], []
    for layer_name, module in model.items():
        if channels_last and not pending and cells:
            pending.append(_Permute(0, 2, 3, 1))
        pending.append(module)
        if layer_name in model.return_layers:
            cells.append(nn.Sequential(*pending, *([_Permute(0, 3, 1, 2)] if channels_last else [])))
            pending = []
    return cells


def _block_stages(model: nn.Module) -> list[nn.Module] | None:
    """EfficientNet/MobileNet features: the stem, then ``blocks[i]``, cut after each stage in ``_stage_out_idx``."""
    if getattr(model, "feature_hooks", None) is not None:
        return None  # hook-based feature locations do not follow the block order
    stem = [module for name, module in model.named_children() if name != "blocks"]
    stages = [(0, nn.Sequential(*stem))] + [(i + 1, block) for i, block in enumerate(model.blocks)]
    cells, pending = [], []
    for index, module in stages:
        pending.append(module)
        if index in model._stage_out_idx:
            cells.append(nn.Sequential(*pending))
            pending = []
    return cells


# timm's features_only wrappers whose stages run one after another, by class name: how to cut them into cells.
TIMM_STAGES: dict[str, Callable[[nn.Module], list[nn.Module] | None]] = {
    "FeatureListNet": _list_net_stages,
    "EfficientNetFeatures": _block_stages,
    "MobileNetV3Features": _block_stages,
}


def check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        raise MamoError(f"unknown timm model '{name}' (model.backbone); pick a name from timm.list_models().")


def create_timm_cells(name: str, input_shape: tuple[int, ...], weights: str | None) -> list[nn.Module]:
    """timm model ``name``'s ``features_only`` stages as cells for inputs of ``input_shape`` (C, H, W), with the
    state_dict in ``weights`` when given."""
    import timm

    check_timm_name(name)
    options = {"pretrained": False, "features_only": True, "in_chans": input_shape[0]}
    native = fixed_input_size(name)
    if native and native != tuple(input_shape[1:]):
        # Built for the data's size (position tables, windows), as timm allows: at its own size such a model fails
        # on any other input, larger ones included. Fixed by name and input, so a reload builds the same model.
        options["img_size"] = tuple(input_shape[1:])
    try:
        try:
            model = timm.create_model(name, **options)
        except TypeError:  # a fixed-size model that takes no img_size: built as it is
            if "img_size" not in options:
                raise
            del options["img_size"]
            model = timm.create_model(name, **options)
    except Exception as exc:  # timm raises many types for models without features_only support
        raise MamoError(f"timm model '{name}' cannot give features_only stages ({exc}); pick another.") from exc
    _revive_zero_scales(model)
    if weights:
        load_backbone_weights(model, Path(weights), name, input_shape[0])
    splitter = TIMM_STAGES.get(type(model).__name__)
    cells = splitter(model) if splitter else None
    if not cells:
        raise MamoError(
            f"timm model '{name}' has no sequential stages ({type(model).__name__}); use a ResNet, RegNet, "
            "ConvNeXt, EfficientNet, MobileNet or another model whose stages run one after another."
        )
    return cells


def fixed_input_size(name: str) -> tuple[int, int] | None:
    """(H, W) for a timm model its config marks as made for one input size (ViT, Swin, MaxViT, CoAtNet, ...)."""
    import timm

    config = timm.models.get_pretrained_cfg(name)
    if config is None or not config.fixed_input_size:
        return None
    return tuple(config.input_size[1:])


def _revive_zero_scales(model: nn.Module) -> None:
    """Set normalisation scales that start at exactly zero to one.

    timm zero-initialises the last normalisation of each residual block (``zero_init_last``); every other parameter
    of that block then gets a zero gradient on the first steps, so its cell's gradient conflicts would be read off
    a few normalisation scales. With scale one every parameter learns, and is measured, from the first step.
    """
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
            if not module.weight.detach().any():
                nn.init.ones_(module.weight)
