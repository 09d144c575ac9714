"""The architecture search (MAMO Algorithm 1) and the ``search`` command.

pretrain the HPS network → for z = 1..Z: train a round while counting conflicts, threshold, grow → final
training → test. One :class:`~mamo.trainer.Trainer` (one optimizer, one data-order generator) runs every
phase, so growth only adds parameters and never resets what was learned. After every phase the whole state
is checkpointed, and inside a phase now and then (:class:`PhaseCheckpoint`); ``--resume`` continues from the
newest checkpoint and reaches the same architecture and weights as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from mamo import graph as g
from mamo.baselines import cached_baselines
from mamo.checkpoint import (
    IN_PHASE,
    EpochCheckpoint,
    check_resumed_data,
    newest_state,
    restore_trainer,
    save_checkpoint,
    trainer_state,
)
from mamo.config import Config
from mamo.conflicts import ConflictStats, select_positions
from mamo.data_plugins import plugin_edited_note
from mamo.errors import MamoError
from mamo.model import count_parameters
from mamo.report import build_rows, delta, growth_notes, time_notes, win_rate, write_metrics, write_report
from mamo.runs import check_resumed_config, counted, read_run_config
from mamo.search_plan import (
    budget_note,
    check_resumed_phase,
    check_search_config,
    check_search_tasks,
    label_phases,
    method_name,
    phase_epochs,
    phase_names,
    plan_line,
    tensioner_window_note,
)
from mamo.step import StepResult
from mamo.train import (
    Session,
    build_network,
    logging_stops,
    make_trainer,
    open_run,
    open_session,
    save_model,
)
from mamo.trainer import Callback, KeepBest, Trainer, add_new_parameters, intra_op_threads, mean_epoch_seconds


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

    def begin(self, index: int, phase: str, start_epoch: int, epochs: int, rounds: list[dict], phase_seconds: dict,
              run_started: float) -> None:
        """Phase ``index`` starts (or resumes) at the trainer's epoch ``start_epoch``; it has ``epochs`` in all."""
        self.phase = {"phase_index": index, "phase": phase, "start_epoch": start_epoch, "epochs": epochs,
                      "rounds": rounds, "phase_seconds": phase_seconds, "started": time.perf_counter(),
                      "run_started": run_started}
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


def _round_record(
    z: int, stats: ConflictStats, activated: list, new_modules: list[str], val: dict, val_delta: float | None,
    trainer: Trainer, directory: Path,
) -> dict:
    model = trainer.model
    return {
        "round": z,
        "stats": stats,
        "activated": [[list(pair), cell] for pair, cell in activated],
        "new_modules": new_modules,
        "graph": model.graph,
        "model": model,
        "val": val,
        "val_delta": val_delta,
        "gmk_modules": len(g.branch_nodes(model.graph)),
        "params": count_parameters(model),
        "run_dir": directory,
    }


def _serialisable(record: dict) -> dict:
    """The part of a round record that goes into metrics.json and checkpoints."""
    return {
        "round": record["round"],
        "activated": record["activated"],
        "modules": len(record["new_modules"]),
        "new_modules": record["new_modules"],
        "gmk_modules": record["gmk_modules"],
        "params": record["params"],
        "val_delta": record["val_delta"],
        "val": record["val"],
        "conflicts": record["stats"].to_dict(),
    }


def _grow(trainer: Trainer, stats: ConflictStats, config: Config, z: int) -> tuple[list, list[str]]:
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


def _checkpoint(directory: Path, index: int, phase: str, trainer: Trainer, rounds: list[dict], extra: dict) -> None:
    save_checkpoint(directory / "checkpoints" / f"phase-{index:02d}-{phase}.pt",
                    {"phase_index": index, "phase": phase, **trainer_state(trainer), "rounds": rounds, **extra})


