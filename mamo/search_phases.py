"""The phases of a search (MAMO Algorithm 1) and the loop that runs them.

A search's plan (:func:`mamo.search_plan.search_phases`) is pretrain, detection rounds and final; each kind of
phase is run by its function in :data:`PHASE_RUNNERS`. A detection round trains while counting conflicts,
thresholds them and grows the network; what it ended with is a :class:`RoundRecord`, which callbacks see before
the round's checkpoint. After every phase the whole state is checkpointed, and inside a phase now and then
(:class:`PhaseCheckpoint`), so that a resumed search continues where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from mamo import graph as g
from mamo.checkpoint import IN_PHASE, EpochCheckpoint, save_checkpoint, trainer_state
from mamo.config import Config
from mamo.conflicts import ConflictStats, Position, select_positions
from mamo.model import MamoNet, count_parameters
from mamo.report import delta
from mamo.runs import counted
from mamo.search_plan import Phase
from mamo.session import Session
from mamo.step import StepResult
from mamo.trainer import Callback, KeepBest, Metrics, Trainer, add_new_parameters


class ConflictRecorder(Callback):
    """Accumulates :class:`ConflictStats` from the steps' per-cell Gram blocks while a round is open."""

    def __init__(self) -> None:
        self.stats: ConflictStats | None = None

    def open(self, stats: ConflictStats) -> None:
        self.stats = stats

    def close(self) -> ConflictStats:
        stats, self.stats = self.stats, None
        assert stats is not None
        return stats

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        if self.stats is not None:
            self.stats.update(result.node_gramians)


class PhaseCheckpoint(EpochCheckpoint):
    """After a phase's first epoch, then when due (``train.checkpoint_seconds``), what continuing inside the
    current phase needs (``checkpoints/in-phase.pt``), so a stopped search does not lose a whole phase (NYUv2's
    final phase is 60 epochs). A phase's last epoch is left to the phase's own checkpoint, written right after."""

    def __init__(self, path: Path, recorder: ConflictRecorder, best: KeepBest, every_seconds: float = 0.0,
                 config: dict | None = None, baselines: dict | None = None):
        super().__init__(path, best, every_seconds, config)
        self.recorder = recorder
        self.baselines = baselines or {}
        self.phase: dict = {}

    def begin(self, phase: Phase, start_epoch: int, rounds: list[dict], phase_seconds: dict,
              run_started: float) -> None:
        """``phase`` starts (or resumes) at the trainer's epoch ``start_epoch``."""
        self.phase = {"phase_index": phase.index, "phase": phase.name, "start_epoch": start_epoch,
                      "epochs": phase.epochs, "rounds": rounds, "phase_seconds": phase_seconds,
                      "started": time.perf_counter(), "run_started": run_started}
        # One clock for the whole search let a short phase pass unsaved after a long one (a stopped final phase
        # of 5 epochs lost them all, found in an audit).
        self.throttle.restart()

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        if trainer.epoch - self.phase["start_epoch"] < self.phase["epochs"]:
            super().on_epoch_end(trainer, metrics)

    def payload(self, trainer: Trainer) -> dict:
        phase, seconds = self.phase["phase"], self.phase["phase_seconds"]
        elapsed = seconds.get(phase, 0.0) + time.perf_counter() - self.phase["started"]
        return {
            **super().payload(trainer), "phase_index": self.phase["phase_index"], "phase": phase,
            "epochs_done": trainer.epoch - self.phase["start_epoch"], "rounds": self.phase["rounds"],
            "phase_seconds": {**seconds, phase: elapsed}, "stats": self.recorder.stats,
            "seconds": time.perf_counter() - self.phase["run_started"], "baselines": self.baselines,
        }


