"""Running a study's trials: the storage, each trial's record, and the local worker processes.

The study lives in an Optuna storage that every worker opens by URL (SQLite in the study folder or a shared
database). Each local worker takes tickets from a shared counter so that together they run exactly the number
of trials asked for, and writes one line per finished trial.
"""

from __future__ import annotations

import importlib.util
import math
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mamo.errors import MamoError
from mamo.tune_space import PRUNERS
from mamo.tune_summary import short_value

# What a trial may raise without stopping the study: bad sampled settings, NaN losses, out of memory.
CATCH = (MamoError, FloatingPointError, RuntimeError, MemoryError)


STOPPED = "stopped by Ctrl-C before it finished"
RETRY_OF = "retry_of"  # a trial's user attribute: the number of the interrupted trial it continues


def retry_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a retry (same parameters) of a trial Optuna failed because its worker's heartbeat stopped."""
    study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})


@dataclass
class Recorded:
    """Wraps any objective: a failure's reason and the trial's host and duration become trial attributes."""

    objective: Callable[[optuna.Trial], Any]
    log: TrialLine | None = None  # where a trial stopped by Ctrl-C gets its line (Optuna's callbacks never run)

    def __call__(self, trial: optuna.Trial) -> Any:
        trial.set_user_attr("host", socket.gethostname())
        start = time.perf_counter()
        try:
            value = self.objective(trial)
            values = value if isinstance(value, (tuple, list)) else (value,)
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise FloatingPointError(f"the objective returned {value!r}, not finite numbers")
            return value
        except CATCH as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            raise
        except KeyboardInterrupt:  # Optuna marks the trial failed; say why in summary.md and trials.csv
            trial.set_user_attr("fail_reason", STOPPED)
            if self.log is not None:
                self.log.write(trial.number, f"failed: {STOPPED}", trial.params, time.perf_counter() - start)
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))


ENGINE_ARGS: dict[str, dict] = {
    "sqlite": {"connect_args": {"timeout": 60}},  # several local workers wait for the file lock
    "postgresql": {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}},
    "mysql": {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}},
}


TABLE_RACE_ATTEMPTS = 3


class StorageBusy(MamoError):
    """Another command was creating the study's tables at the same moment (it owns what it made)."""

DRIVERS: dict[str, tuple[str, ...]] = {"postgresql": ("psycopg", "psycopg2"), "mysql": ("MySQLdb", "pymysql")}


