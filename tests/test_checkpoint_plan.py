"""Which checkpoint a stopped search resumes from, and what a resume inside the final phase must remember."""

from __future__ import annotations

import itertools

import pytest
import torch

from mamo.checkpoint import IN_PHASE, newest_state, save_checkpoint
from mamo.config import load_config
from mamo.search import run_search
from mamo.trainer import Callback

# As tests/test_search.py's tiny runs: CPU only, since the resumed run is compared byte for byte.
TINY = [
    "data.train_size=256", "data.val_size=64", "data.test_size=64", "train.batch_size=64", "train.epochs=2",
    "train.device=cpu",
]


class CrashInPhase(Callback):
    """Stops the search inside ``phase``, after its second epoch (the in-phase checkpoint holds the first)."""

    def __init__(self, phase: str):
        self.phase, self.epochs = phase, 0

    def on_epoch_end(self, trainer, metrics):
        self.epochs += trainer.description == self.phase
        if self.epochs == 2:
            raise KeyboardInterrupt


def test_a_search_resumed_inside_the_final_phase_keeps_the_best_epoch_from_before_the_stop(tmp_path, monkeypatch):
    # Every validation score is worse than the one before, so the final phase's first epoch is its best. That
    # epoch ran before the stop: the resumed run must restore it from the in-phase checkpoint, not pick the best
    # of the epochs it ran itself (the unpatched score usually favours the last epoch either way, which hides
    # a forgotten best).
    scores = itertools.count()
    monkeypatch.setattr("mamo.trainer.selection_score", lambda metrics, reference: float(next(scores)))
    config = load_config("quick", [*TINY, "search.threshold=topk:1", "search.rounds=1", "search.pretrain_epochs=1",
                                   "search.round_epochs=1", "search.final_epochs=3", "search.baselines=false",
                                   "train.checkpoint_seconds=0"])
    whole = run_search(config, tmp_path / "whole", progress=False, quiet=True, loggers=False)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_search(config, cut, progress=False, quiet=True, loggers=False, callbacks=[CrashInPhase("final")])
    inside = torch.load(cut / "checkpoints" / IN_PHASE, weights_only=False)
    assert inside["phase"] == "final" and inside["epochs_done"] == 1
    assert inside["best"]["best_epoch"] == inside["epoch"]  # the best so far is the epoch before the stop
    resumed = run_search(config, cut, progress=False, quiet=True, loggers=False, resume=True)
    assert resumed["tasks"] == whole["tasks"] and resumed["val"] == whole["val"]
    assert (cut / "weights.safetensors").read_bytes() == (tmp_path / "whole" / "weights.safetensors").read_bytes()


def _save(folder, name: str, phase_index: int, **extra) -> None:
    save_checkpoint(folder / name, {"phase_index": phase_index, "which": name, **extra})


def test_newest_state_prefers_the_in_phase_checkpoint_only_inside_the_phase_after_the_newest(tmp_path):
    assert newest_state(tmp_path) is None
    _save(tmp_path, IN_PHASE, 0, epochs_done=1)  # stopped inside pretraining, before any phase checkpoint
    assert newest_state(tmp_path)["which"] == IN_PHASE
    _save(tmp_path, "phase-00-pretrain.pt", 0)
    _save(tmp_path, "phase-01-round1.pt", 1)
    # A stale in-phase checkpoint (of round 1, which its own phase checkpoint has since superseded, e.g. when
    # the stop came between writing that and deleting in-phase.pt) must not be resumed.
    _save(tmp_path, IN_PHASE, 1, epochs_done=2)
    assert newest_state(tmp_path)["which"] == "phase-01-round1.pt"
    _save(tmp_path, IN_PHASE, 0, epochs_done=1)  # older still
    assert newest_state(tmp_path)["which"] == "phase-01-round1.pt"
    _save(tmp_path, IN_PHASE, 2, epochs_done=1)  # inside the phase after round 1: newer than its checkpoint
    assert newest_state(tmp_path)["which"] == IN_PHASE
