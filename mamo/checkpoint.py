"""Search checkpoints: everything needed to continue a stopped search exactly where it stopped.

A checkpoint holds the architecture graph, the weights, the optimizer state keyed by parameter *name* (the
parameter order of a grown model rebuilt from its graph differs from the order in which growth added them),
the direction's state (tensioner history, PCGrad's generator), the data-order generator and the round
records. Files are written to a temporary name and renamed, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from mamo.errors import MamoError


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """The optimizer's groups and per-parameter state, with parameters named as in ``model``."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = []
    state = {}
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
        for param in group["params"]:
            if param in optimizer.state:
                state[names[id(param)]] = optimizer.state[param]
    return {"groups": groups, "state": state}


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict) -> None:
    """Rebuild ``optimizer``'s groups from ``saved`` (same names) and load their state."""
    params = dict(model.named_parameters())
    optimizer.param_groups.clear()
    optimizer.state.clear()
    for group in saved["groups"]:
        optimizer.add_param_group({**group, "params": [params[name] for name in group["params"]]})
    for name, value in saved["state"].items():
        optimizer.state[params[name]] = {
            k: v.to(params[name].device) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
            for k, v in value.items()
        }


def save_checkpoint(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint; a damaged file gives one sentence naming it and the way out."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise MamoError(
            f"checkpoint {path} is corrupt ({type(exc).__name__}); delete it to resume from the previous one."
        ) from exc


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest ``phase-NN-*.pt`` in ``folder`` (phases are numbered in order)."""
    found = sorted(folder.glob("phase-*.pt"))
    return found[-1] if found else None