def open_storage(url: str, create: bool = True) -> optuna.storages.RDBStorage:
    """The study database; a URL that is malformed or does not answer is one sentence, not a traceback."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise MamoError(f"--storage '{url}' is not a database URL; write e.g. postgresql://user:password@host/db "
                        "or sqlite:///path/study.db.") from exc
    shown = parsed.render_as_string(hide_password=True)
    if parsed.drivername in DRIVERS:
        # SQLAlchemy 2.1 reads postgresql:// as psycopg 3; use whichever driver is installed.
        found = [d for d in DRIVERS[parsed.drivername] if importlib.util.find_spec(d) is not None]
        if found:
            url = parsed.set(drivername=f"{parsed.drivername}+{found[0]}").render_as_string(hide_password=False)
    try:
        return _rdb_storage(url, ENGINE_ARGS.get(parsed.get_backend_name(), {}), create)
    except ImportError as exc:
        raise MamoError(f"storage {shown} needs a database driver that is not installed; install it, e.g. "
                        "pip install psycopg2-binary for postgresql://.") from exc
    except (SQLAlchemyError, ValueError, RuntimeError) as exc:
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        if "already exists" in reason:  # two commands created the study's tables at the same moment
            raise StorageBusy(f"storage {shown} was being set up by another command at the same moment ({reason}); "
                              "run this command again to join the study.") from exc
        raise MamoError(f"storage {shown} could not be opened ({reason}); start the database or pass a reachable "
                        "--storage URL.") from exc


def _rdb_storage(url: str, engine_kwargs: dict, create: bool) -> optuna.storages.RDBStorage:
    from sqlalchemy.exc import SQLAlchemyError

    def connect() -> optuna.storages.RDBStorage:
        # A heartbeat lets a worker on another machine fail the trial of a worker that was killed, and retry it.
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=60, grace_period=300,
                                          heartbeat_stale_trial_callback=retry_stale, skip_table_creation=not create)

    for _ in range(TABLE_RACE_ATTEMPTS - 1):
        try:
            return connect()
        except SQLAlchemyError as exc:
            # Two commands creating the tables at once: one fails with "already exists"; a retry finds them made.
            if "already exists" not in str(exc):
                raise
        time.sleep(0.5)
    return connect()


class Tickets:
    """Trials still to start, shared by the local workers so that together they run exactly N."""

    def __init__(self, count: int, context: Any):
        self.left = context.Value("i", count)

    def take(self) -> bool:
        with self.left.get_lock():
            if self.left.value <= 0:
                return False
            self.left.value -= 1
            return True


def _values_text(study: optuna.Study, trial: FrozenTrial) -> str:
    names = study.metric_names or [f"objective {i}" for i in range(len(trial.values))]
    return ", ".join(f"{name} {value:.4g}" for name, value in zip(names, trial.values, strict=True))


def _pruned_text(trial: FrozenTrial) -> str:
    step = max(trial.intermediate_values, default=None)
    return "pruned" if step is None else f"pruned after round {step} at {trial.intermediate_values[step]:.4g}"


LINES: dict[TrialState, Callable[[optuna.Study, FrozenTrial], str]] = {
    TrialState.COMPLETE: lambda study, t: f"complete: {_values_text(study, t)}",
    TrialState.PRUNED: lambda study, t: _pruned_text(t),
    TrialState.FAIL: lambda study, t: f"failed: {t.user_attrs.get('fail_reason', 'unknown reason')}",
}


@dataclass
class TrialLine:
    """One line per finished trial, on the terminal and in the study's tune.log."""

    log_path: Path

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.write(trial.number, LINES[trial.state](study, trial), trial.params, trial.user_attrs.get("seconds", 0))

    def write(self, number: int, outcome: str, params: dict[str, Any], seconds: float | None) -> None:
        shown = ", ".join(f"{k}={short_value(v)}" for k, v in params.items())
        line = f"trial {number} {outcome} ({shown})" + ("" if seconds is None else f" in {seconds:.1f} s")
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def quiet_optuna() -> None:
    # mamo prints its own line per trial; Optuna's per-trial logs and experimental-API warnings would repeat it.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class Plan:
    """What every worker of one command shares: the study's address, the objective, the pruner, the log."""

    url: str
    study: str
    objective: Callable[[optuna.Trial], Any]
    pruner: str
    log_path: Path
    threads: int | None = None  # torch threads per worker, so that K workers do not oversubscribe the cores


def optimize(plan: Plan, tickets: Tickets, seed: int | None) -> None:
    """One worker: joins the study and runs trials while tickets are left (in-process or spawned)."""
    quiet_optuna()
    if plan.threads:
        import torch

        torch.set_num_threads(plan.threads)
    study = optuna.load_study(study_name=plan.study, storage=open_storage(plan.url, create=False),
                              sampler=optuna.samplers.TPESampler(seed=seed), pruner=PRUNERS[plan.pruner]())
    line = TrialLine(plan.log_path)
    while tickets.take():
        # gc after each trial: a trial that ran out of memory must not leave its tensors to the next one.
        study.optimize(Recorded(plan.objective, line), n_trials=1, catch=CATCH, callbacks=[line], gc_after_trial=True)


def _worker(plan: Plan, tickets: Tickets, seed: int | None) -> None:
    """A spawned worker: on Ctrl-C (which reaches every process of the terminal) it stops quietly; the parent
    says how to continue, once."""
    try:
        optimize(plan, tickets, seed)
    except KeyboardInterrupt:
        sys.exit(130)


def run_workers(plan: Plan, workers: int, tickets: Tickets, seed: int | None, context: Any) -> None:
    """``workers`` spawned processes on the same study, each with its own sampler seed; waits for all."""
    processes = [context.Process(target=_worker, args=(plan, tickets, None if seed is None else (seed + k) % 2**32))
                 for k in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [f"{k} (exit code {p.exitcode})" for k, p in enumerate(processes) if p.exitcode != 0]
    if failed:
        raise MamoError(f"tune worker {', '.join(failed)} stopped with an error printed above; the finished trials "
                        "are kept in the study, rerun the same command to continue it.")