@dataclass
class RoundRecord:
    """What detection round ``round`` ended with, as callbacks' ``on_round_end`` sees it. ``graph`` and ``model``
    are the live ones (the next round grows them): copy what must outlive the call."""

    round: int
    stats: ConflictStats
    activated: list[Position]  # the positions above the threshold, covered or not
    new_modules: list[str]  # graph nodes this round grew
    gmk_modules: int  # branch modules in the network after the round
    params: int
    val: Metrics
    val_delta: float | None  # mean relative Δ against the STL baseline on validation, when cached
    graph: nx.DiGraph
    model: MamoNet
    run_dir: Path

    def to_dict(self) -> dict:
        """The part that goes into metrics.json's ``rounds`` and the checkpoints."""
        return {
            "round": self.round,
            "activated": [[list(pair), cell] for pair, cell in self.activated],
            "modules": len(self.new_modules),
            "new_modules": self.new_modules,
            "gmk_modules": self.gmk_modules,
            "params": self.params,
            "val_delta": self.val_delta,
            "val": self.val,
            "conflicts": self.stats.to_dict(),
        }


def grow_network(trainer: Trainer, stats: ConflictStats, config: Config, z: int) -> tuple[list[Position], list[str]]:
    """Grow the trainer's network where ``stats`` cross the threshold; returns the activated positions and the
    new nodes. The optimizer gets the new parameters; the tensioner starts a new window if anything grew."""
    model = trainer.model
    candidates = g.candidate_positions(model.graph, config.search.modules)
    activated = select_positions(stats, candidates, config.search.threshold)
    new_nodes: list[str] = []
    # Shallowest first: a pair activated at several cells gets one branch from its first one (the later
    # positions are then covered and create nothing, DESIGN §3).
    for position in sorted(activated, key=lambda p: p[1]):
        if not g.is_grown(model.graph, position, config.search.modules):
            new_nodes += g.grow(model.graph, position, config.search.modules, round_index=z)
    if activated:
        model.sync(copy_from_trunk=True)
        add_new_parameters(trainer.step.optimizer, model)
        trainer.step.refresh()
        # The tensioner's norm history describes the old parameter set; the grown one starts a new window.
        trainer.step.direction.reset()
    return activated, new_nodes


def save_phase_checkpoint(directory: Path, phase: Phase, trainer: Trainer, rounds: list[dict], extra: dict) -> None:
    save_checkpoint(directory / "checkpoints" / f"phase-{phase.index:02d}-{phase.name}.pt",
                    {"phase_index": phase.index, "phase": phase.name, **trainer_state(trainer), "rounds": rounds,
                     **extra})


def stl_validation(baselines: dict) -> Metrics | None:
    """The STL baseline's validation metrics, what Δ is measured against (None: the search has no baselines)."""
    return baselines["stl"]["val"] if baselines else None


@dataclass
class SearchRun:
    """What the phases of one search share."""

    session: Session
    trainer: Trainer
    recorder: ConflictRecorder
    watchers: list[Callback]  # the callbacks that see phases and rounds
    directory: Path
    baselines: dict
    stl_val: Metrics | None  # what the rounds' validation Δ is measured against (None: no Δ)
    rounds: list[dict] = field(default_factory=list)  # the rounds' to_dict() records so far
    phase_seconds: dict[str, float] = field(default_factory=dict)
    best: KeepBest = field(default_factory=KeepBest)
    saver: PhaseCheckpoint | None = None  # set while the phases run


def _train(run: SearchRun, phase: Phase, done: int, partial: dict | None) -> RoundRecord | None:
    run.trainer.fit(phase.epochs - done, done)
    return None


def _train_keeping_best(run: SearchRun, phase: Phase, done: int, partial: dict | None) -> RoundRecord | None:
    trainer = run.trainer
    if partial:
        run.best.load_state_dict(partial["best"])
    assert run.saver is not None, "run_phases sets the in-phase saver before any phase runs"
    trainer.callbacks.insert(trainer.callbacks.index(run.saver), run.best)  # the saver sees this epoch's best
    try:
        trainer.fit(phase.epochs - done, done)
    finally:
        trainer.callbacks.remove(run.best)
    run.best.restore(trainer.model)
    return None


