"""The architecture search (MAMO Algorithm 1) and the ``search`` command.

pretrain the HPS network → for z = 1..Z: train a round while counting conflicts, threshold, grow → final
training → test. One :class:`~mamo.trainer.Trainer` (one optimizer, one data-order generator) runs every
phase (:mod:`mamo.search_phases`), so growth only adds parameters and never resets what was learned. After
every phase the whole state is checkpointed, and inside a phase now and then; ``--resume`` continues from the
newest checkpoint and reaches the same architecture and weights as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from mamo import graph as g
from mamo.baselines import cached_baselines
from mamo.checkpoint import check_resumed_data, newest_state, remove_search_checkpoints, restore_trainer
from mamo.config import Config, given_config
from mamo.data import LoadData
from mamo.data_plugins import plugin_edited_note
from mamo.model import count_parameters, run_settings
from mamo.report import (
    build_rows,
    delta,
    growth_notes,
    near_zero_note,
    run_environment,
    time_notes,
    win_rate,
    write_metrics,
    write_report,
)
from mamo.resume import check_resumed_config, read_run_config
from mamo.runs import cli
from mamo.search_phases import ConflictRecorder, SearchRun, run_phases, stl_validation
from mamo.search_plan import (
    budget_note,
    check_resumed_phase,
    check_search_config,
    check_search_tasks,
    label_phases,
    method_name,
    plan_line,
    search_phases,
    tensioner_window_note,
)
from mamo.session import (
    Session,
    build_network,
    keep_resume_settings,
    logging_stops,
    make_trainer,
    open_run,
    open_session,
    save_model,
)
from mamo.trainer import Callback, Metrics, intra_op_threads, mean_epoch_seconds


def run_search(
    config: Config | None,
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
    stl_reference: Metrics | None = None,
    loader: LoadData | None = None,
) -> dict:
    """MAMO Algorithm 1 end to end; writes the run folder and returns what metrics.json holds.

    ``resume=True`` continues the stopped search in ``run_dir`` with the config saved there (``config`` is not
    used then), changed only by ``resume_settings`` (``--set`` texts of :data:`mamo.resume.RESUME_SETTINGS`).

    ``callbacks`` see every step, epoch and round (``on_round_end`` gets a :class:`~mamo.search_phases.RoundRecord`);
    an exception they raise stops the search. ``loggers=False`` leaves out the TensorBoard logger,
    ``pictures=False`` only its round pictures. ``stl_reference`` (STL's validation metrics, a tune study's
    reference) is what the validation Δ of the events and round records is measured against when the search
    trains no baselines of its own. ``loader`` builds ``config.data`` (default :func:`~mamo.data.load_data`; a tune
    worker passes a :class:`~mamo.data.DataMemo`, so its trials build it once).
    """
    given_config(config, resume, "run_search")
    started = time.perf_counter()
    with contextlib.ExitStack() as held:  # the run folder's lock, for as long as the search works in it
        held.enter_context(run_settings())  # float32, gradients on, whatever the caller set
        if resume:
            config, session, directory, state = _open_stopped(run_dir, resume_settings, progress, quiet, cache_root,
                                                              held, loader)
            # The run's time before the stop (up to its newest checkpoint) counts in metrics.json's seconds.
            started -= state.get("seconds", 0.0) if state else 0.0
        else:
            check_search_config(config)
            session, directory = open_run(config, run_dir, "search", progress, quiet, cache_root, check_search_tasks,
                                          held, loader)
            state = None
        search, tasks = config.search, session.data.tasks
        session.log(f"{'resuming' if resume else 'search'} in {directory} on {session.device}: {method_name(config)}"
                    + (f"; {', '.join(resume_settings)}" if resume_settings else ""))
        session.log(plan_line(config, len(tasks)))
        for note in ([plugin_edited_note(config.data.name, directory / "config.yaml", state is None,
                                         config.search.baselines)] if resume else
                     [budget_note(config), tensioner_window_note(config, len(session.data.train))]):
            if note:  # the notes on the settings were said when it started
                session.log(note)
        recorder = ConflictRecorder()
        watchers = list(callbacks or [])
        owned = []  # the loggers this search made, closed by it (a caller's callbacks are theirs)
        try:
            # Ctrl-C is the usual way a search stops early (finished phases are checkpointed).
            with (logging_stops(session, cli("search", "--resume", directory)),
                  intra_op_threads(config.train.threads)):
                baselines = {}
                if state is not None and "baselines" in state:
                    # Kept in the checkpoints: a search continued on another machine (or with another data.root,
                    # which is part of the cache key) needs neither the baseline cache nor hours to retrain it.
                    baselines = state["baselines"]
                elif search.baselines:
                    baselines = cached_baselines(session, ("stl", "hps"), config.train.epochs)
                    if note := near_zero_note(baselines["stl"]["val"], tasks):
                        session.log(note)
                stl_val = stl_validation(baselines) or stl_reference
                if loggers:
                    from mamo.board import TensorBoardLogger

                    owned.append(TensorBoardLogger(directory, config, tasks, stl_val, pictures=pictures,
                                                   start_over=resume and state is None))
                    watchers.insert(0, owned[-1])
                model = build_network(session, initial_weights=state is None)
                trainer = make_trainer(session, model, config.direction, [recorder, *watchers], "search")
                run = SearchRun(session, trainer, recorder, watchers, directory, baselines, stl_val)
                start_index, partial = _restore(run, state) if state is not None else (0, None)
                if state is None and resume:
                    session.log(f"no checkpoint in {directory / 'checkpoints'} yet: the search starts again from "
                                "its pretraining's first epoch" + (" (the baselines come from their cache)"
                                                                    if search.baselines else ""))
                run_phases(run, search_phases(config)[start_index:], started, partial)
                metrics = _finish(run, started)
                for callback in watchers:
                    callback.on_run_end(metrics)
        finally:
            # A pruned trial or a crash must still flush the logger's last pictures and close its files.
            for logger in owned:
                logger.close()
        return metrics


def _open_stopped(
    run_dir: str | Path | None, resume_settings: Sequence[str], progress: bool, quiet: bool, cache_root: Path | None,
    held: contextlib.ExitStack, loader: LoadData | None,
) -> tuple[Config, Session, Path, dict | None]:
    """The stopped search in ``run_dir``: its config, session, folder and newest checkpoint, each checked; the
    folder's lock goes into ``held``."""
    config, directory = read_run_config(run_dir, "search", resume_settings, held)
    state = newest_state(directory / "checkpoints")
    check_resumed_config(config, state, directory)  # before anything loads: an edited config.yaml is refused
    check_resumed_phase(config, state, directory)
    check_search_config(config)
    session = open_session(config, directory, progress, quiet, cache_root, loader)
    check_resumed_data(session.data.input_shape, session.data.tasks, state, directory)
    keep_resume_settings(session, directory, "search", resume_settings, starts_over=state is None)
    return config, session, directory, state


