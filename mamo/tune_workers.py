"""Running a study's trials: each trial's record and the local worker processes.

The study lives in an Optuna storage that every worker opens by URL (:mod:`mamo.tune_storage`). Each local
worker takes tickets from a shared counter so that together they run exactly the number of trials asked for,
and writes one line per finished trial.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from mamo.cache import process_owner
from mamo.errors import MamoError
from mamo.runs import one_at_a_time
from mamo.stops import STOP_REQUESTED, exit_quickly, handling_stops, hide_dropped_stops
from mamo.tune_space import PRUNERS, TrialSeededTPE
from mamo.tune_storage import RETRY_OF, open_storage, queue_retry, shown_url, storage_failure
from mamo.tune_summary import STOPPED_EARLY, outcome_text, short_value

# What a trial may raise without stopping the study: bad sampled settings, NaN losses, out of memory.
CATCH = (MamoError, FloatingPointError, RuntimeError, MemoryError)


STOPPED = "stopped by Ctrl-C before it finished"
OWNER = "owner"  # a trial's user attribute: the process running it (mamo.cache.process_owner)
COMMAND = "command"  # a trial's user attribute: the mark of the command whose ticket it took (Tickets.mark)


class WorkerStop:
    """The stop-signal handler (SIGINT, SIGTERM, SIGHUP) of a process running trials: KeyboardInterrupt, as
    Ctrl-C, only while a trial's objective runs (``armed``), outside the storage calls it makes
    (:func:`in_storage_call`), and until the worker records its stopped trial;
    from then on a signal is ignored, so the terminal's Ctrl-C and the parent's SIGTERM, which both reach it,
    do not cut the record short. Outside the objective (Optuna making, telling or collecting a trial) a first
    stop only sets :data:`mamo.stops.STOP_REQUESTED`, which ends the worker once that is done (raised inside
    ``study.ask()`` it left a RUNNING trial without an owner, which no command retried for a minute); a second
    one raises there too, so that a storage call stuck on a locked database does not make Ctrl-C useless. A
    stop Python dropped (raised inside a weakref callback, where it is only reported) is raised again at the
    next training step or trial the same way."""

    def __init__(self) -> None:
        self.armed = False
        self.recording = False

    def __call__(self, number: int, frame: Any) -> None:
        again = STOP_REQUESTED.is_set()
        STOP_REQUESTED.set()
        if not self.recording and ((self.armed and not in_storage_call(frame)) or again):
            raise KeyboardInterrupt


# Where a stop is not raised inside the objective: a storage call it makes (trial.report, should_prune, a
# sampler's or pruner's read of the study). Raised between a SELECT's execute and its fetch, the KeyboardInterrupt
# kept that statement open, pinned by its traceback, and with it a SQLite read lock that the worker's own record of
# the stopped trial (and another worker's) then waited on until the busy timeout: the command SIGKILLed its
# workers after a minute (a helper's audit, 2026-11-25). The stop waits for the call: the trainer raises it at its
# next step, the worker after the trial, and a second stop (the parent's SIGTERM) raises anywhere.
STORAGE_MODULES = ("optuna.storages", "sqlalchemy")


def in_storage_call(frame: Any) -> bool:
    """Whether the interrupted ``frame`` runs inside a storage call (a module of :data:`STORAGE_MODULES`)."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(STORAGE_MODULES):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def trial_stops() -> Iterator[WorkerStop | None]:
    """Inside, :class:`WorkerStop` handles the stop signals (in the main thread, where Python delivers them;
    elsewhere it yields None and the signals keep their handlers); the previous handlers come back after, and
    a stop taken inside is cleared once it has ended what it stopped (left set, it stopped every later run_tune
    or run_search of a Python session at once; only the CLI's own wrapper cleared it)."""
    stop, requested_before = WorkerStop(), STOP_REQUESTED.is_set()
    with handling_stops(stop) as taken:
        try:
            yield stop if taken else None
        finally:
            if taken and not requested_before:
                STOP_REQUESTED.clear()


