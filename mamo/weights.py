"""Pretrained backbone weights from a local file (``model.weights``): nothing is downloaded, so a timm model's
ImageNet weights are a state_dict the user saved, read with torch or safetensors and fitted to the data's
input channels."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mamo.errors import MamoError


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise MamoError(f"timm weights file {path} is a folder (model.weights); point it at the state_dict file "
                        "inside it.")
    if not path.is_file():
        raise MamoError(f"timm weights file {path} does not exist (model.weights); point it at a local file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling and safetensors raise many types for a wrong or damaged file
        raise MamoError(
            f"timm weights file {path} cannot be read ({type(exc).__name__}); give a state_dict saved with "
            "torch.save or safetensors."
        ) from exc
    # Training checkpoints often wrap the weights; take the state_dict inside.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise MamoError(f"timm weights file {path} holds a {type(state).__name__}, not a state_dict; save one.")
    return state


def _plain(key: str) -> str:
    return key.replace("_", ".")


def _in_features_names(state: dict, own: dict) -> dict:
    """``state`` with each tensor the features model needs under the features model's name.

    timm's features wrapper flattens nested stages into its own children (``stages.0`` becomes ``stages_0``), so
    weights saved from the whole model, as ImageNet weights are, name ConvNeXt, DenseNet, Swin or FastViT tensors
    otherwise: matched with ``_`` and ``.`` read alike, where that match is unique."""
    plain: dict[str, str | None] = {}
    for key in state:
        plain[_plain(key)] = None if _plain(key) in plain else key  # None: two keys read alike, no match
    found = dict(state)
    for key in own:
        source = plain.get(_plain(key))
        if key not in found and source is not None:
            found[key] = state[source]
    return found


def load_backbone_weights(model: nn.Module, path: Path, name: str, in_chans: int) -> None:
    """Load a local state_dict into the features model; extra keys (the classifier) are ignored.

    ImageNet weights expect 3 input channels; the first convolution is adapted to the data's channels as timm
    does for pretrained weights (summed for one channel, repeated and rescaled for more).
    """
    from timm.models import adapt_input_conv

    own = model.state_dict()
    state = _in_features_names(_read_state(path), own)
    # weights_only loads lists and numbers too; entries the model does not read may be anything (an epoch count).
    odd = next((key for key in own if key in state and not isinstance(state[key], torch.Tensor)), None)
    if odd is not None:
        raise MamoError(f"timm weights file {path} holds a {type(state[odd]).__name__} under '{odd}', where timm "
                        f"model '{name}' needs a tensor; save the model's state_dict().")
    first = model.pretrained_cfg.get("first_conv") if hasattr(model, "pretrained_cfg") else None
    for conv in [first] if isinstance(first, str) else list(first or []):
        key = next((k for k in own if _plain(k) == _plain(f"{conv}.weight")), None)  # the full model's name
        if key in state and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1]:
            state[key] = adapt_input_conv(in_chans, state[key])
    missing = [key for key in own if key not in state]
    wrong = [key for key in own if key in state and tuple(state[key].shape) != tuple(own[key].shape)]
    if missing or wrong:
        bad = missing or wrong
        raise MamoError(
            f"timm weights file {path} does not fit timm model '{name}': {len(bad)} of its {len(own)} tensors are "
            f"{'missing' if missing else 'of another shape'} (e.g. '{bad[0]}'); use weights saved from '{name}'."
        )
    model.load_state_dict({key: state[key] for key in own})
