"""Checkpoints: everything needed to continue a stopped ``train`` or ``search`` exactly where it stopped.

A checkpoint holds the architecture graph, the weights, the optimizer state keyed by parameter *name* (the
parameter order of a grown model rebuilt from its graph differs from the order in which growth added them),
the direction's state (tensioner history, PCGrad's generator), the data-order generator and the trainer's
counters and history; a search adds its round records, ``train`` the best-so-far weights. Files are written
to a temporary name and renamed, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import time
import zipfile
from pathlib import Path

import torch
from torch import nn

from mamo import graph as g
from mamo.errors import MamoError, first_line, write_fix
from mamo.trainer import Callback, KeepBest, Trainer
from mamo.writes import replace_atomically, write_through_file


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
    """Write ``payload`` to ``path`` through a temporary file; a failed write (a full disk) leaves the previous
    checkpoint as it was and is one sentence."""
    try:
        replace_atomically(path, lambda tmp: write_through_file(tmp, lambda file: torch.save(payload, file)),
                           durable=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: torch's own, a failed write is an OSError by now
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise MamoError(f"could not write the checkpoint {path} ({reason}); {write_fix(getattr(exc, 'errno', None))}, "
                        "then resume the run with --resume.") from exc


# What every checkpoint of a run holds (trainer_state's entries): a file without them is no mamo checkpoint.
TRAINER_KEYS = ("graph", "model", "optimizer", "direction", "generator", "global_step", "epoch", "history")


def load_checkpoint(path: Path, required: tuple[str, ...] = TRAINER_KEYS) -> dict:
    """Read a checkpoint holding at least ``required``; a damaged or foreign file gives one sentence naming it
    and the way out (a missing file stays FileNotFoundError)."""
    # A search resumes from its previous phase checkpoint; a train run keeps only last.pt and starts again.
    way_out = ("delete it to resume from the previous one (a train run, which keeps only last.pt, then starts "
               "from its first epoch).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except PermissionError as exc:  # the CLI's sentence for OS errors would call it a failed write
        raise MamoError(f"could not read the checkpoint {path} ({exc.strerror}); fix its permissions, then "
                        "resume again.") from exc
    # A truncated zip makes torch's reader raise OSError (EINVAL) or RuntimeError, depending on where it ends.
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise MamoError(f"checkpoint {path} is corrupt ({type(exc).__name__}); {way_out}") from exc
    missing = [key for key in required if key not in state] if isinstance(state, dict) else list(required)
    if missing:
        raise MamoError(f"checkpoint {path} is not one of this run's checkpoints (it lacks {', '.join(missing)}); "
                        f"{way_out}")
    return state


def _phase_number(path: Path) -> int:
    return int(path.name.split("-")[1])  # phase-NN-<phase>.pt


def _phase_files(folder: Path) -> list[Path]:
    # Only names the search writes: a stray phase-final.pt (a copy, say) has no number to order by.
    return [path for path in folder.glob("phase-*.pt") if re.fullmatch(r"phase-\d+-.+\.pt", path.name)]


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest ``phase-NN-*.pt`` in ``folder``, by number: from 100 phases on, names no longer sort in order."""
    return max(_phase_files(folder), key=_phase_number, default=None)


IN_PHASE = "in-phase.pt"  # a search's checkpoint inside a phase, beside the phases' own
PHASE_KEYS = (*TRAINER_KEYS, "phase_index", "phase")  # what a search's checkpoints add


def remove_search_checkpoints(folder: Path) -> int:
    """Delete the checkpoints a search wrote in ``folder`` (``phase-NN-*.pt``, ``in-phase.pt``) and the folder
    once empty; other files stay. Returns the bytes freed."""
    freed = 0
    for path in [*_phase_files(folder), folder / IN_PHASE]:
        if path.is_file():
            freed += path.stat().st_size
            path.unlink()
    with contextlib.suppress(OSError):  # not empty: someone's own files, kept
        folder.rmdir()
    return freed


def newest_state(folder: Path) -> dict | None:
    """The newest state in a search's checkpoint folder: the in-phase checkpoint when it is inside the phase after
    the newest phase checkpoint (an older one is stale), else that phase checkpoint; None when there is none."""
    path = latest_checkpoint(folder)
    newest = _phase_number(path) if path else -1
    partial = folder / IN_PHASE
    if partial.exists():
        inside = load_checkpoint(partial, PHASE_KEYS)
        if inside["phase_index"] == newest + 1:
            return inside
    return load_checkpoint(path, PHASE_KEYS) if path else None