@dataclass
class Recorded:
    """Wraps any objective: a failure's reason and the trial's host and duration become trial attributes."""

    objective: Callable[[optuna.Trial], Any]
    log: TrialLine | None = None  # where a trial stopped by Ctrl-C gets its line (Optuna's callbacks never run)
    stop: WorkerStop | None = None  # the stop-signal handler, armed while the objective runs
    mark: str | None = None  # the command's (Tickets.mark): what it still owes is counted from its marked trials

    def __call__(self, trial: optuna.Trial) -> Any:
        start, reason = time.perf_counter(), STOPPED
        try:
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr(OWNER, process_owner())  # a later command tells a running trial from a killed one
            if self.mark is not None:
                trial.set_user_attr(COMMAND, self.mark)
            if self.stop is not None:
                self.stop.armed = True
            try:
                if STOP_REQUESTED.is_set():  # stopped while Optuna made the trial: recorded as such, not run
                    reason = STOPPED_EARLY
                    raise KeyboardInterrupt
                value = self.objective(trial)
            finally:
                if self.stop is not None:
                    self.stop.armed = False
            values = value if isinstance(value, (tuple, list)) else (value,)
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise FloatingPointError(f"the objective returned {value!r}, not finite numbers")
            return value
        except CATCH as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            raise
        except KeyboardInterrupt:  # Optuna marks the trial failed; say why in summary.md and trials.csv
            if self.stop is not None:
                self.stop.recording = True
            trial.set_user_attr("fail_reason", reason)
            retried = trial.user_attrs.get(RETRY_OF)
            if reason == STOPPED and trial.params:
                # Queued by the command that stopped it, on any storage: a shared database's next command cannot
                # tell this command's stopped trials from another's (for a local study, the next command's
                # tune_study.retry_interrupted skips a trial already retried).
                queue_retry(trial.study, trial.number, trial.params)
            elif retried is not None and not trial.params:  # a retry stopped before it drew: queued again
                queue_retry(trial.study, retried, trial.study.get_trials(deepcopy=False)[retried].params)
            if self.log is not None:
                self.log.write(trial.number, f"failed: {reason}", trial.params, time.perf_counter() - start)
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))


class Tickets:
    """Trials still to start, shared by the local workers (``context``: a multiprocessing context) so that
    together they run exactly N; without a context, a plain counter for one in-process worker (no semaphore, so
    no resource tracker to warn when the process is killed). The trials they run carry ``mark``."""

    def __init__(self, count: int, context: Any = None):
        self.left = context.Value("q", count) if context is not None else None  # 64-bit: 2**32 + 1 is not 1
        self.count = self.asked = count
        self.command = os.getpid()  # the workers' parent, whose trials these are
        self.mark = uuid.uuid4().hex  # not the pid: a Python session's second run_tune is another command

    def take(self) -> bool:
        if self.left is None:
            self.count -= 1
            return self.count >= 0
        if self.command not in (os.getpid(), os.getppid()):
            # The command was killed (SIGKILL: it could stop no one), so nobody waits for this worker's trials or
            # summarizes them: an orphaned worker ends after its trial instead of running the command's others.
            return False
        with self.left.get_lock():
            if self.left.value <= 0:
                return False
            self.left.value -= 1
            return True


# A stopped command's wait for its workers: for the terminal's Ctrl-C to reach them (then SIGTERM), and for the
# stopped trials' records (then SIGKILL, which leaves a trial the next command, or this one, retries).
STOP_WAITS = (2.0, 60.0)


def _stop_workers(processes: list) -> None:
    """Stop the command's workers, none left behind: they may have the terminal's Ctrl-C already; SIGTERM the
    rest; SIGKILL what has not ended after :data:`STOP_WAITS` (a record stuck on a locked database). Another
    Ctrl-C meanwhile skips to SIGKILL."""
    try:
        for wait, send in zip(STOP_WAITS, ("terminate", "kill"), strict=True):
            deadline = time.monotonic() + wait
            for process in processes:
                process.join(max(0.0, deadline - time.monotonic()))
            for process in processes:
                if process.is_alive():
                    getattr(process, send)()
    except KeyboardInterrupt:
        for process in processes:
            if process.is_alive():
                process.kill()
    for process in processes:
        process.join()


