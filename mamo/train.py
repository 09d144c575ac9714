"""The ``train`` command: one network (the shared one with the configured direction, or the STL networks with
``train.mode=stl``) trained, tested and reported in its run folder, checkpointed and resumable; the parts it
shares with the other commands are :mod:`mamo.session`'s, the cached STL/HPS baselines :mod:`mamo.baselines`'."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mamo.baselines import cached_baseline
from mamo.cache import baseline_key
from mamo.checkpoint import check_resumed_data, load_checkpoint, save_checkpoint
from mamo.config import Config, given_config
from mamo.data_plugins import plugin_edited_note
from mamo.directions import direction_label
from mamo.errors import MamoError
from mamo.graph import graph_to_dict
from mamo.model import run_settings
from mamo.report import build_rows, delta, near_zero_note, run_environment, win_rate, write_metrics, write_report
from mamo.resume import check_resumed_config, read_run_config
from mamo.runs import cli, counted
from mamo.session import (
    Session,
    keep_resume_settings,
    logging_stops,
    open_run,
    open_session,
    save_model,
    train_network,
)
from mamo.trainer import Callback, intra_op_threads


def run_train(
    config: Config | None, run_dir: str | Path | None = None, progress: bool = True, quiet: bool = False,
    callbacks: list[Callback] | None = None, loggers: bool = True, resume: bool = False,
    resume_settings: Sequence[str] = (), pictures: bool = True,
) -> dict:
    """``mamo train``: the shared network with the configured direction, or STL with ``train.mode=stl``.

    The shared network is checkpointed after its first epoch and then at most every
    ``train.checkpoint_seconds`` (checkpoints/last.pt, removed once the run has finished); ``resume=True``
    continues the stopped run in ``run_dir`` with its saved config (``config`` is not used then), changed only
    by ``resume_settings`` (``--set`` texts of :data:`mamo.resume.RESUME_SETTINGS`). ``loggers=False`` leaves out
    the TensorBoard logger, ``pictures=False`` only its pictures."""
    given_config(config, resume, "run_train")
    state = None
    with contextlib.ExitStack() as held:  # the run folder's lock, for as long as the run works in it
        held.enter_context(run_settings())  # float32, gradients on, whatever the caller set
        if resume:
            config, directory = read_run_config(run_dir, "train", resume_settings, held)
            _check_resumable(config, directory)
            # Read once, before the data loads: an edited config.yaml is refused before anything else happens.
            last = directory / "checkpoints" / "last.pt"
            state = load_checkpoint(last) if last.exists() else None
            check_resumed_config(config, state, directory)
            session = open_session(config, directory, progress, quiet)
            check_resumed_data(session.data.input_shape, session.data.tasks, state, directory)
            keep_resume_settings(session, directory, "train", resume_settings, starts_over=state is None)
            session.log(f"resuming {directory}" + (f" with {', '.join(resume_settings)}" if resume_settings else ""))
            if note := plugin_edited_note(config.data.name, directory / "config.yaml", starts_over=state is None):
                session.log(note)
            if state is None:
                session.log(f"no checkpoint in {directory / 'checkpoints'} yet: the training starts again from its "
                            "first epoch")
        else:
            session, directory = open_run(config, run_dir, "train", progress, quiet, held=held)
        how_to_continue = TRAIN_MODES[config.train.mode].how_to_continue(directory)
        with logging_stops(session, how_to_continue), intra_op_threads(config.train.threads):
            return _train_and_report(session, directory, callbacks, loggers, pictures, state,
                                     start_over=resume and state is None)


def _check_resumable(config: Config, directory: Path) -> None:
    refusal = TRAIN_MODES[config.train.mode].resume_refusal
    if refusal:
        raise MamoError(refusal.format(directory=directory))


def _train_and_report(session: Session, directory: Path, callbacks: list[Callback] | None, loggers: bool,
                      pictures: bool, state: dict | None = None, start_over: bool = False) -> dict:
    watchers = list(callbacks or [])
    if not loggers:
        return _train_and_write(session, directory, watchers, state)
    from mamo.board import TensorBoardLogger

    stl = session.cache.get(baseline_key(session.config, "stl", session.config.train.epochs))
    # Closed on every way out, a diverged loss or Ctrl-C included, so the events logged so far reach the file.
    with TensorBoardLogger(directory, session.config, session.data.tasks, stl["val"] if stl else None,
                           pictures=pictures, start_over=start_over) as logger:
        return _train_and_write(session, directory, [logger, *watchers], state)


def _train_shared(session: Session, directory: Path, watchers: list[Callback], state: dict | None
                  ) -> tuple[str, dict, dict[str, dict]]:
    """The shared network with the configured direction, checkpointed in the run folder; its row beside the
    cached STL's when there is one."""
    config = session.config
    epochs = config.train.epochs
    method = direction_label(config.direction, config.train.gradients)
    session.log(f"HPS network, direction {method}, {counted(epochs, 'epoch')} on {session.device}")
    trained = train_network(session, epochs, config.direction, description="train", callbacks=watchers,
                            checkpoint=directory / "checkpoints" / "last.pt", state=state, run_config=config.to_dict())
    save_checkpoint(directory / "checkpoints" / "best.pt", {"model": trained.model.state_dict(),
                    "graph": graph_to_dict(trained.model.graph), "epoch": trained.extra["best_epoch"]})
    save_model(directory, trained.model)
    from mamo.drawing import draw_architecture  # matplotlib: imported only where a picture is drawn

    # The run folder's architecture files are a search's (DESIGN §11): the drawing too, with or without TensorBoard.
    draw_architecture(trained.model.graph, directory / "architecture.png", model=trained.model)
    name, result = f"HPS ({method})", trained.result()
    stl = session.cache.get(baseline_key(config, "stl", epochs))
    return name, result, ({"STL": stl} if stl else {}) | {name: result}