def trainer_state(trainer: Trainer) -> dict:
    """The trainer as a checkpoint payload: graph, weights, optimizer, direction, data order and counters."""
    return {
        "graph": g.graph_to_dict(trainer.model.graph),
        "model": trainer.model.state_dict(),
        "optimizer": optimizer_state(trainer.step.optimizer, trainer.model),
        "direction": trainer.step.direction.state_dict(),
        "gradient_space": trainer.step.gradient_space,  # a resumed step resets the history where the run did
        "generator": trainer.generator.get_state(),
        "global_step": trainer.global_step,
        "epoch": trainer.epoch,
        "history": trainer.history,
    }


def restore_trainer(trainer: Trainer, state: dict, device: torch.device) -> None:
    """Put ``trainer`` back where :func:`trainer_state` saw it; the model is rebuilt from the saved graph."""
    model = trainer.model
    model.graph = g.graph_from_dict(state["graph"])
    g.drop_initial_weights(model.graph)
    model.sync(copy_from_trunk=False)
    model.load_state_dict(state["model"])
    model.to(device)
    trainer.step.refresh()
    load_optimizer_state(trainer.step.optimizer, model, state["optimizer"])
    trainer.step.direction.load_state_dict(state["direction"])
    trainer.step.gradient_space = state.get("gradient_space")  # absent before 2026-11-24: None, as then
    trainer.generator.set_state(state["generator"])
    trainer.global_step, trainer.epoch, trainer.history = state["global_step"], state["epoch"], state["history"]


def check_resumed_data(input_shape: tuple[int, ...], tasks: dict, state: dict | None, directory: Path) -> None:
    """Refuse data (another ``data.root`` on resume) whose inputs or tasks (``name → TaskSpec``) differ from those
    the network in ``state`` (a checkpoint) was built for: its heads would be rebuilt for the new data while its
    architecture, metrics and baselines describe the old."""
    if state is None or "graph" not in state:
        return
    graph = g.graph_from_dict(state["graph"])
    before, now = list(graph.nodes[g.INPUT]["shape"]), list(input_shape)
    if before != now:
        raise MamoError(f"the data gives inputs of shape {tuple(now)} but the checkpoints in {directory} were "
                        f"trained on {tuple(before)}; point data.root at the run's own data, or start a new run.")
    saved = graph.graph["tasks"]
    for name, spec in tasks.items():
        if saved.get(name) != spec.to_dict():
            was = f"was {saved[name]}" if name in saved else "was not a task"
            # A plugin's spec may have been edited as well as its data swapped: either one is undone to resume.
            raise MamoError(f"the data's task '{name}' is {spec.to_dict()} but in the checkpoints in {directory} it "
                            f"{was}; point data.root at the run's own data (or undo the edit of the data plugin's "
                            "task spec), or start a new run.")
    if list(saved) != list(tasks):
        raise MamoError(f"the data has the tasks {', '.join(tasks)} but the checkpoints in {directory} were trained "
                        f"on {', '.join(saved)}; point data.root at the run's own data, or start a new run.")


class Throttle:
    """Says when a checkpoint is due: at the first epoch, then once ``seconds`` have passed since the last.
    Saving after every epoch of a run with many tiny epochs (the logic preset: 3,000 of two steps) cost more
    than the training (37.7 s against 6.5 s for its test, measured)."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, None

    def restart(self) -> None:
        """The next epoch is due again, as a first one is."""
        self.last = None

    def due(self) -> bool:
        now = time.monotonic()
        if self.last is not None and now - self.last < self.seconds:
            return False
        self.last = now
        return True


class EpochCheckpoint(Callback):
    """After an epoch, when due, the trainer and ``best``'s best-so-far weights go to one file, replaced each
    time; with ``config`` (a run's resolved config as a dict) that too, so that --resume can refuse a config.yaml
    edited since (a baseline's checkpoint has none: baselines are shared by runs of different configs)."""

    def __init__(self, path: Path, best: KeepBest, every_seconds: float = 0.0, config: dict | None = None):
        self.path, self.best, self.throttle, self.config = path, best, Throttle(every_seconds), config

    def payload(self, trainer: Trainer) -> dict:
        """What the file holds; subclasses add their own entries."""
        recorded = {} if self.config is None else {"config": self.config}
        return {**trainer_state(trainer), "best": self.best.state_dict(), **recorded}

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        if self.throttle.due():
            save_checkpoint(self.path, self.payload(trainer))
