"""A tune trial's objective: one architecture search in the study folder's ``trial-NNNN`` (a retry continues
the interrupted trial's folder), its validation Δ against the study's STL reference (or each task's main
validation metric with ``--multi-objective``), every round's Δ reported to the pruner, and the trial's
TensorBoard HPARAMS record whether it completed, was pruned or failed."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from mamo.config import Config
from mamo.data import DataMemo
from mamo.errors import EndedOnPurpose
from mamo.report import delta
from mamo.tasks import TaskSpec
from mamo.trainer import Callback, EpochLines
from mamo.tune_space import objective_metrics, suggest_config, trial_folder
from mamo.tune_storage import RETRY_OF

if TYPE_CHECKING:
    from mamo.search_phases import RoundRecord


class PrunedByStudy(optuna.TrialPruned, EndedOnPurpose):
    """Optuna's pruned state for the study, and for the trial's log.txt an ending on purpose, not a crash."""


class RoundReporter(Callback):
    """Reports each detection round's validation Δ (against the study's STL) and stops a hopeless trial."""

    def __init__(self, trial: optuna.Trial, stl_val: dict, tasks: dict[str, TaskSpec]):
        self.trial, self.stl_val, self.tasks = trial, stl_val, tasks
        self.last: tuple[int, float] | None = None  # (round, validation Δ) last reported

    def on_round_end(self, record: RoundRecord) -> None:
        self._report(record.round, record.val)

    def _report(self, z: int, val: dict) -> None:
        value = delta(val, self.stl_val, self.tasks)
        self.last = (z, value)
        self.trial.report(value, z)
        if self.trial.should_prune():
            raise PrunedByStudy(f"pruned by the study's pruner: validation Δ {value:+.2f} after round {z} is below "
                                f"its bar, so the trial ends here")

    def on_rounds_restored(self, rounds: list[dict]) -> None:
        # A retried trial reports the rounds its interrupted run finished, so the pruner decides as it would have.
        for record in rounds:
            if "val" in record:  # checkpoints before 2026-11-24 did not keep it
                self._report(record["round"], record["val"])


def _trial_line(number: int, line: str) -> None:
    print(f"trial {number}: {line}", file=sys.stderr, flush=True)


@dataclass
class SearchObjective:
    """One trial = one search in ``study_dir/trial-NNNN``; a plain object so spawned workers can unpickle it."""

    base: Config
    study_dir: Path
    tasks: dict[str, TaskSpec]
    stl_val: dict | None
    multi: bool
    tensorboard: bool = True  # per trial: events, round pictures and the HPARAMS record
    pictures: bool = True  # False: the trial's events and HPARAMS record without the round pictures
    # The trial's epoch bars (one worker on a terminal; several would draw over each other); without them, each
    # epoch is a line on stderr naming the trial, as `search --no-progress` shows (trials were silent for minutes).
    progress: bool = False
    threads: int | None = None  # a worker's share of the cores, when train.threads does not say
    # The data, built by the first trial of each process (or the study's reference) and shared by the rest.
    data: DataMemo = field(default_factory=DataMemo, repr=False, compare=False)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        from mamo.hparams import drop_hparams, write_hparams
        from mamo.search import run_search

        config = suggest_config(trial, self.base)
        if config.train.threads is None:
            # Recorded in the trial's config.yaml (and so in best.yaml): CPU results depend on the thread count.
            config.train.threads = self.threads
        if "lr" in trial.params:
            # The baseline cache is keyed by lr: a per-trial STL would cost more than the search; the objective
            # uses the study's STL reference either way.
            config.search.baselines = False
        # A retry continues the interrupted trial's own folder (same parameters) from its newest checkpoint.
        retried = trial.user_attrs.get(RETRY_OF)
        stored = None if retried is None else trial.study.get_trials(deepcopy=False)[retried].user_attrs.get("run_dir")
        # Its folder in this study folder, whatever path the storage recorded: a copied or moved study must not
        # continue the trial in the folder it was copied from (another study's, from then on).
        folder = self.study_dir / Path(stored).name if stored else None
        if not (folder and folder.is_dir()):  # no folder yet, or one on another machine: a fresh start
            retried, folder = None, None
        run_dir = folder or self.study_dir / trial_folder(trial.number)
        if retried is not None:
            drop_hparams(run_dir)  # the stopped run's "failed"
            if not (run_dir / "config.yaml").is_file():
                _clear_records(run_dir)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        reporter = RoundReporter(trial, self.stl_val, self.tasks) if self.stl_val and not self.multi else None
        columns = self._columns(config, reporter is not None)
        fresh = not run_dir.exists() or retried is not None
        try:
            if retried is not None and (run_dir / "metrics.json").is_file():  # killed after the search finished
                metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
            else:
                resume = retried is not None and (run_dir / "config.yaml").is_file()
                lines = [] if self.progress else [EpochLines(functools.partial(_trial_line, trial.number))]
                metrics = run_search(config, run_dir, progress=self.progress, quiet=True, resume=resume,
                                     callbacks=[*([reporter] if reporter else []), *lines],
                                     cache_root=self.study_dir / ".baselines",
                                     loggers=self.tensorboard, pictures=self.pictures, stl_reference=self.stl_val,
                                     loader=self.data)
        except optuna.TrialPruned:
            if self.tensorboard:
                write_hparams(run_dir, trial.params, self._stopped(reporter), state="pruned", metric_names=columns)
            raise
        except (Exception, KeyboardInterrupt) as error:  # Ctrl-C too: the trial is recorded as failed
            # Not into a folder that was there before the trial: it may be another run's (the trial failed on it).
            if self.tensorboard and fresh:
                try:
                    write_hparams(run_dir, trial.params, self._stopped(reporter), state="failed",
                                  metric_names=columns)
                except Exception as problem:  # the trial's own error is what the study must record
                    error.add_note(f"Its TensorBoard HPARAMS record could not be written either: {problem}")
            raise
        val_delta = delta(metrics["val"], self.stl_val, self.tasks) if self.stl_val else None
        attrs = {"val_delta": val_delta, "delta": metrics.get("delta"), "win_rate": metrics.get("win_rate"),
                 "gmk_modules": metrics.get("gmk_modules"), "params": metrics.get("params")}
        for key, value in attrs.items():
            if value is not None:
                trial.set_user_attr(key, value)
        values = {f"{task}.{metric}": metrics["val"][task][metric] for task, metric, _ in objective_metrics(self.tasks)}
        if self.tensorboard:
            write_hparams(run_dir, trial.params, {f"tune/{key}": value for key, value in {**attrs, **values}.items()},
                          metric_names=columns)
        return tuple(values.values()) if self.multi else val_delta

    def _columns(self, config: Config, reported: bool) -> list[str]:
        """The HPARAMS metrics every trial of the study declares, whether it completed, was pruned or failed."""
        names = ["val_delta"] if self.stl_val else []
        names += ["delta", "win_rate"] if config.search.baselines else []
        names += ["gmk_modules", "params", *(f"{task}.{metric}" for task, metric, _ in objective_metrics(self.tasks))]
        return [f"tune/{name}" for name in names] + (["tune/last_round"] if reported else [])

    @staticmethod
    def _stopped(reporter: RoundReporter | None) -> dict[str, float]:
        """A pruned or failed trial's metrics: the validation Δ of the last round it reported, and that round."""
        if reporter is None or reporter.last is None:
            return {}
        z, value = reporter.last
        return {"tune/val_delta": value, "tune/last_round": z}


def _clear_records(run_dir: Path) -> None:
    """Empty the folder of a trial stopped before its search wrote config.yaml, when it holds only the stopped
    trial's HPARAMS record, so that its retry starts the search there (a non-empty run folder is refused)."""
    entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
    if entries and all(entry.is_file() and entry.name.startswith("events.out.tfevents.") for entry in entries):
        for entry in entries:
            entry.unlink()