def _restore(run: SearchRun, state: dict) -> tuple[int, dict | None]:
    """Put the checkpoint ``state`` back into ``run``; returns the index of the phase to run next and, when the
    checkpoint was saved inside that phase, the checkpoint to continue it from."""
    trainer = run.trainer
    restore_trainer(trainer, state, run.session.device)
    label_phases(trainer.history, run.session.config)
    run.rounds, run.phase_seconds = state["rounds"], state["phase_seconds"]
    for callback in run.watchers:
        callback.on_resume(trainer)
        callback.on_rounds_restored(run.rounds)
    if "epochs_done" in state:  # an in-phase checkpoint: continue inside its phase
        run.session.log(f"resumed in phase '{state['phase']}' after {state['epochs_done']} of its epochs")
        return state["phase_index"], state
    run.session.log(f"resumed after phase '{state['phase']}' from its checkpoint")
    return state["phase_index"] + 1, None


def _finish(run: SearchRun, started: float) -> dict:
    """Test the grown network, save it, and write the report and metrics.json."""
    session, trainer, directory, baselines = run.session, run.trainer, run.directory, run.baselines
    rounds, phase_seconds = run.rounds, run.phase_seconds
    config, model, tasks = session.config, trainer.model, session.data.tasks
    test, val = trainer.evaluate(session.data.test, "test"), trainer.evaluate(session.data.val)
    name = method_name(config)
    # Every activated position, with 0 where its modules already existed (search.modules=exclusive: 63 of an 8-task
    # search's 70 positions had vanished from the report).
    created = g.module_counts(model.graph)
    positions = {(tuple(pair), int(cell)) for record in rounds for pair, cell in record["activated"]} | set(created)
    counts = {f"{'+'.join(pair)}@cell{cell}": created.get((pair, cell), 0) for pair, cell in sorted(positions)}
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
        "environment": run_environment(session.device),
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
    text = write_report(directory, f"mamo search: {config.name}", rows, tasks, "STL" if baselines else None, notes,
                        grown=True)
    write_metrics(directory, metrics)  # from here on the search is finished: nothing is left to resume
    if not config.search.keep_checkpoints:
        freed = remove_search_checkpoints(directory / "checkpoints")
        session.log(f"removed the phase checkpoints ({freed / 1e6:.1f} MB), as search.keep_checkpoints is false; "
                    "weights.safetensors and architecture.json keep the model")
    session.log.result("\n" + text)
    session.log.result(f"search finished in {metrics['seconds']:.1f} s; run folder {directory}")
    return metrics


def add_arguments_search(parser: argparse.ArgumentParser) -> None:
    from mamo.cli import add_resumable_arguments

    add_resumable_arguments(parser, "search")


def command_search(args: argparse.Namespace) -> int:
    from mamo.cli import run_resumable

    return run_resumable(args, run_search)