def _detection_round(run: SearchRun, phase: Phase, done: int, partial: dict | None) -> RoundRecord:
    trainer, config, tasks = run.trainer, run.session.config, run.session.data.tasks
    growable = bool(g.candidate_positions(trainer.model.graph, config.search.modules))
    run.recorder.open(partial["stats"] if partial else ConflictStats.for_graph(trainer.model.graph))
    with trainer.step.collecting_conflicts():
        trainer.fit(phase.epochs - done, done)
    stats = run.recorder.close()
    for task in stats.silent_tasks():
        run.session.log(f"note: {task}'s gradient was zero at every shared cell in all {stats.steps} mini-batches of "
                        f"round {phase.round} (a constant target, or a head that passes no gradient), so its "
                        "conflicts could not be measured, and a min-norm direction (mgda) is zero then: the shared "
                        "cells did not learn from the other tasks either.")
    val = trainer.history[-1]["val"] if trainer.history else trainer.evaluate(run.session.data.val)
    activated, new_nodes = grow_network(trainer, stats, config, phase.round)
    model = trainer.model
    record = RoundRecord(phase.round, stats, activated, new_nodes, len(g.branch_nodes(model.graph)),
                         count_parameters(model), val, delta(val, run.stl_val, tasks) if run.stl_val else None,
                         model.graph, model, run.directory)
    # Every threshold activates only positions with conflicts, so a round that can grow but did not saw none.
    where = ", ".join(f"{'+'.join(pair)}@cell{cell}" for pair, cell in activated) or (
        "nothing (no position that can still grow conflicted in any mini-batch)" if growable
        else "nothing (every position already had its module: no round can grow more)")
    run.session.log(f"round {phase.round}: {counted(stats.steps, 'mini-batch', 'mini-batches')}, activated {where}; "
                    f"{counted(len(new_nodes), 'new module')}, {record.gmk_modules} in all")
    return record


PhaseRunner = Callable[[SearchRun, Phase, int, dict | None], RoundRecord | None]

# How each kind of phase trains; ``done`` epochs of it were trained before a resume, ``partial`` is the in-phase
# checkpoint it resumes from (None when it starts afresh).
PHASE_RUNNERS: dict[str, PhaseRunner] = {
    "pretrain": _train,
    "round": _detection_round,
    "final": _train_keeping_best,  # the grown network's best validation epoch is the one tested
}


def run_phases(run: SearchRun, plan: list[Phase], started: float, partial: dict | None = None) -> None:
    """Run the phases of ``plan`` (from an in-phase checkpoint ``partial`` when its phase is the first), each
    checkpointed when it ends."""
    config, trainer = run.session.config, run.trainer
    run.saver = saver = PhaseCheckpoint(run.directory / "checkpoints" / IN_PHASE, run.recorder, run.best,
                                        config.train.checkpoint_seconds, config.to_dict(), run.baselines)
    trainer.callbacks.append(saver)
    for phase in plan:
        resumed = partial if partial and partial["phase_index"] == phase.index else None
        done = resumed["epochs_done"] if resumed else 0
        saver.begin(phase, trainer.epoch - done, run.rounds, run.phase_seconds, started)
        phase_start = time.perf_counter()
        for callback in run.watchers:
            callback.on_phase_start(phase.name, trainer.model)
        trainer.description = phase.name
        record = PHASE_RUNNERS[phase.kind](run, phase, done, resumed)
        if record is not None:
            run.rounds.append(record.to_dict())
            # Before the round's checkpoint: a resume starts after it and never ends this round again, so what a
            # callback records for it must be kept by then (a kill in between redoes the round, logged twice).
            for callback in run.watchers:
                callback.on_round_end(record)
        # The round's time includes its pictures: counted after the phase, they went to the report's "other:
        # data, baselines, test" row (45% of a 10-task search was matplotlib there).
        run.phase_seconds[phase.name] = run.phase_seconds.get(phase.name, 0.0) + time.perf_counter() - phase_start
        save_phase_checkpoint(run.directory, phase, trainer, run.rounds,
                              {"phase_seconds": run.phase_seconds, "seconds": time.perf_counter() - started,
                               "config": config.to_dict(), "baselines": run.baselines})  # what --resume checks
        (run.directory / "checkpoints" / IN_PHASE).unlink(missing_ok=True)  # the phase's checkpoint supersedes it
    trainer.callbacks.remove(saver)
    run.saver = None