def run_search(
    config: Config,
    run_dir: str | Path | None = None,
    *,
    progress: bool = True,
    quiet: bool = False,
    resume: bool = False,
    callbacks: list[Callback] | None = None,
    cache_root: Path | None = None,
    loggers: bool = True,
    pictures: bool = True,
    resume_settings: Sequence[str] = (),
) -> dict:
    """MAMO Algorithm 1 end to end; writes the run folder and returns what metrics.json holds.

    ``resume=True`` continues the stopped search in ``run_dir`` with the config saved there (``config`` is not
    used then), changed only by ``resume_settings`` (``--set`` texts of :data:`mamo.runs.RESUME_SETTINGS`).

    ``callbacks`` see every step, epoch and round (``on_round_end`` gets: round, stats, activated, new_modules,
    graph, model, val, val_delta, gmk_modules, params, run_dir); an exception they raise stops the search
    after that round's checkpoint. ``loggers=False`` leaves out the TensorBoard logger, ``pictures=False`` only its
    round pictures.
    """
    started = time.perf_counter()
    if resume:
        config, directory = read_run_config(run_dir, "search", resume_settings)
        if (directory / "metrics.json").exists():
            raise MamoError(f"the search in {directory} has finished (metrics.json is there); nothing to resume.")
        state = newest_state(directory / "checkpoints")
        check_resumed_config(config, state, directory)  # before anything loads: an edited config.yaml is refused
        check_resumed_phase(config, state, directory)
        # The run's time before the stop (up to its newest checkpoint) counts in metrics.json's seconds.
        started -= state.get("seconds", 0.0) if state else 0.0
        check_search_config(config)
        session = open_session(config, directory, progress, quiet, cache_root)
        check_resumed_data(session.data.input_shape, session.data.tasks, state, directory)
    else:
        check_search_config(config)
        session, directory = open_run(config, run_dir, "search", progress, quiet, cache_root, check_search_tasks)
        state = None
    search, tasks = config.search, session.data.tasks
    session.log(f"{'resuming' if resume else 'search'} in {directory} on {session.device}: {method_name(config)}"
                + (f"; {', '.join(resume_settings)}" if resume_settings else ""))
    session.log(plan_line(config, len(tasks)))
    for note in ([plugin_edited_note(config.data.name, directory / "config.yaml")] if resume else
                 [budget_note(config), tensioner_window_note(config, len(session.data.train))]):
        if note:  # the notes on the settings were said when it started
            session.log(note)
    recorder = ConflictRecorder()
    watchers = list(callbacks or [])
    try:
        # Ctrl-C is the usual way a search stops early (finished phases are checkpointed).
        with (logging_stops(session, f"python cli.py search --resume {directory}"),
              intra_op_threads(config.train.threads)):
            baselines = {}
            if state is not None and "baselines" in state:
                # Kept in the checkpoints: a search continued on another machine (or with another data.root,
                # which is part of the cache key) needs neither the baseline cache nor hours to retrain it.
                baselines = state["baselines"]
            elif search.baselines:
                baselines = cached_baselines(session, ("stl", "hps"), config.train.epochs)
            stl_val = baselines["stl"]["val"] if baselines else None
            if loggers:
                from mamo.board import TensorBoardLogger

                watchers.insert(0, TensorBoardLogger(directory, config, tasks, stl_val, pictures=pictures,
                                                     start_over=resume and state is None))
            model = build_network(session, initial_weights=state is None)
            trainer = make_trainer(session, model, config.direction, [recorder, *watchers], "search")
            rounds: list[dict] = []
            start_index, phase_seconds = 0, {}
            if state is not None:
                restore_trainer(trainer, state, session.device)
                label_phases(trainer.history, config)
                rounds, phase_seconds, start_index = state["rounds"], state["phase_seconds"], state["phase_index"] + 1
                for callback in watchers:
                    callback.on_resume(trainer)
                    callback.on_rounds_restored(rounds)
                if "epochs_done" in state:  # an in-phase checkpoint: continue inside its phase
                    start_index -= 1
                    session.log(f"resumed in phase '{state['phase']}' after {state['epochs_done']} of its epochs")
                else:
                    session.log(f"resumed after phase '{state['phase']}' from its checkpoint")
            elif resume:
                session.log(f"no checkpoint in {directory / 'checkpoints'} yet: the search starts again from "
                            "the beginning")
            metrics = _run_phases(session, trainer, recorder, watchers, directory, baselines, rounds, phase_seconds,
                                  start_index, started, state if state and "epochs_done" in state else None)
    finally:
        # A pruned trial or a crash must still flush the logger's last pictures and close its files.
        for callback in watchers:
            close = getattr(callback, "close", None)
            if close is not None:
                close()
    return metrics


