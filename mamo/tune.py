"""The ``tune`` command: an Optuna study whose trials are architecture searches (DESIGN §10).

A trial samples T, α and the number of detection rounds Z (and whatever else the preset's ``tune`` section
opens), runs :func:`mamo.search.run_search` in the study folder's ``trial-NNNN`` (:mod:`mamo.tune_objective`)
and returns the validation Δ against the study's STL reference, or with ``--multi-objective`` each task's main
validation metric. Every round's validation Δ goes to the pruner. The study lives in an Optuna storage: SQLite
inside the study folder, or a database URL that processes on many machines share. The process that starts the
command creates the study and trains the STL reference before any worker asks for a trial, so workers never
race to create the schema and STL trains once per study.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import pickle
import shutil
import sys
import time
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import optuna

from mamo.config import Config, config_from_dict, load_config
from mamo.data import DataMemo, MultiTaskData, load_data
from mamo.errors import MamoError, StopExplained
from mamo.model import run_settings
from mamo.runs import RUNS_ROOT, available_cores, claim_new_folder, cli, counted, refuse_file_above, utf8_path
from mamo.trainer import intra_op_threads
from mamo.tune_objective import SearchObjective
from mamo.tune_space import check_space, check_space_ends, inert_keys_note
from mamo.tune_storage import StorageBusy, open_storage, shown_url
from mamo.tune_study import (
    check_folder,
    check_objective,
    claim_folder,
    open_study,
    owed_trials,
    retry_interrupted,
    stored_study,
    study_config,
)
from mamo.tune_summary import summarize
from mamo.tune_workers import Plan, Tickets, TrialLine, optimize, quiet_optuna, run_workers, trial_stops

DEFAULT_STUDY = "mamo"
DEFAULT_PRESET = "multimnist"
LOCAL_STORAGE_FIX = "make the study folder writable, or pass another --run-dir"  # its study.db, not a --storage


def _shared_study_folder(name: str) -> Path:
    """The default study folder of a study in a shared --storage: one per study name, so every command joins it."""
    return RUNS_ROOT / f"tune-{name}"


def _study_dir(run_dir: str | Path | None, storage: str | None, name: str, config: Config) -> tuple[Path, bool]:
    """The study folder, and whether this command created it."""
    if run_dir:
        path = utf8_path(run_dir, "--run-dir")  # the trials' run folders lie in it
    elif storage:
        path = _shared_study_folder(name)
    else:  # a new local study: a folder of its own, even beside a tune started in the same second
        return claim_new_folder(RUNS_ROOT / f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{config.name}"), True
    if path.exists() and not path.is_dir():
        raise MamoError(f"--run-dir {path} is a file, not a study folder; pass a new --run-dir.")
    refuse_file_above(path, "--run-dir", "pick another --run-dir")
    # study.db without study.yaml: another command is setting the study up this moment (it writes study.yaml next).
    marks = ("study.yaml", "study.db")
    if path.is_dir() and any(path.iterdir()) and not any((path / name).is_file() for name in marks):
        raise MamoError(f"{path} is not empty and holds no study (study.yaml); pass a new --run-dir, or a study "
                        "folder to continue its study.")
    try:  # exclusive: of two commands started together on one folder, only one created it (and may remove it)
        path.mkdir(parents=True)
    except FileExistsError:
        if path.is_symlink() and not path.exists():
            raise  # a link to nothing: the CLI names it (it failed later as a study.db that cannot be opened)
        return path, False
    return path, True


def _reference(config: Config, directory: Path, search: bool, multi: bool, progress: bool
               ) -> tuple[dict, dict | None, MultiTaskData | None]:
    """The tasks, the STL validation metrics the objective compares against (trained once, cached) and the data
    they were trained on."""
    if not search:
        return (load_data(config.data, progress).tasks if multi else {}), None, None
    from mamo.baselines import cached_baselines
    from mamo.session import open_session

    session = open_session(config, None, progress, quiet=False, cache_root=directory / ".baselines")
    if config.tune.T:  # the longest T the trials may draw, with the most rounds they may run
        from mamo.search_plan import tensioner_window_note

        rounds = max(config.tune.rounds or [config.search.rounds])
        widest = dataclasses.replace(config, search=dataclasses.replace(config.search, rounds=rounds))
        note = tensioner_window_note(widest, len(session.data.train), config.tune.T[1], "tune.T's upper end")
        if note:
            session.log(note)
    if config.search.final_epochs is not None and config.tune.rounds and config.tune.rounds[0] != config.tune.rounds[1]:
        session.log(f"note: search.final_epochs = {config.search.final_epochs} is fixed, so a trial with more rounds "
                    f"trains longer than one with fewer, and than the STL reference (train.epochs = "
                    f"{config.train.epochs}); leave search.final_epochs unset (null) to keep every trial at that "
                    "budget.")
    # STL always: the objective or, on a Pareto front, best.yaml's choice (the highest val Δ) compares with it.
    kinds = ["stl", "hps"] if config.search.baselines else ["stl"]
    results = cached_baselines(session, kinds, config.train.epochs)
    if note := near_zero_reference_note(results["stl"]["val"], session.data.tasks, multi):
        session.log(note)
    return session.data.tasks, results["stl"]["val"], session.data


def near_zero_reference_note(stl_val: dict, tasks: dict, multi: bool = False) -> str | None:
    """A note when the reference scores a metric next to 0 (logic's gates, the concave problem: an MSE of 1e-13),
    where Eq 15's division makes that one metric's relative change (−4e7 % in an audit's study) decide the Δ
    objective, and best.yaml is chosen by round-off. With ``multi`` the objectives are the metrics themselves,
    and the Δ only picks best.yaml from the Pareto front (the note told such a study to use --multi-objective)."""
    from mamo.report import near_zero_metrics

    if not (shown := near_zero_metrics(stl_val, tasks)):
        return None
    start = (f"note: the STL reference scores {shown} on the validation split, so a trial's error there is a "
             "relative change of orders of magnitude that alone decides ")
    if multi:
        return (start + "its validation Δ (Eq 15 divides by STL), by which best.yaml is picked from the Pareto "
                "front; choose from the front in summary.md by the metrics themselves.")
    return (start + "the Δ objective (Eq 15 divides by STL); rank such tasks with --multi-objective, or tune a "
            "setup in which STL leaves some error.")


@dataclasses.dataclass
class _OpenStudy:
    """What setting a study up gives its trials."""

    study: optuna.Study
    directory: Path  # the study folder
    url: str  # its storage
    config: Config  # the study's resolved config (a joined study's own)
    tasks: dict  # task name → TaskSpec
    trials: int
    workers: int
    threads: int | None  # each worker's share of the cores, unless train.threads says
    data: DataMemo  # the data the reference trained on, for trials run in this process
    store: optuna.storages.RDBStorage  # the study's storage, whose connections run_tune closes at its end


def _close(store: optuna.storages.RDBStorage | None) -> None:
    """Close the storage's pooled connections now rather than when the garbage collector finds it (a notebook's
    run_tune held 4 descriptors on study.db until then, and as long as it kept a failed call's traceback)."""
    if store is not None:
        store.engine.dispose()


def _open_study(config: Config, overrides: list[str] | tuple[str, ...], study_dir: str | Path | None,
                storage: str | None, name: str, trials: int | None, workers: int, multi_objective: bool,
                search: bool, progress: bool) -> _OpenStudy:
    """Create or join the study and train its STL reference (``search``: the trials are searches, not a
    caller's objective); bad input leaves no half-made study folder."""
    store = open_storage(storage) if storage else None  # a bad URL fails before anything is written
    directory, created = _study_dir(study_dir, storage, name, config)
    url = storage or f"sqlite:///{(directory / 'study.db').resolve()}"
    try:
        if store is None and (directory / "study.db").is_file():
            store = open_storage(url, fix=LOCAL_STORAGE_FIX)
        # Checked before anything is written here (study.db included): the folder may hold another study.
        attrs = stored_study(store, name)
        check_folder(directory, name, attrs)
        if attrs is not None:  # before the reference trains: a join refused after it wasted its epochs
            check_objective(store, name, multi_objective, directory if storage is None else None,
                            "a new --run-dir" if storage is None else
                            "a new --study" + (" and --run-dir" if study_dir else ""))
        store = store or open_storage(url, fix=LOCAL_STORAGE_FIX)
        config = study_config(name, config, overrides, directory, attrs)
        asked = trials, workers
        trials, workers, threads = _shares(config, *asked)
        check_space(config.tune)
        if search:
            check_space_ends(config)
            if note := inert_keys_note(config):
                print(note, file=sys.stderr, flush=True)  # a note, like the other commands': stdout is the result
        # At the trials' thread count, under the key their searches (and best.yaml's, which records the count) look
        # the baselines up with: they reuse the reference, and a search of best.yaml trains the same STL.
        reference = config if config.train.threads or not threads else dataclasses.replace(
            config, train=dataclasses.replace(config.train, threads=threads))
        # Said before the reference trains (minutes): a mistyped --run-dir starts a new study of the default preset.
        print(f"{'new study' if attrs is None else 'study'} '{name}' of preset '{config.name}' in {directory}"
              + (": its STL reference first, from which each trial's Δ is counted" if attrs is None and search
                 else ""), file=sys.stderr, flush=True)
        with intra_op_threads(reference.train.threads), run_settings():
            tasks, stl_val, data = _reference(reference, directory, search, multi_objective, progress)
        study = open_study(store, name, multi_objective, tasks, config, stl_val, search)
        if attrs is None and config_from_dict(study.user_attrs["config"], f"study '{name}'") != config:
            # Another command created the study while this one trained its reference (two started on one new
            # study): joined as a later command would, with the study's configuration and this one's --set (a
            # changed data.seed, say, is refused), not with its own, which its trials ran and were scored against
            # the other's STL reference. The folder is the other's study from now on: a refusal leaves it.
            created = False
            config = study_config(name, config, overrides, directory, study.user_attrs)
            trials, workers, threads = _shares(config, *asked)
    except MamoError as exc:
        _close(store)
        # Trained baselines are kept, and so is a folder whose study another command is setting up.
        if created and not isinstance(exc, StorageBusy) and not any((directory / ".baselines").glob("*.json")):
            shutil.rmtree(directory, ignore_errors=True)
        raise
    except KeyboardInterrupt:  # in the reference's training, say: its finished networks are cached in the folder
        _close(store)
        print(f"stopped while setting the study up (what the reference trained is kept); continue with: "
              f"{_continuing(directory, storage, url, name, trials, workers, multi_objective)}", file=sys.stderr,
              flush=True)
        raise StopExplained from None
    memo = DataMemo()
    if data is not None:
        memo.keep(reference.data, data)  # the command's data settings: a joined study's may differ
    return _OpenStudy(study, directory, url, config, tasks, trials, workers, threads, memo, store)


def _shares(config: Config, trials: int | None, workers: int) -> tuple[int, int, int | None]:
    """The command's trials (a joined study's tune.trials, not the preset's of this command, unless --trials),
    its workers (no more than its trials: a worker without one would only import PyTorch) and their threads."""
    trials = config.tune.trials if trials is None else trials
    workers = max(1, min(workers, trials))
    return trials, workers, max(1, available_cores() // workers) if workers > 1 else None


@quiet_optuna
def run_tune(
    config: Config,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    study_dir: str | Path | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    trials: int | None = None,
    workers: int = 1,
    multi_objective: bool = False,
    objective: Callable[[optuna.Trial], Any] | None = None,
    progress: bool = True,
    tensorboard: bool = True,
    pictures: bool = True,
) -> dict:
    """Create or join the study, run ``trials`` trials on ``workers`` processes, write the summary.

    ``objective`` replaces the search trial (it must be picklable, e.g. a module-level function, when
    ``workers`` > 1); by default each trial is a :class:`SearchObjective`, writing TensorBoard events
    unless ``tensorboard`` is false (``pictures=False``: without the round pictures).
    """
    _check_arguments(config, trials, workers, storage, study_name, objective)
    name = study_name or DEFAULT_STUDY
    opened = _open_study(config, overrides, study_dir, storage, name, trials, workers, multi_objective,
                         objective is None, progress)
    try:
        return _run_study(opened, name, storage, objective, multi_objective, progress, tensorboard, pictures)
    finally:
        _close(opened.store)


def _run_study(opened: _OpenStudy, name: str, storage: str | None, objective: Callable[[optuna.Trial], Any] | None,
               multi_objective: bool, progress: bool, tensorboard: bool, pictures: bool) -> dict:
    """Run the opened study's trials in this process or on its workers; the summary, or how to continue."""
    study, directory, config = opened.study, opened.directory, opened.config
    claim_folder(directory, name, study.user_attrs["uid"])
    # A caller's objective makes no trial folders: its line names the study folder instead.
    where = f"trial folders in {directory}" if objective is None else f"study folder {directory}"
    if objective is None:
        objective = SearchObjective(config, directory, opened.tasks, study.user_attrs.get("stl_val"),
                                    multi_objective, tensorboard, pictures, progress and opened.workers == 1,
                                    opened.threads, data=opened.data if opened.workers == 1 else DataMemo())
    line = TrialLine(directory / "tune.log")
    if storage is None:
        retry_interrupted(study, line)
    shown = shown_url(opened.url)
    print(f"study '{name}' ({shown}): {counted(opened.trials, 'trial')} on {counted(opened.workers, 'worker')}, "
          f"{where}", file=sys.stderr, flush=True)
    plan = Plan(opened.url, name, objective, config.tune.pruner, line.log_path, threads=opened.threads)
    context = multiprocessing.get_context("spawn")  # fork would copy torch's threads and open connections
    # Seeded TPE reproduces a local study (each trial's draws follow from the seed and its draw index, so a
    # continued study draws on, and two commands on it draw apart); machines sharing a database are not seeded.
    # Optuna's samplers take seeds in [0, 2**32), train.seed any 64-bit integer.
    seed = None if storage else config.train.seed % 2**32
    tickets = Tickets(opened.trials, context if opened.workers > 1 else None)
    try:
        if opened.workers == 1:
            with trial_stops() as stop:
                optimize(plan, tickets, seed, stop)
        else:
            try:
                run_workers(plan, opened.workers, tickets, seed, context)
            except MamoError as failure:  # a worker that ended badly (the out-of-memory killer's SIGKILL, typically)
                # The other workers' trials are in the study: the summary lists them (the best may be among them),
                # and the killed worker's trial, left running, is failed and queued for retry as after a stop. A
                # best effort: the workers' failure is the error to report, whatever else fails now.
                with contextlib.suppress(Exception):
                    if storage is None:
                        retry_interrupted(study, line)
                    summarize(study, directory, config, multi_objective, shown)
                # What is owed, not the command as it was: that ran all its trials again, the finished ones too.
                owed = owed_trials(study, tickets)
                again = _continuing(directory, storage, opened.url, name, owed, opened.workers, multi_objective)
                raise MamoError(f"{failure}; continue with: {again}") from None
    except KeyboardInterrupt:
        if storage is None:  # a worker killed while recording its stop left its trial running: retried next time
            retry_interrupted(study, line)
        summarize(study, directory, config, multi_objective, shown)  # the stopped trial's reason included
        owed = owed_trials(study, tickets)  # counted as for a killed worker above
        again = _continuing(directory, storage, opened.url, name, owed, opened.workers, multi_objective)
        print(f"stopped; finished trials stay in the study; continue with: {again}", file=sys.stderr, flush=True)
        raise StopExplained from None
    return summarize(study, directory, config, multi_objective, shown)


def _continuing(directory: Path, storage: str | None, url: str, name: str, trials: int | None,
                workers: int = 1, multi: bool = False) -> str:
    """The command that continues a stopped study with ``trials`` more (the study's tune.trials when None), on
    the stopped command's ``workers``, with ``--multi-objective`` where the study has it (the line left it out, and
    pasted it was refused: the study's objectives are fixed when it is made)."""
    # A storage URL as shown_url shows it: its password masked, for the user to fill in.
    where = ["--run-dir", directory] if storage is None else ["--storage", shown_url(url), "--study", name]
    if storage is not None and Path(directory) != _shared_study_folder(name):  # else another folder would join
        where += ["--run-dir", directory]
    return cli("tune", *where, *([] if trials is None else ["--trials", str(trials)]),
               *([] if workers == 1 else ["--workers", str(workers)]), *(["--multi-objective"] if multi else []))


def _check_arguments(config: Config, trials: int | None, workers: int, storage: str | None,
                     study_name: str | None, objective: Callable[[optuna.Trial], Any] | None = None) -> None:
    """The command's own numbers and names, and a caller's objective, before any storage or folder is touched."""
    check_space(config.tune)
    # Named where the number came from: without --trials it is tune.trials (a joined study's own, see below).
    for source, count in (("--trials", trials), ("tune.trials", config.tune.trials)):
        if count is not None and count < 0:
            raise MamoError(f"{source} must be ≥ 0, got {count}; fix the number.")
    if workers < 1:
        raise MamoError(f"--workers must be ≥ 1, got {workers}; fix the number.")
    if storage and not study_name:
        raise MamoError("--storage needs --study NAME so that every worker joins the same study; add --study.")
    if objective is not None and workers > 1 and (trials is None or trials > 1):  # one runs here (see _shares)
        try:  # as spawn sends it: a lambda failed there, after the study folder was made
            ForkingPickler.dumps(objective)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            name = getattr(objective, "__qualname__", repr(objective))
            raise MamoError(f"the objective {name} cannot be pickled into the {workers} worker processes ({exc}); "
                            "pass a module-level function, or workers=1.") from None


def _preset(args: argparse.Namespace) -> str:
    """The preset named, else the study folder's study.yaml, else the default. A joined study takes its
    configuration from the storage anyway; study.yaml matters when the storage has none yet: a start stopped
    while it trained the STL reference left only study.yaml, and continuing it with the default preset made a
    MultiMNIST study of a quick one (found by a helper)."""
    if args.preset is not None:
        return args.preset
    folder = Path(args.run_dir) if args.run_dir else _shared_study_folder(args.study) if args.storage else None
    saved = folder / "study.yaml" if folder else None
    return str(saved) if saved is not None and saved.is_file() else DEFAULT_PRESET


def add_arguments_tune(parser: argparse.ArgumentParser) -> None:
    from mamo.cli import add_preset_arguments

    add_preset_arguments(parser, f"{DEFAULT_PRESET}, or the study folder's study.yaml when --run-dir names an "
                         "existing study", "the study folder (default: runs/tune-<time>-<preset>, or "
                         "runs/tune-<study> with --storage); an existing one continues its study")
    parser.add_argument("--trials", type=int, default=None,
                        help="trials this command runs, shared by its workers (default: tune.trials of the preset)")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes on the study (default 1)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="an Optuna database URL that processes and machines share, e.g. "
                             "postgresql://user:password@host/db (default: SQLite in the study folder)")
    parser.add_argument("--study", default=None, metavar="NAME",
                        help="the study to create or join in the storage (needed with --storage)")
    # Hidden: `search --resume DIR` continues a search, so users try it on a study; a sentence says what does.
    parser.add_argument("--resume", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--multi-objective", action="store_true",
                        help="optimise each task's main validation metric and report the Pareto front (fixed "
                             "when the study starts: every command on the study needs it)")


def command_tune(args: argparse.Namespace) -> int:
    from mamo.cli import show_progress

    if args.resume is not None:
        raise MamoError(f"tune continues a study when it runs again on the study's folder, not with --resume; pass "
                        f"--run-dir {args.resume} instead (and --multi-objective if the study was started with it).")
    result = run_tune(
        load_config(_preset(args), args.overrides), overrides=args.overrides, study_dir=args.run_dir,
        storage=args.storage, study_name=args.study, trials=args.trials, workers=args.workers,
        multi_objective=args.multi_objective, progress=show_progress(args), tensorboard=not args.no_tensorboard,
        pictures=not args.no_pictures,
    )
    print("\n" + result["text"], flush=True)
    if result["best"] is None:
        ended = sum(result["states"][state] for state in ("fail", "pruned"))
        print("mamo: no trial of the study completed; the reasons are listed above." if ended else
              "mamo: no trial of the study has ended yet; run some with --trials N.", flush=True)
        return 1
    return 0