@dataclass
class TrialLine:
    """One line per finished trial, on the terminal and in the study's tune.log."""

    log_path: Path

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.write(trial.number, outcome_text(study, trial), trial.params, trial.user_attrs.get("seconds", 0))

    def write(self, number: int, outcome: str, params: dict[str, Any], seconds: float | None) -> None:
        shown = ", ".join(f"{k}={short_value(v)}" for k, v in params.items())
        line = f"trial {number} {outcome}" + (f" ({shown})" if shown else "") + (
            "" if seconds is None else f" in {seconds:.1f} s")
        print(line, file=sys.stderr, flush=True)  # progress, like the other commands': stdout keeps the result
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


Returned = TypeVar("Returned")


def quiet_optuna(function: Callable[..., Returned]) -> Callable[..., Returned]:
    """``function`` runs without Optuna's per-trial logs and experimental-API warnings (mamo prints its own line
    per trial, which they would repeat); Optuna's verbosity and the warning filters come back after, so a Python
    session that called run_tune keeps its own settings."""

    @functools.wraps(function)
    def quieted(*args: Any, **kwargs: Any) -> Returned:
        verbosity = optuna.logging.get_verbosity()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            try:
                return function(*args, **kwargs)
            finally:
                optuna.logging.set_verbosity(verbosity)

    return quieted


@dataclass
class Plan:
    """What every worker of one command shares: the study's address, the objective, the pruner, the log."""

    url: str
    study: str
    objective: Callable[[optuna.Trial], Any]
    pruner: str
    log_path: Path
    threads: int | None = None  # torch threads per worker, so that K workers do not oversubscribe the cores


class OneTakerStudy(optuna.Study):
    """A study whose processes take a queued trial (a retry) in turn, under an flock on the study ``folder``:
    Optuna reads it WAITING, then sets it RUNNING, and SQLite ignores the read's FOR UPDATE, so two workers ran
    one retry in one folder and another was never run (6 and 10 of 60 taken twice by three processes)."""

    def __init__(self, study_name: str, storage: optuna.storages.BaseStorage, folder: Path, **parts: Any):
        super().__init__(study_name=study_name, storage=storage, **parts)  # parts: sampler, pruner
        self.folder = folder

    def _pop_waiting_trial_id(self) -> int | None:  # Optuna's one step that takes a queued trial
        """A queued trial, taken; where none is queued a new one, made here with its owner recorded (Optuna
        would make it without, and a command killed before its objective started left a trial that the next
        command could not tell from a live one for a minute)."""
        owner = {OWNER: process_owner(), "host": socket.gethostname()}
        with one_at_a_time(self.folder):
            taken = super()._pop_waiting_trial_id()
        if taken is not None:
            for key, value in owner.items():  # a kill in the microseconds before this falls to ORPHAN_SECONDS
                self._storage.set_trial_user_attr(taken, key, value)
            return taken
        made = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, values=None,
                           datetime_start=datetime.datetime.now(), datetime_complete=None, params={},
                           distributions={}, user_attrs=owner, system_attrs={}, intermediate_values={},
                           trial_id=-1)  # Optuna's own start time (naive local), which left_running reads
        return self._storage.create_new_trial(self._study_id, template_trial=made)


@quiet_optuna
def optimize(plan: Plan, tickets: Tickets, seed: int | None, stop: WorkerStop | None = None) -> None:
    """One worker: joins the study and runs trials while tickets are left (in-process or spawned, with its
    signal handler ``stop``)."""
    if plan.threads:
        import torch

        torch.set_num_threads(plan.threads)
    store = open_storage(plan.url, create=False)
    study = OneTakerStudy(plan.study, store, plan.log_path.parent, sampler=TrialSeededTPE(seed),
                          pruner=PRUNERS[plan.pruner]())
    line = TrialLine(plan.log_path)
    try:
        while not STOP_REQUESTED.is_set() and tickets.take():
            try:
                # gc after each trial: a trial that ran out of memory must not leave its tensors to the next one.
                study.optimize(Recorded(plan.objective, line, stop, tickets.mark), n_trials=1, catch=CATCH,
                               callbacks=[line], gc_after_trial=True)
            except Exception as exc:
                failure = storage_failure(exc)
                if failure is None:
                    raise
                raise MamoError(f"the study's storage {shown_url(plan.url)} failed while recording a trial "
                                f"({failure}); free disk space or fix the study folder's permissions (or the "
                                "database), then rerun the same command to continue the study.") from exc
    finally:
        store.engine.dispose()  # its connections closed now, not by the garbage collector (an in-process worker)
    if STOP_REQUESTED.is_set():  # stopped between trials, or a dropped raise: the stop still ends the command
        raise KeyboardInterrupt