def _run_phases(
    session: Session, trainer: Trainer, recorder: ConflictRecorder, watchers: list[Callback], directory: Path,
    baselines: dict, rounds: list[dict], phase_seconds: dict, start_index: int, started: float,
    partial: dict | None = None,
) -> dict:
    """Pretrain, the detection rounds and the final phase from ``start_index`` on (inside it from ``partial``,
    an in-phase checkpoint), then test and report."""
    config, model, search, tasks = session.config, trainer.model, session.config.search, session.data.tasks
    stl_val = baselines["stl"]["val"] if baselines else None
    best = KeepBest()
    saver = PhaseCheckpoint(directory / "checkpoints" / IN_PHASE, recorder, best, config.train.checkpoint_seconds,
                            config.to_dict(), baselines)
    trainer.callbacks.append(saver)
    for index, phase in enumerate(phase_names(search.rounds)):
        if index < start_index:
            continue
        done = partial["epochs_done"] if partial and partial["phase_index"] == index else 0
        epochs = phase_epochs(config, phase)
        saver.begin(index, phase, trainer.epoch - done, epochs, rounds, phase_seconds, started)
        phase_start = time.perf_counter()
        for callback in watchers:
            callback.on_phase_start(phase, model)
        record = None
        trainer.description = phase
        if phase == "pretrain":
            trainer.fit(epochs - done, done)
        elif phase == "final":
            if done:
                best.load_state_dict(partial["best"])
            trainer.callbacks.insert(trainer.callbacks.index(saver), best)  # the saver sees this epoch's best
            trainer.fit(epochs - done, done)
            trainer.callbacks.remove(best)
            best.restore(model)
        else:
            z = int(phase.removeprefix("round"))
            step = trainer.step
            # Conflict statistics need exact per-cell gradients even when the direction itself would not.
            saved_mode = (step.collect_gramians, step.gradients)
            step.collect_gramians, step.gradients = True, "exact"
            recorder.open(partial["stats"] if done else ConflictStats.for_graph(model.graph))
            trainer.fit(epochs - done, done)
            stats = recorder.close()
            step.collect_gramians, step.gradients = saved_mode
            val = trainer.history[-1]["val"] if trainer.history else trainer.evaluate(session.data.val)
            val_delta = delta(val, stl_val, tasks) if stl_val else None
            activated, new_nodes = _grow(trainer, stats, config, z)
            record = _round_record(z, stats, activated, new_nodes, val, val_delta, trainer, directory)
            rounds.append(_serialisable(record))
            where = ", ".join(f"{a}+{b}@cell{c}" for (a, b), c in activated) or "nothing"
            session.log(f"round {z}: {stats.steps} mini-batches, activated {where}; "
                        f"{counted(len(new_nodes), 'new module')}, {record['gmk_modules']} in all")
        phase_seconds[phase] = phase_seconds.get(phase, 0.0) + time.perf_counter() - phase_start
        if record is not None:
            # Before the round's checkpoint: a resume starts after it and never ends this round again, so what a
            # callback records for it must be kept by then (a kill in between redoes the round, logged twice).
            for callback in watchers:
                callback.on_round_end(record)
        _checkpoint(directory, index, phase, trainer, rounds,
                    {"phase_seconds": phase_seconds, "seconds": time.perf_counter() - started,
                     "config": config.to_dict(), "baselines": baselines})  # what --resume checks config.yaml against
        (directory / "checkpoints" / IN_PHASE).unlink(missing_ok=True)  # the phase's own checkpoint supersedes it
    trainer.callbacks.remove(saver)
    metrics = _finish(session, trainer, directory, baselines, rounds, phase_seconds, started)
    for callback in watchers:
        callback.on_run_end(metrics)
    return metrics


def _finish(
    session: Session, trainer: Trainer, directory: Path, baselines: dict, rounds: list[dict],
    phase_seconds: dict, started: float,
) -> dict:
    config, model, tasks = session.config, trainer.model, session.data.tasks
    test, val = trainer.evaluate(session.data.test, "test"), trainer.evaluate(session.data.val)
    name = method_name(config)
    counts = {f"{'+'.join(pair)}@cell{cell}": n for (pair, cell), n in sorted(g.module_counts(model.graph).items())}
    # The grown network's cost, as comparable to the baselines' single networks: not the mean over phases of
    # other sizes (the rounds also collect per-cell Gramians), which understated it.
    per_epoch = mean_epoch_seconds(trainer.history, "final") or trainer.seconds_per_epoch
    result = {"tasks": test, "val": val, "params": count_parameters(model), "seconds_per_epoch": per_epoch}
    metrics: dict = {
        **result,
        "method": name,
        "gmk_modules": len(g.branch_nodes(model.graph)),
        "modules_per_position": counts,
        "rounds": rounds,
        "phase_seconds": phase_seconds,
        "seconds": time.perf_counter() - started,
        "config": dataclasses.asdict(config),
    }
    results = {}
    if baselines:
        stl, hps = baselines["stl"], baselines["hps"]
        results = {"STL": stl, "HPS (equal)": hps}
        metrics |= {
            "delta": delta(test, stl["tasks"], tasks),
            "win_rate": win_rate(test, stl["tasks"], tasks),
            "val_delta": delta(val, stl["val"], tasks),
            "baselines": {"stl": stl, "hps": hps},
        }
    results[name] = result
    save_model(directory, model)
    from mamo.drawing import draw_architecture
    from mamo.report_plots import report_plots

    draw_architecture(model.graph, directory / "architecture.png", model=model)
    rows = build_rows(results, "STL" if baselines else None, tasks)
    grown = g.MODULE_NAMES[config.search.modules]
    figures = report_plots(directory, rows, rounds, tasks, grown)
    notes = growth_notes(rounds, counts, config.data.name, grown) + "".join(
        f"\n\n![{path.stem.replace('_', ' ')}]({path.name})" for path in figures)
    notes += "\n\n" + time_notes(trainer.history, phase_seconds, metrics["seconds"])
    text = write_report(directory, f"mamo search: {config.name}", rows, tasks, "STL" if baselines else None, notes)
    write_metrics(directory, metrics)
    session.log.result("\n" + text)
    session.log.result(f"search finished in {metrics['seconds']:.1f} s; run folder {directory}")
    return metrics


def add_arguments_search(parser: argparse.ArgumentParser) -> None:
    from mamo.cli import add_resumable_arguments

    add_resumable_arguments(parser, "search")


def command_search(args: argparse.Namespace) -> int:
    from mamo.cli import run_resumable

    return run_resumable(args, run_search)