def _train_stl(session: Session, directory: Path, watchers: list[Callback], state: dict | None
               ) -> tuple[str, dict, dict[str, dict]]:
    """One network per task, through the baseline cache: what a stopped one trained continues from there."""
    result = cached_baseline(session, "stl", session.config.train.epochs, watchers)
    with contextlib.suppress(OSError):  # its checkpoints are the cache's: the run's own folder stays empty
        (directory / "checkpoints").rmdir()
    return "STL", result, {"STL": result}


@dataclass(frozen=True)
class TrainMode:
    """What ``train.mode`` trains (its row's name, its result, every row of the report) and how it continues."""

    train: Callable[[Session, Path, list[Callback], dict | None], tuple[str, dict, dict[str, dict]]]
    how_to_continue: Callable[[Path], str]  # after a stop, for the run folder given
    resume_refusal: str | None = None  # why --resume refuses such a folder ({directory} is filled in)


TRAIN_MODES: dict[str, TrainMode] = {
    "mtl": TrainMode(_train_shared, lambda directory: cli("train", "--resume", directory)),
    # STL networks continue from the baseline cache beside the run folder, which any run of the same settings
    # there reads: a new run, not --resume.
    "stl": TrainMode(
        _train_stl,
        lambda directory: (f"the same train command with a new --run-dir in {directory.parent} (its baseline "
                           f"cache, {directory.parent / '.baselines'}, keeps the finished networks and the stopped "
                           "one's epochs)"),
        "{directory} trains STL baselines (train.mode=stl), which continue from the baseline cache instead; run "
        "the same command again with a new --run-dir.",
    ),
}


def _train_and_write(session: Session, directory: Path, watchers: list[Callback], state: dict | None) -> dict:
    config, tasks = session.config, session.data.tasks
    started = time.perf_counter()
    name, result, results = TRAIN_MODES[config.train.mode].train(session, directory, watchers, state)
    stl_name = "STL" if "STL" in results else None
    metrics = {"tasks": result["tasks"], "params": result["params"], "val": result["val"],
               "seconds_per_epoch": result["seconds_per_epoch"], "config": dataclasses.asdict(config),
               "environment": run_environment(session.device)}
    if stl_name and name != stl_name:
        if note := near_zero_note(results["STL"]["val"], tasks):
            session.log(note)
        metrics["delta"] = delta(result["tasks"], results["STL"]["tasks"], tasks)
        metrics["win_rate"] = win_rate(result["tasks"], results["STL"]["tasks"], tasks)
        metrics["baselines"] = {"stl": results["STL"]}
    rows = build_rows(results, stl_name, tasks)
    key_parts, same = "budget and seed", ""
    if config.train.threads is not None:  # part of the baseline's key (cache.baseline_key): the STL run sets it too
        key_parts, same = "budget, seed and thread count", f" --set train.threads={config.train.threads}"
    note = "" if stl_name else (f"No cached STL baseline for this data, backbone, {key_parts}: run with "
                                f"--set train.mode=stl{same} once to get Δ and Win.")
    from mamo.plots import save_figure
    from mamo.report_plots import METRICS_PLOT, metric_bars_figure

    plot = save_figure(metric_bars_figure(rows, tasks), directory / METRICS_PLOT)
    note = "\n\n".join(part for part in (note, f"![{plot.stem.replace('_', ' ')}]({plot.name})") if part)
    text = write_report(directory, f"mamo train: {config.name}", rows, tasks, stl_name, note)
    write_metrics(directory, metrics)
    # Only now: best.pt and the weights hold what the run keeps, and metrics.json marks it finished.
    (directory / "checkpoints" / "last.pt").unlink(missing_ok=True)
    for callback in watchers:
        callback.on_run_end(metrics)
    session.log.result("\n" + text)
    # As search ends: where the run is (a train run's last line was the table's footnote).
    session.log.result(f"train finished in {time.perf_counter() - started:.1f} s; run folder {directory}")
    return metrics


def add_arguments_train(parser: argparse.ArgumentParser) -> None:
    from mamo.cli import add_resumable_arguments

    add_resumable_arguments(parser, "train")


def command_train(args: argparse.Namespace) -> int:
    from mamo.cli import run_resumable

    return run_resumable(args, run_train)
