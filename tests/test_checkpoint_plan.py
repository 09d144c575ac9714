"""Which checkpoint a stopped search resumes from, and what a resume inside the final phase must remember."""

from __future__ import annotations

from mamo.checkpoint import IN_PHASE, newest_state, save_checkpoint


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