def spread_over_gpus(worker: int) -> None:
    """Worker ``worker`` makes GPU ``worker`` mod the count its current CUDA device, so that ``train.device``
    ``auto`` or ``cuda`` (the current device) puts K workers on K GPUs instead of all on GPU 0 (a review's
    finding; an explicit ``cuda:N`` still wins, the session sets it). Nothing happens with fewer than 2 GPUs."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(worker % torch.cuda.device_count())


def _worker(plan: Plan, tickets: Tickets, seed: int | None, worker: int = 0) -> None:
    """A spawned worker: on Ctrl-C (which reaches every process of the terminal) or the parent's SIGTERM it
    records its trial as stopped and exits quietly; the parent says how to continue, once. It starts with Ctrl-C
    ignored (see :func:`run_workers`) and takes it from here on. It ends as the command does (exit_quickly),
    so the study's end does not wait a second for each worker's interpreter to tear down."""
    sys.unraisablehook = hide_dropped_stops(sys.unraisablehook)
    spread_over_gpus(worker)
    code = 0
    try:
        with trial_stops() as stop:
            optimize(plan, tickets, seed, stop)
    except KeyboardInterrupt:
        code = 130
    except MamoError as exc:  # one sentence, as the command prints its own; the parent names the worker
        print(f"mamo: error: {exc}", file=sys.stderr, flush=True)
        code = 2
    exit_quickly(code)


def run_workers(plan: Plan, workers: int, tickets: Tickets, seed: int | None, context: Any) -> None:
    """``workers`` spawned processes on the same study (one seed: their trials' draw indices differ); waits for
    all. Stopped itself (Ctrl-C, SIGTERM), it stops them (:func:`_stop_workers`) before it lets the stop on, so
    that no worker outlives the command and the summary it writes next is complete."""
    processes = [context.Process(target=_worker, args=(plan, tickets, seed, k)) for k in range(workers)]
    # Started with Ctrl-C ignored, which a spawned interpreter keeps until _worker takes it: a Ctrl-C while it
    # imports would print its traceback; _stop_workers's SIGTERM ends it quietly instead.
    default = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        for process in processes:
            process.start()
    finally:
        if default is not None:
            signal.signal(signal.SIGINT, default)
    try:
        for process in processes:
            process.join()
    except BaseException:
        _stop_workers(processes)
        raise
    if failure := workers_failure([process.exitcode for process in processes]):
        raise MamoError(failure)


def workers_failure(exit_codes: list[int]) -> str | None:
    """The sentence for workers that did not end cleanly, or None. A worker ended by a signal printed nothing
    (SIGKILL leaves it no chance), so the sentence names the signal instead of "an error printed above"."""
    errors = [f"{k} (exit code {code})" for k, code in enumerate(exit_codes) if code > 0]
    signalled: dict[str, list[str]] = {}
    for k, code in enumerate(exit_codes):
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            signalled.setdefault(name, []).append(str(k))
    if not errors and not signalled:
        return None
    parts = [f"tune worker {', '.join(errors)} stopped with an error printed above"] if errors else []
    for name, workers in signalled.items():
        # The kernel's out-of-memory killer is what sends SIGKILL to a process nobody signalled.
        why = (" (on Linux usually the out-of-memory killer: run fewer --workers or a smaller model)"
               if name == "SIGKILL" else "")
        who = f"tune worker {workers[0]} was" if len(workers) == 1 else f"tune workers {', '.join(workers)} were"
        parts.append(f"{who} killed by {name}{why}")
    return f"{'; '.join(parts)}; the finished trials are kept in the study"  # run_tune adds how to continue
