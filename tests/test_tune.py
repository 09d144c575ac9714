"""``mamo tune``: the study machinery on crafted objectives, then real searches on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import json
import os
import re
import time
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from mamo.cli import main
from mamo.config import Config, dump_config, load_config
from mamo.data import load_data
from mamo.errors import MamoError
from mamo.tune import near_zero_reference_note, run_tune
from mamo.tune_space import apply_params, check_space
from mamo.tune_storage import open_storage

TINY = ["data.train_size=128", "data.val_size=64", "data.test_size=64", "train.epochs=1",
        "search.final_epochs=1", "tune.rounds=[0, 1]"]
POSTGRES_URL = os.environ.get("MAMO_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL,
    reason="MAMO_TEST_POSTGRES_URL is not set; .ci/run starts a throwaway server with .ci/postgres.sh",
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: real searches here are tiny


@pytest.fixture(scope="module")
def tiny():
    return load_config("quick", TINY)


def load(directory: Path, name: str = "mamo") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{directory / 'study.db'}")


# What every trial of a single-objective study on TINY declares in the HPARAMS tab, whatever its state.
HPARAMS_COLUMNS = ["tune/val_delta", "tune/delta", "tune/win_rate", "tune/gmk_modules", "tune/params",
                   "tune/left.accuracy", "tune/right.accuracy", "tune/last_round"]


def hparams_record(folder: Path) -> tuple[dict, str, list[str], dict[str, float]]:
    """A trial's HPARAMS record read back: its hparams, its session's end status, the metric columns it
    declares, and the values of its tune/ metrics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    events = EventAccumulator(str(folder), size_guidance={"images": 1, "scalars": 0, "tensors": 1})
    events.Reload()
    content = {tag: plugin_data_pb2.HParamsPluginData.FromString(data)
               for tag, data in events.PluginTagToContent("hparams").items()}
    start = content["_hparams_/session_start_info"].session_start_info.hparams
    hparams = {key: getattr(value, value.WhichOneof("kind")) for key, value in start.items()}
    status = api_pb2.Status.Name(content["_hparams_/session_end_info"].session_end_info.status)
    columns = [m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos]
    values = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("tune/")}
    return hparams, status, columns, values


# Crafted objectives live at module level so that spawned workers can unpickle them.


def staircase(trial: optuna.Trial) -> float:
    """Trials 0-2 climb 1, 2, 3 over three steps; later trials sit far below at every step."""
    for step in (1, 2, 3):
        trial.report(-10.0 if trial.number >= 3 else float(step), step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return 3.0 if trial.number < 3 else -10.0


FAILURES = {
    1: FloatingPointError("the loss of task left became NaN or infinite"),
    2: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    3: MamoError("unknown direction 'mgdaa' (direction.name); use one of equal, mgda."),
}


def sometimes_failing(trial: optuna.Trial) -> float:
    if trial.number in FAILURES:
        raise FAILURES[trial.number]
    if trial.number == 4:
        return float("nan")
    return trial.suggest_float("alpha", 0.0, 1.0)


def own_parameter(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -2.0, 2.0)
    return -((x - 0.5) ** 2)


def buggy(trial: optuna.Trial) -> float:
    raise ZeroDivisionError("a bug, not a bad trial")


def which_process(trial: optuna.Trial) -> float:
    """Records its worker's pid, after waiting (up to 60 s) until both workers have checked in: an instant
    objective let the first worker take all six trials before the second had started (a flaky CI run)."""
    barrier = Path(os.environ["MAMO_TEST_BARRIER"])
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    trial.set_user_attr("pid", os.getpid())
    return float(trial.suggest_int("T", 2, 30))


def parked_alpha(trial: optuna.Trial) -> float:
    """Records its worker's pid, draws alpha, checks in (MAMO_TEST_BARRIER/<pid>) and waits there, up to 120 s,
    for the stop: a trial the test's stop signal certainly finds running (a trial of a fixed second let a loaded
    machine's stop land between trials, or in Optuna's making of one)."""
    trial.set_user_attr("pid", os.getpid())
    alpha = trial.suggest_float("alpha", 0.0, 1.0)
    (Path(os.environ["MAMO_TEST_BARRIER"]) / str(os.getpid())).touch()
    time.sleep(120)
    return alpha


def deaf_sleeper(ready) -> None:
    """A worker stuck where no signal stops it (a record waiting on a locked database, say)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.release()
    time.sleep(120)


def two_accuracies(trial: optuna.Trial) -> tuple[float, float]:
    """Trials 0-3 trade one task for the other (all on the front); trial 4 is dominated by every one of them."""
    points = [(0.9, 0.5), (0.8, 0.6), (0.7, 0.7), (0.5, 0.9), (0.4, 0.4)]
    return points[trial.number]


def test_space_checks_ranges_choices_and_pruner(tiny):
    check_space(tiny.tune)
    bad = [("tune.T=[30, 2]", "tune.T"), ("tune.lr=[0, 0.1]", "tune.lr"), ("tune.direction=[mgda, nope]",
           "tune.direction"), ("tune.threshold=[topk]", "tune.threshold"), ("tune.pruner=sometimes", "tune.pruner"),
           ("tune.modules=[gmk, pairs]", "tune.modules"), ("tune.normalization=[l3]", "tune.normalization"),
           ("tune.T=[0, 30]", "tune.T"), ("tune.T=[]", "tune.T")]
    for override, key in bad:
        with pytest.raises(MamoError, match=key):
            check_space(load_config("quick", [override]).tune)


def test_parameters_land_where_the_search_reads_them(tiny):
    tuned = apply_params(tiny, {"T": 7, "alpha": 0.25, "rounds": 3, "lr": 0.003, "threshold": "topk:2",
                                "direction": "central", "formulation": "thesis", "modules": "exclusive",
                                "normalization": "l2"})
    assert (tuned.direction.tensioner.T, tuned.direction.tensioner.alpha, tuned.search.rounds) == (7, 0.25, 3)
    assert (tuned.train.lr, tuned.search.threshold, tuned.direction.name) == (0.003, "topk:2", "central")
    assert (tuned.direction.tensioner.formulation, tuned.search.modules) == ("thesis", "exclusive")
    assert tuned.direction.normalization == "l2"
    assert tiny.direction.tensioner.T == 4  # the base configuration is untouched


@pytest.mark.parametrize(("pruner", "expected"), [("median", [TrialState.COMPLETE] * 3 + [TrialState.PRUNED] * 2),
                                                   ("none", [TrialState.COMPLETE] * 5)])
def test_pruner_stops_trials_below_the_median(tmp_path, pruner, expected):
    config = load_config("quick", [f"tune.pruner={pruner}"])
    run_tune(config, study_dir=tmp_path, trials=5, objective=staircase)
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == expected
    for t in trials[3:]:
        # A pruned trial stopped at its first report; an unpruned one reported all three steps.
        assert list(t.intermediate_values) == ([1] if pruner == "median" else [1, 2, 3])
    log = (tmp_path / "tune.log").read_text()
    assert ("trial 4 pruned" in log) == (pruner == "median")


@pytest.mark.parametrize(("pruner", "value", "pruned"), [
    ("percentile", 1.5, True), ("percentile", 2.2, False), ("median", 2.2, True), ("median", 2.7, False)])
def test_the_percentile_pruner_prunes_the_bottom_quarter_and_the_median_the_bottom_half(pruner, value, pruned):
    # Finished trials reported 1, 2, 3, 4 at round 1 (maximised): 25th percentile 1.75, median 2.5. Optuna's
    # PercentilePruner(25) keeps the top quarter instead, harsher than the median (a helper's finding).
    from mamo.tune_space import PRUNERS

    study = optuna.create_study(direction="maximize", pruner=PRUNERS[pruner]())
    for finished in (1.0, 2.0, 3.0, 4.0):
        study.add_trial(optuna.trial.create_trial(value=finished, intermediate_values={1: finished}))
    trial = study.ask()
    trial.report(value, 1)
    assert trial.should_prune() == pruned


def test_an_objective_of_ones_own_parameters_gets_its_summary_without_a_best_yaml(tmp_path):
    # Before: the summary looked the drawn x up among mamo's settings (KeyError) after every trial had run, so
    # summary.md and trials.csv were never written; the value was also labelled val_delta.
    result = run_tune(load_config("quick"), study_dir=tmp_path, trials=3, objective=own_parameter, progress=False)
    study = load(tmp_path)
    assert study.metric_names == ["objective"] and result["best_config"] is None
    assert not (tmp_path / "best.yaml").exists()
    best = study.best_trial
    assert f"No best.yaml: trial {best.number} drew x, which no mamo setting holds" in result["text"]
    assert "Best trials (your objective, higher is better)\n\n| trial | objective | x |\n" in result["text"]
    with open(tmp_path / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["x"]) for row in rows] == [t.params["x"] for t in study.trials]
    assert [float(row["objective"]) for row in rows] == [t.value for t in study.trials]
    assert "trial 2 complete: objective" in (tmp_path / "tune.log").read_text()


def test_failing_trials_are_recorded_and_the_study_goes_on(tmp_path):
    result = run_tune(load_config("quick"), study_dir=tmp_path, trials=7, objective=sometimes_failing)
    trials = load(tmp_path).trials
    assert len(trials) == 7
    assert [t.state for t in trials] == [TrialState.COMPLETE] + [TrialState.FAIL] * 4 + [TrialState.COMPLETE] * 2
    reasons = [t.user_attrs["fail_reason"] for t in trials[1:5]]
    assert reasons[0].startswith("FloatingPointError: the loss of task left")
    assert reasons[1].startswith("RuntimeError: CUDA out of memory")
    assert reasons[2].startswith("MamoError: unknown direction")
    assert reasons[3].startswith("FloatingPointError: the objective returned nan")
    summary = (tmp_path / "summary.md").read_text()
    assert "trial 2: RuntimeError: CUDA out of memory" in summary
    assert result["states"]["fail"] == 4
    assert result["best"] == max((0, 5, 6), key=lambda n: trials[n].value)


def interrupted(trial: optuna.Trial) -> float:
    trial.suggest_float("alpha", 0, 1)
    if trial.number == 1:
        raise KeyboardInterrupt
    return 1.0


def test_ctrl_c_says_how_to_continue_the_study(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        run_tune(load_config("quick"), study_dir=tmp_path, trials=3, objective=interrupted)
    # The exact command, with the trials this one still owed: the stopped trial 1 (retried first) and trial 2
    # (rerunning the command as it was ran 3 more; a helper's terminal audit).
    assert (f"stopped; finished trials stay in the study; continue with: python cli.py tune --run-dir {tmp_path} "
            "--trials 2") in capsys.readouterr().err
    # The stopped trial is in the log, summary.md and trials.csv at once, not only after a continuation.
    assert "trial 1 failed: stopped by Ctrl-C before it finished" in (tmp_path / "tune.log").read_text()
    assert "- trial 1: stopped by Ctrl-C before it finished" in (tmp_path / "summary.md").read_text()
    assert "stopped by Ctrl-C" in (tmp_path / "trials.csv").read_text()
    run_tune(load_config("quick"), study_dir=tmp_path, trials=1, objective=interrupted)
    trials = load(tmp_path).trials  # the stopped trial is retried with its parameters by the next command
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert all(t.user_attrs["seconds"] >= 0 for t in trials)  # the trial's duration, stopped or not (trials.csv)


def stopped_in_the_retry_of_trial_1(trial: optuna.Trial) -> float:
    trial.suggest_float("alpha", 0, 1)
    if trial.user_attrs.get("retry_of") == 1:
        raise KeyboardInterrupt
    return 1.0


def test_a_continuation_stopped_in_the_retry_an_earlier_command_queued_still_owes_it(tmp_path, capsys):
    # That retry is numbered below the continuation's first new trial (the stopping command queued it), and the
    # owed trials were counted from there: the continuation said --trials 1, and the study asked for 3 trials
    # ended with 2 complete (a helper's audit, also with real `cli.py tune` processes).
    with pytest.raises(KeyboardInterrupt):
        run_tune(load_config("quick"), study_dir=tmp_path, trials=3, objective=interrupted)
    assert capsys.readouterr().err.endswith(f"continue with: python cli.py tune --run-dir {tmp_path} --trials 2\n")
    with pytest.raises(KeyboardInterrupt):
        run_tune(load_config("quick"), study_dir=tmp_path, trials=2, objective=stopped_in_the_retry_of_trial_1)
    assert capsys.readouterr().err.endswith(f"continue with: python cli.py tune --run-dir {tmp_path} --trials 2\n")
    run_tune(load_config("quick"), study_dir=tmp_path, trials=2, objective=interrupted)
    states = [t.state for t in load(tmp_path).trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 2, states


def test_a_trial_stopped_on_a_shared_storage_is_retried_and_its_folder_named(tmp_path, capsys):
    # A shared database's next command cannot tell one command's stopped trial from another's, so the stopping
    # command queues the retry itself; the continue line names a folder other than the study's default (a
    # helper's PostgreSQL audit: the retry never came, and the pasted line made a second folder).
    url, folder = f"sqlite:///{tmp_path / 'shared.db'}", tmp_path / "mine"
    with pytest.raises(KeyboardInterrupt):
        run_tune(load_config("quick"), study_dir=folder, storage=url, study_name="s", trials=3, objective=interrupted)
    assert (f"continue with: python cli.py tune --storage {url} --study s --run-dir {folder} --trials 2"
            in capsys.readouterr().err)
    run_tune(load_config("quick"), study_dir=folder, storage=url, study_name="s", trials=1, objective=interrupted)
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params


def test_a_retried_trials_hparams_record_is_its_own_not_the_stopped_runs_failed_one(tmp_path, monkeypatch):
    # The stopped run's "failed" HPARAMS record stayed beside the retry's "complete": TensorBoard's HPARAMS tab
    # keeps the first record of a run, so the completed trial showed as failed.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from mamo.tune_objective import RoundReporter

    config = load_config("quick", [*TINY, "train.epochs=3", "search.pretrain_epochs=1", "search.round_epochs=1",
                                   "tune.rounds=[1, 1]", "tune.pruner=none"])
    report = RoundReporter.on_round_end

    def stopped_after_round_1(self, record):
        report(self, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(RoundReporter, "on_round_end", stopped_after_round_1)
    with pytest.raises(KeyboardInterrupt):
        run_tune(config, study_dir=tmp_path, trials=1, progress=False, pictures=False)
    monkeypatch.setattr(RoundReporter, "on_round_end", report)
    run_tune(config, study_dir=tmp_path, trials=1, progress=False, pictures=False)
    folder = tmp_path / "trial-0000"
    assert load(tmp_path).trials[1].user_attrs["run_dir"] == str(folder.resolve())
    (record,) = folder.glob("events.out.tfevents.*.hparams")
    events = EventAccumulator(str(record))
    events.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["state"].string_value == "complete"


ONE_ROUND = [*TINY, "train.epochs=3", "search.pretrain_epochs=1", "search.round_epochs=1", "tune.rounds=[1, 1]",
             "tune.pruner=none"]
QUIET = {"progress": False, "tensorboard": False}


def _killed_after_round_1(config: Config, study_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study of one trial whose command is killed after the trial's round 1 checkpoint and report. SystemExit
    out of the objective leaves the trial RUNNING as a SIGKILL does (Optuna records nothing)."""
    from mamo.tune_objective import RoundReporter

    report = RoundReporter.on_round_end

    def killed(self, record):
        report(self, record)
        raise SystemExit(137)

    with monkeypatch.context() as patch:
        patch.setattr(RoundReporter, "on_round_end", killed)
        with pytest.raises(SystemExit):
            run_tune(config, study_dir=study_dir, trials=1, **QUIET)


def test_a_trial_killed_mid_search_is_retried_from_its_checkpoint_by_the_next_command(tmp_path, monkeypatch):
    # Found by a kill sweep: a SIGKILL mid-trial left the trial RUNNING forever and the rerun never resumed it.
    from mamo.tune_study import KILLED

    config = load_config("quick", ONE_ROUND)
    run_tune(config, study_dir=tmp_path / "whole", trials=1, **QUIET)
    reference = load(tmp_path / "whole").trials[0]
    _killed_after_round_1(config, tmp_path / "cut", monkeypatch)
    assert load(tmp_path / "cut").trials[0].state == TrialState.RUNNING
    run_tune(config, study_dir=tmp_path / "cut", trials=1, **QUIET)
    killed, retry = load(tmp_path / "cut").trials
    assert killed.state == TrialState.FAIL and killed.user_attrs["fail_reason"] == KILLED
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_of"] == 0
    assert retry.params == killed.params == reference.params
    assert retry.user_attrs["run_dir"] == str((tmp_path / "cut" / "trial-0000").resolve())
    assert "resuming" in (tmp_path / "cut" / "trial-0000" / "log.txt").read_text()
    assert not (tmp_path / "cut" / "trial-0001").exists()
    assert retry.value == reference.value  # the same search, continued from its round-1 checkpoint


def test_a_copied_study_retries_its_killed_trial_in_its_own_folder_not_the_original(tmp_path, monkeypatch):
    # The storage records a trial's folder as an absolute path: continuing a copy of a study folder resumed the
    # killed trial in the folder it was copied from, writing into the original study (found by a helper).
    import shutil

    config = load_config("quick", ONE_ROUND)
    _killed_after_round_1(config, tmp_path / "original", monkeypatch)
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "original").rglob("*")}
    run_tune(config, study_dir=tmp_path / "copy", trials=1, **QUIET)
    _, retry = load(tmp_path / "copy").trials
    assert retry.user_attrs["run_dir"] == str((tmp_path / "copy" / "trial-0000").resolve())
    assert "resuming" in (tmp_path / "copy" / "trial-0000" / "log.txt").read_text()
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "original").rglob("*")} == before


def test_a_retried_trial_reports_the_rounds_before_its_checkpoint_to_the_pruner(tmp_path, monkeypatch):
    # Killed after round 1's checkpoint but before its report, the retry skipped the pruner at round 1 and was
    # pruned later with another value than the uninterrupted trial (found by a kill sweep).
    from mamo.tune_objective import RoundReporter
    from mamo.tune_space import PRUNERS

    monkeypatch.setitem(PRUNERS, "median", AlwaysPrune)
    config = load_config("quick", [*TINY, "train.epochs=3", "search.pretrain_epochs=1", "search.round_epochs=1",
                                   "tune.rounds=[1, 1]"])
    quiet = {"progress": False, "tensorboard": False}
    run_tune(config, study_dir=tmp_path / "whole", trials=1, **quiet)
    reference = load(tmp_path / "whole").trials[0]
    assert reference.state == TrialState.PRUNED

    def killed_before_reporting(self, record):
        raise SystemExit(137)

    report = RoundReporter.on_round_end
    monkeypatch.setattr(RoundReporter, "on_round_end", killed_before_reporting)
    with pytest.raises(SystemExit):
        run_tune(config, study_dir=tmp_path / "cut", trials=1, **quiet)
    monkeypatch.setattr(RoundReporter, "on_round_end", report)
    run_tune(config, study_dir=tmp_path / "cut", trials=1, **quiet)
    killed, retry = load(tmp_path / "cut").trials
    assert killed.intermediate_values == {}
    assert retry.state == TrialState.PRUNED and retry.intermediate_values == reference.intermediate_values


def draws_alpha(trial: optuna.Trial) -> float:
    return trial.suggest_float("alpha", 0, 1)


def test_a_stop_while_optuna_makes_a_trial_leaves_it_stopped_not_running(tmp_path, monkeypatch):
    # The stop's KeyboardInterrupt was raised inside study.ask(), after the trial's row was made: the trial
    # stayed RUNNING without an owner, and no command retried or failed it for a minute (ORPHAN_SECONDS).
    # Now a stop outside the objective waits for it, which records the trial as stopped before drawing.
    import signal

    from mamo.stops import stop_signals_interrupt
    from mamo.tune_space import TrialSeededTPE
    from mamo.tune_summary import STOPPED_EARLY

    making = TrialSeededTPE.before_trial

    def stopped_while_making(self, study, trial):
        if trial.number == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside study.ask()
        making(self, study, trial)

    monkeypatch.setattr(TrialSeededTPE, "before_trial", stopped_while_making)
    with stop_signals_interrupt(), pytest.raises(KeyboardInterrupt):  # as the CLI runs every command
        run_tune(load_config("quick"), study_dir=tmp_path, trials=3, objective=draws_alpha)
    first, second = load(tmp_path).trials
    assert first.state == TrialState.COMPLETE and second.state == TrialState.FAIL
    assert second.user_attrs["fail_reason"] == STOPPED_EARLY and second.params == {}  # nothing drawn: not retried
    assert "trial 1 failed: stopped before its objective started" in (tmp_path / "tune.log").read_text()


def killed_before_drawing(trial: optuna.Trial) -> float:
    raise SystemExit(137)


def test_a_trial_killed_before_drawing_is_not_retried_and_leaves_the_draws_as_they_were(tmp_path):
    config = load_config("quick")
    run_tune(config, study_dir=tmp_path / "whole", trials=2, objective=draws_alpha)
    with pytest.raises(SystemExit):
        run_tune(config, study_dir=tmp_path / "cut", trials=2, objective=killed_before_drawing)
    run_tune(config, study_dir=tmp_path / "cut", trials=2, objective=draws_alpha)
    killed, *drawn = load(tmp_path / "cut").trials
    assert killed.state == TrialState.FAIL and killed.params == {} and "retry_of" not in drawn[0].user_attrs
    assert [t.params for t in drawn] == [t.params for t in load(tmp_path / "whole").trials]
    assert "trial 0 failed: its command was killed before the trial drew its parameters" in (
        tmp_path / "cut" / "tune.log").read_text()


def test_a_command_killed_between_queueing_a_retry_and_failing_the_trial_still_retries_it_once(tmp_path):
    from mamo.tune_study import retry_interrupted
    from mamo.tune_workers import TrialLine

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    trial = study.ask()
    trial.set_user_attr("owner", dead_owner())
    trial.suggest_float("alpha", 0, 1)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": 0})  # the first half of an earlier retry
    retry_interrupted(study, TrialLine(tmp_path / "tune.log"))
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # failed now, and queued once, not twice


def test_a_retry_killed_before_it_drew_its_parameters_is_queued_again_with_them(tmp_path):
    # A retry popped from the queue and killed before its objective asked for the queued parameters has none of
    # its own: it was failed as "killed before the trial drew its parameters" and never retried, so the
    # parameters of trial 0 were never finished (a helper's scenario with SIGKILLed workers).
    from mamo.tune_study import retry_interrupted
    from mamo.tune_workers import TrialLine

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    trial = study.ask()
    trial.suggest_float("alpha", 0, 1)
    study.tell(trial, state=TrialState.FAIL)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": 0})  # trial 0 stopped, its retry queued
    retry = study.ask()  # the retry, popped from the queue and killed before it drew anything
    retry.set_user_attr("owner", dead_owner())
    retry_interrupted(study, TrialLine(tmp_path / "tune.log"))
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]
    assert trials[2].user_attrs["retry_of"] == 0  # continues trial 0's folder, with its parameters
    assert trials[2].system_attrs["fixed_params"] == trials[0].params
    retry_interrupted(study, TrialLine(tmp_path / "tune.log"))  # once
    assert len(study.trials) == 3


def dead_owner() -> str:
    """The owner record of a process of this machine that has exited."""
    import subprocess

    from mamo.cache import process_owner

    host, _, namespace = process_owner().split()
    gone = subprocess.Popen(["true"])
    gone.wait()
    return f"{host} {gone.pid} {namespace}"


def test_a_running_trial_is_retried_only_when_its_command_is_gone(tmp_path, monkeypatch):
    # A second command joining a local study took the first one's running trial for a killed one: it failed
    # it, ran its retry in the same folder, and the first command crashed ("Cannot tell a FAIL trial").
    import subprocess

    from mamo import tune_study
    from mamo.cache import process_owner
    from mamo.tune_workers import TrialLine

    host, _, namespace = process_owner().split()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
        owners = {"another command, running": f"{host} {alive.pid} {namespace}", "a killed command": dead_owner(),
                  "an earlier command of this process": process_owner(),
                  "another machine": f"elsewhere {alive.pid} {namespace}", "nobody yet": None}
        for owner in owners.values():
            trial = study.ask()
            trial.suggest_float("alpha", 0, 1)
            if owner is not None:
                trial.set_user_attr("owner", owner)
        tune_study.retry_interrupted(study, TrialLine(tmp_path / "tune.log"))
        states = dict(zip(owners, (t.state for t in study.trials[: len(owners)]), strict=True))
        assert states == {"another command, running": TrialState.RUNNING, "a killed command": TrialState.FAIL,
                          "an earlier command of this process": TrialState.FAIL,
                          "another machine": TrialState.RUNNING,  # left to the heartbeat
                          "nobody yet": TrialState.RUNNING}  # made a moment ago: its objective is starting
        assert [t.user_attrs["retry_of"] for t in study.trials[len(owners):]] == [1, 2]
        monkeypatch.setattr(tune_study, "ORPHAN_SECONDS", -1.0)  # now a minute later, still without an owner
        tune_study.retry_interrupted(study, TrialLine(tmp_path / "tune.log"))
        assert study.trials[4].state == TrialState.FAIL and study.trials[-1].user_attrs["retry_of"] == 4
    finally:
        alive.kill()
        alive.wait()


@pytest.fixture
def central_european_clock(monkeypatch):
    # A POSIX rule, so no time-zone database is needed: CET, summer time from March's last Sunday 02:00 to
    # October's last Sunday 03:00.
    monkeypatch.setenv("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_an_ownerless_trial_s_age_counts_real_seconds_across_a_change_of_the_clocks(central_european_clock):
    # Optuna records a trial's start as naive local time; compared as such with the clock after it went forward,
    # a trial made 40 s earlier looked an hour old, and a retry failed the live trial of another command.
    from mamo.tune_study import trial_age_seconds

    just_before_forward = datetime(2026, 3, 29, 1, 59, 30)  # local; 03:00:10 CEST after the jump
    assert trial_age_seconds(just_before_forward, datetime(2026, 3, 29, 1, 0, 10, tzinfo=UTC)) == 40.0
    twice = datetime(2026, 10, 25, 2, 30)  # local 02:30 happens at 00:30 and at 01:30 UTC: read as the later
    assert trial_age_seconds(twice, datetime(2026, 10, 25, 1, 30, 20, tzinfo=UTC)) == 20.0
    assert trial_age_seconds(twice, datetime(2026, 10, 25, 0, 30, 20, tzinfo=UTC)) < 0  # young, never failed
    assert trial_age_seconds(datetime(2026, 7, 1, 12, 0), datetime(2026, 7, 1, 10, 2, tzinfo=UTC)) == 120.0


def test_each_trial_draws_from_the_seed_and_its_place_so_two_commands_draw_apart(tmp_path):
    # Two commands on one local study used to seed their samplers alike and drew every trial twice.
    from mamo.tune_space import TrialSeededTPE

    def draw(study: optuna.Study) -> optuna.Trial:
        trial = study.ask()
        trial.suggest_float("alpha", 0, 1)
        return trial

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    alone = optuna.create_study(storage=storage, study_name="alone", sampler=TrialSeededTPE(7))
    sequential = []
    for _ in range(3):
        trial = draw(alone)
        alone.tell(trial, trial.params["alpha"])
        sequential.append(trial.params["alpha"])
    # Two commands, each with its own sampler of the same seed, with trials running at the same time.
    optuna.create_study(storage=storage, study_name="shared")
    first, second = (optuna.load_study(study_name="shared", storage=storage, sampler=TrialSeededTPE(7))
                     for _ in range(2))
    together = [draw(first), draw(second), draw(first)]
    drawn = [trial.params["alpha"] for trial in together]
    assert len(set(drawn)) == 3
    assert drawn == sequential  # the same draws as one command's, trial by trial
    unseeded = optuna.create_study(storage=storage, study_name="unseeded", sampler=TrialSeededTPE(None))
    assert draw(unseeded).params["alpha"] not in sequential


def test_tickets_count_exactly_across_processes_and_in_one(tmp_path):
    import multiprocessing

    from mamo.tune_workers import Tickets

    local = Tickets(2)
    assert [local.take() for _ in range(4)] == [True, True, False, False]
    shared = Tickets(2**32 + 1, multiprocessing.get_context("spawn"))  # a C int wrapped this around to 1
    assert shared.take() and shared.take()
    assert Tickets(0, multiprocessing.get_context("spawn")).take() is False


def test_a_trial_failed_by_its_stopped_heartbeat_is_retried_with_its_parameters(tmp_path):
    # On a shared database the trial of a killed worker is failed by Optuna after the heartbeat's grace period;
    # the storage's callback queues it again, which any worker on the study then runs.
    from mamo.tune_storage import retry_stale

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert storage.get_heartbeat_stale_trial_callback() is retry_stale
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    trial.suggest_float("alpha", 0, 1)
    study.tell(trial, state=TrialState.FAIL)
    retry_stale(study, study.trials[0])
    study.optimize(lambda t: t.suggest_float("alpha", 0, 1), n_trials=1)
    assert study.trials[1].params == study.trials[0].params and study.trials[1].user_attrs["retry_of"] == 0


def test_a_bug_in_the_objective_stops_the_study(tmp_path):
    with pytest.raises(ZeroDivisionError):
        run_tune(load_config("quick"), study_dir=tmp_path, trials=3, objective=buggy)
    assert [t.state for t in load(tmp_path).trials] == [TrialState.FAIL]


# The last four crashed: ValueError from the URL parser, or (in memory) Optuna's "no such table" after the
# reference had trained, leaving the study folder.
@pytest.mark.parametrize("url", ["postgresql://127.0.0.1:1/x", "postgresql://mamo:secret@127.0.0.1:1/x",
                                 "not a url", "postgresql://mamo:secret@host:abc/db", "postgresql://[::1:5432/db",
                                 "sqlite:///", "sqlite:///:memory:"])
def test_bad_storage_url_is_one_sentence(tmp_path, capsys, url):
    code = main(["tune", "quick", "--trials", "1", "--storage", url, "--study", "s", "--run-dir",
                 str(tmp_path / "study")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("mamo: error: ") and err.count("\n") == 0 and err.endswith(".")
    assert "secret" not in err
    assert not (tmp_path / "study").exists()  # nothing is written before the storage answers


def test_a_damaged_study_db_is_not_blamed_on_permissions(tmp_path, capsys):
    # Before: "could not be opened (file is not a database); make the study folder writable, ...".
    from cli_errors import single_error

    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.db").write_bytes(b"not a database at all; " * 200)
    assert main(["tune", "quick", "--trials", "1", "--run-dir", str(tmp_path / "study")]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"storage sqlite:///{(tmp_path / 'study' / 'study.db').resolve()} is a damaged database (file is not a "
        "database); restore it from a copy, or start the study in another folder (--run-dir) or database "
        "(--storage).")


def test_two_commands_setting_up_one_study_at_once_retry_then_are_told_to_run_again(tmp_path, monkeypatch):
    # Optuna's table creation raced: "could not be opened (table studies already exists); start the database".
    from sqlalchemy.exc import OperationalError

    def racing(*args, **kwargs):
        raise OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))

    real, calls = optuna.storages.RDBStorage, []

    def racing_once(*args, **kwargs):  # the other command made the tables meanwhile: the retry opens them
        calls.append(1)
        return racing() if len(calls) == 1 else real(*args, **kwargs)

    monkeypatch.setattr("mamo.tune_storage.time.sleep", lambda seconds: None)
    monkeypatch.setattr(optuna.storages, "RDBStorage", racing_once)
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'study.db'}"), real) and len(calls) == 2
    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    with pytest.raises(MamoError, match=r"was being set up by another command at the same moment \(table studies "
                                        r"already exists\); run this command again to join the study\."):
        open_storage(f"sqlite:///{tmp_path / 'study.db'}")


def test_of_two_tunes_started_on_one_folder_only_one_created_it(tmp_path, monkeypatch):
    # Both saw no folder and both "created" it; the one that then failed removed it under the other's study.db.
    from mamo.tune import _study_dir

    folder = tmp_path / "study"
    folder.mkdir()  # made by the other command between this one's look and its mkdir
    monkeypatch.setattr(Path, "exists", lambda self: False if self == folder else Path.is_file(self) or
                        Path.is_dir(self))
    assert _study_dir(folder, None, "s", load_config("quick")) == (folder, False)


@pytest.mark.parametrize(("override", "expected"), [
    ("direction.name=x", "unknown direction 'x'"),
    ("search.threshold=foo", "unknown search.threshold 'foo'"),
    ("train.lr=-1", "train.lr must be a number in (0, 3.403e+38]"),
    ("model.backbone=vgg", "unknown backbone 'vgg'"),
    ("model.backbone=timm:resnet1800", "unknown timm model 'resnet1800'"),
    ("model.latent=0", "model.latent is 0"),
    ("search.round_epochs=0", "search.round_epochs"),  # fine at tune.rounds' low end 0, not at its high end 5
])
def test_a_setting_the_space_ends_fail_on_is_one_sentence_before_the_study(tmp_path, capsys, override, expected):
    # Before: the study started and each trial failed on it; the folder and its study.yaml stayed behind.
    code = main(["tune", "quick", "--trials", "2", "--set", override, "--run-dir", str(tmp_path / "study"),
                 "--no-progress"])
    captured = capsys.readouterr()
    # Before: a bad backbone was found once STL started building, after the data loaded and a progress line.
    assert captured.out == "" and captured.err.count("\n") == 1
    assert code == 2 and captured.err.startswith("mamo: error: ") and expected in captured.err
    assert not (tmp_path / "study").exists()


def test_a_study_stopped_while_its_reference_trained_continues_with_its_own_preset(tmp_path, monkeypatch):
    # Killed before the study existed in the storage, a quick study left only study.yaml; continuing it without
    # naming the preset made it a MultiMNIST study (the default preset) and rewrote study.yaml (found by a helper).
    import mamo.tune

    folder = tmp_path / "study"
    with monkeypatch.context() as patch:
        patch.setattr(mamo.tune, "_reference", lambda *args, **kwargs: (_ for _ in ()).throw(SystemExit(137)))
        with pytest.raises(SystemExit):
            main(["tune", "quick", *(f"--set={s}" for s in [*TINY, "tune.rounds=[1, 1]"]), "--trials", "1",
                  "--run-dir", str(folder), "--no-progress", "--no-tensorboard"])
    assert load_config(str(folder / "study.yaml")).name == "quick" and not (folder / "study-id.json").exists()
    assert main(["tune", "--trials", "1", "--run-dir", str(folder), "--no-progress", "--no-tensorboard"]) == 0
    assert load_config(str(folder / "study.yaml")).name == "quick"
    trial = load(folder).trials[0]
    assert trial.params["rounds"] == 1
    assert load_config(str(folder / "trial-0000" / "config.yaml")).data.train_size == 128


def test_a_ctrl_c_while_the_reference_trains_prints_the_command_with_its_trials(tmp_path, monkeypatch, capsys):
    # It printed "tune --run-dir DIR" alone, which then ran the study's 20 trials where 2 were asked (a docs check).
    import mamo.tune

    monkeypatch.setattr(mamo.tune, "_reference", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["tune", "quick", "--trials", "2", "--run-dir", str(tmp_path / "study"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert ("stopped while setting the study up (what the reference trained is kept); continue with: python cli.py "
            f"tune --run-dir {tmp_path / 'study'} --trials 2") in err
    # Said before the reference's minutes of training: a mistyped --run-dir made a new study without a word.
    assert err.startswith(f"new study 'mamo' of preset 'quick' in {tmp_path / 'study'}: its STL reference first, "
                          "from which each trial's Δ is counted\n"), err


def test_a_moved_study_reads_its_own_trial_folders_not_the_paths_the_storage_recorded(tmp_path):
    # The storage keeps each trial's folder as an absolute path: after a move, best.yaml was built from
    # whatever config.yaml lay at the old path (another study's there), and summary.md pointed at it.
    import csv
    import shutil

    config = load_config("quick", [*TINY, "tune.rounds=[0, 0]", "tune.T=null", "tune.alpha=null"])
    run_tune(config, study_dir=tmp_path / "old", trials=1, progress=False, tensorboard=False)
    shutil.move(tmp_path / "old", tmp_path / "new")
    stranger = tmp_path / "old" / "trial-0000"  # another run at the old path
    stranger.mkdir(parents=True)
    dump_config(load_config("quick", ["train.lr=0.5"]), stranger / "config.yaml")
    run_tune(config, study_dir=tmp_path / "new", trials=0, progress=False, tensorboard=False)
    ran = load_config(str(tmp_path / "new" / "trial-0000" / "config.yaml"))
    assert load_config(str(tmp_path / "new" / "best.yaml")).train.lr == ran.train.lr != 0.5
    summary = (tmp_path / "new" / "summary.md").read_text()
    assert str(tmp_path / "new" / "trial-0000") in summary and str(stranger) not in summary
    (row,) = csv.DictReader((tmp_path / "new" / "trials.csv").open())
    assert row["run_dir"] == str((tmp_path / "new" / "trial-0000").resolve())


def test_a_diverged_trial_is_recorded_with_its_reason_and_in_the_hparams_tab(tmp_path):
    # The learning rate is sampled in the trial, so only training finds that it diverges.
    config = load_config("quick", [*TINY, "tune.lr=[1e29, 1e30]", "tune.rounds=[0, 0]"])
    result = run_tune(config, study_dir=tmp_path, trials=1, progress=False, pictures=False)
    assert result["states"]["fail"] == 1
    trial = load(tmp_path).trials[0]
    reason = trial.user_attrs["fail_reason"]
    assert reason.startswith("TrainingDiverged: training '") and " diverged at step " in reason
    assert "lower train.lr (now " in reason
    # Before: a failed trial had no HPARAMS record. It reported no round, so it has parameters but no values.
    hparams, status, columns, values = hparams_record(tmp_path / "trial-0000")
    assert hparams == {**trial.params, "state": "failed"} and status == "STATUS_FAILURE"
    assert values == {}
    assert columns == [c for c in HPARAMS_COLUMNS if c not in ("tune/delta", "tune/win_rate")]  # tune.lr: no baselines


def test_a_trial_without_baselines_of_its_own_logs_delta_against_the_studys_reference(tmp_path):
    # A sampled lr turns the trial's own baselines off; its events had no Δ, though the study has a reference.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config("quick", [*TINY, "tune.lr=[0.01, 0.02]", "tune.rounds=[1, 1]"])
    run_tune(config, study_dir=tmp_path, trials=1, progress=False, pictures=False)
    trial = load(tmp_path).trials[0]
    events = EventAccumulator(str(tmp_path / "trial-0000"), size_guidance={"scalars": 0})
    events.Reload()
    epochs = [e.step for e in events.Scalars("val/loss/left")]
    logged = {e.step: e.value for e in events.Scalars("val/delta_vs_stl")}
    assert sorted(logged) == epochs and len(epochs) == 3  # pretraining, the round, the final phase
    assert trial.value == pytest.approx(logged[epochs[-1]], abs=1e-6)  # the final epoch is the one kept
    (round_delta,) = events.Scalars("search/val_delta_vs_stl")
    assert round_delta.value == pytest.approx(logged[round_delta.step], abs=1e-6)


def test_a_bad_base_setting_the_tuned_space_replaces_is_no_error(tmp_path):
    config = load_config("quick", [*TINY, "direction.name=x", "tune.direction=[equal]", "tune.rounds=[0, 0]"])
    result = run_tune(config, study_dir=tmp_path, trials=1, progress=False, tensorboard=False)
    assert result["states"]["complete"] == 1


def test_a_refused_join_keeps_the_baselines_it_trained(tmp_path, tiny):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    run_tune(load_config("quick"), storage=url, study_name="s", study_dir=tmp_path / "a", trials=1,
             objective=staircase)
    # A study of a caller's objective, joined by a search: told apart only once the reference has trained (a
    # join with or without --multi-objective against the study is refused before, tests/test_tune_multi.py).
    with pytest.raises(MamoError, match="optimises"):
        run_tune(tiny, study_dir=tmp_path / "b", storage=url, study_name="s", trials=0, progress=False)
    assert list((tmp_path / "b" / ".baselines").glob("*.json"))  # the folder made for the join is not removed


def test_a_start_that_failed_in_an_existing_folder_does_not_leave_its_config_to_the_retry(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()  # made by the user: kept on failure, with the failed start's study.yaml in it
    with pytest.raises(MamoError, match="unknown backbone"):
        run_tune(load_config("quick", [*TINY, "model.backbone=vgg"]), study_dir=folder, trials=1, progress=False)
    assert not (folder / "study-id.json").exists()  # the failed start claimed nothing: free for any study
    run_tune(load_config("quick", TINY), study_dir=folder, study_name="retry", trials=0, progress=False)
    assert load_config(str(folder / "study.yaml")).model.backbone == "lenet"
    assert json.loads((folder / "study-id.json").read_text())["study"] == "retry"


def test_a_folder_holding_one_study_refuses_another(tmp_path):
    folder = tmp_path / "study"
    run_tune(load_config("quick"), study_dir=folder, study_name="a", trials=1, objective=staircase)
    # Before: study b's trial numbers restarted at 0 in a's folder (trial-0000 was taken), and its config
    # replaced study.yaml, which a's next join then ran with.
    with pytest.raises(MamoError, match=f"^{folder} holds study 'a', not 'b'; pass a new --run-dir"):
        run_tune(load_config("quick", ["train.lr=0.005"]), study_dir=folder, study_name="b", trials=1,
                 objective=staircase)
    assert optuna.get_all_study_names(f"sqlite:///{folder / 'study.db'}") == ["a"]
    assert load_config(str(folder / "study.yaml")).train.lr == load_config("quick").train.lr
    # A study of the same name in another storage is another study too: its trial numbers start at 0 as well.
    with pytest.raises(MamoError, match="holds a study 'a' of another storage"):
        run_tune(load_config("quick"), study_dir=folder, storage=f"sqlite:///{tmp_path / 'other.db'}",
                 study_name="a", trials=1, objective=staircase)
    assert [t.number for t in load(folder, "a").trials] == [0]


def test_two_tunes_started_in_the_same_second_get_their_own_default_folders(tmp_path, monkeypatch):
    import mamo.tune

    monkeypatch.setattr(mamo.tune, "RUNS_ROOT", tmp_path)
    monkeypatch.setattr(mamo.tune.time, "strftime", lambda fmt: "20261124-120000")
    # Before: both took runs/tune-<second>-quick; the second joined the first's study.db and folder.
    for _ in range(2):
        run_tune(load_config("quick"), trials=1, objective=staircase)
    folders = sorted(path.name for path in tmp_path.iterdir())
    assert folders == ["tune-20261124-120000-quick", "tune-20261124-120000-quick-2"]
    assert [len(load(tmp_path / name).trials) for name in folders] == [1, 1]


def test_joining_a_study_takes_its_configuration_from_the_storage_not_from_study_yaml(tmp_path):
    folder = tmp_path / "study"
    run_tune(load_config("quick"), study_dir=folder, study_name="a", trials=1, objective=staircase)
    created_with = load_config("quick").train.lr
    # What a second study's start wrote here before it was refused (or an edit by hand).
    (folder / "study.yaml").write_text((folder / "study.yaml").read_text().replace(f"lr: {created_with}", "lr: 0.005"))
    assert load_config(str(folder / "study.yaml")).train.lr == 0.005
    run_tune(load_config("quick"), study_dir=folder, study_name="a", trials=1, objective=staircase)
    assert load_config(str(folder / "study.yaml")).train.lr == created_with
    assert load_config(str(folder / "best.yaml")).train.lr == created_with


def test_storage_needs_a_study_name(tmp_path):
    with pytest.raises(MamoError, match="--study"):
        run_tune(load_config("quick"), study_dir=tmp_path, storage="sqlite:///x.db", trials=1, objective=buggy)


def test_two_sqlite_workers_share_the_trials(tmp_path, monkeypatch):
    (tmp_path / "barrier").mkdir()
    monkeypatch.setenv("MAMO_TEST_BARRIER", str(tmp_path / "barrier"))  # read by the worker processes
    study = tmp_path / "study"
    # The largest sampler seed: worker 1's seed wraps around to 0 (it used to be 2**32, which TPE refuses).
    config = load_config("quick", [f"train.seed={2**32 - 1}"])
    run_tune(config, study_dir=study, trials=6, workers=2, objective=which_process)
    trials = load(study).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2
    assert os.getpid() not in {t.user_attrs["pid"] for t in trials}


SIGTERM_SCRIPT = """
import sys

from mamo.stops import stop_signals_interrupt
from mamo.config import load_config
from mamo.errors import StopExplained
from mamo.tune import run_tune
from test_tune import parked_alpha

if __name__ == "__main__":  # spawned workers import this file again
    try:
        with stop_signals_interrupt():  # as mamo.cli.main runs every command
            run_tune(load_config("quick"), study_dir=sys.argv[1], trials=40, workers=2, objective=parked_alpha)
    except StopExplained:  # the stop line is printed: the CLI adds nothing
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(129)
"""


def _two_workers_in_trials(tmp_path: Path):
    """SIGTERM_SCRIPT's study in a process of its own, returned once both its workers are inside a trial."""
    import subprocess
    import sys

    script, study, barrier = tmp_path / "study.py", tmp_path / "study", tmp_path / "barrier"
    script.write_text(SIGTERM_SCRIPT)
    barrier.mkdir()
    paths = [str(Path(__file__).parent), str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "MAMO_TEST_BARRIER": str(barrier)}
    process = subprocess.Popen([sys.executable, str(script), str(study)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(barrier.iterdir())) < 2:
        time.sleep(0.05)
    return process, study


def test_a_tune_stopped_by_sigterm_stops_its_workers_and_records_their_trials(tmp_path):
    # Before: the parent died at once, its workers ran the study on without it, and no summary was written.
    import signal

    from mamo.tune_workers import STOPPED

    process, study = _two_workers_in_trials(tmp_path)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "stopped; finished trials stay in the study" in err
    assert "Traceback" not in err and "leaked" not in err and "Exception ignored" not in err
    trials = load(study).trials
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 2 and all(t.user_attrs["fail_reason"] == STOPPED and "alpha" in t.params for t in stopped)
    retries = [t for t in trials if t.state == TrialState.WAITING]  # queued for the next command
    assert len(stopped) + len(retries) == len(trials)  # nothing left running
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(t.number for t in stopped)
    pids = {t.user_attrs["pid"] for t in stopped}
    assert len(pids) == 2
    for pid in pids:  # no worker outlives the command
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "running" not in (study / "summary.md").read_text()  # written after the workers recorded theirs


def test_a_second_stop_that_kills_the_workers_still_owes_their_trials(tmp_path):
    # A second stop within the first one's 2 s SIGKILLs the workers (a double Ctrl-C, a batch system's second
    # SIGTERM): their trials, left running, are failed as killed and retried, but only the "stopped" ones were
    # counted as owed, so the line said --trials 38 of 40 (and 2 of 4 with real `cli.py tune` processes).
    import signal

    from mamo.tune_study import KILLED

    process, study = _two_workers_in_trials(tmp_path)
    process.send_signal(signal.SIGTERM)  # the workers get no signal: the command waits 2 s for them first
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    # On the stopped command's two workers: the continue line said nothing of them, so it ran one.
    assert err.endswith(f"continue with: python cli.py tune --run-dir {study} --trials 40 --workers 2\n"), err
    trials = load(study).trials
    assert [t.user_attrs.get("fail_reason") for t in trials if t.state == TrialState.FAIL] == [KILLED] * 2
    assert [t.state for t in trials].count(TrialState.WAITING) == 2  # their retries


def test_a_stopped_command_kills_the_workers_a_signal_does_not_stop(monkeypatch):
    import multiprocessing

    from mamo import tune_workers

    monkeypatch.setattr(tune_workers, "STOP_WAITS", (0.2, 0.5))
    context = multiprocessing.get_context("spawn")
    ready = context.Semaphore(0)
    stuck = [context.Process(target=deaf_sleeper, args=(ready,)) for _ in range(2)]
    for process in stuck:
        process.start()
    assert all(ready.acquire(timeout=60) for _ in stuck)
    started = time.monotonic()
    tune_workers._stop_workers(stuck)
    assert [process.exitcode for process in stuck] == [-9, -9] and time.monotonic() - started < 30


def test_a_dropped_stop_is_not_reported_but_other_unraisable_errors_are():
    import types

    from mamo.stops import STOP_REQUESTED, hide_dropped_stops

    seen = []
    hook = hide_dropped_stops(seen.append)
    dropped = types.SimpleNamespace(exc_value=KeyboardInterrupt())
    other = types.SimpleNamespace(exc_value=ValueError("a real one"))
    STOP_REQUESTED.set()
    try:
        hook(dropped)
        hook(other)
    finally:
        STOP_REQUESTED.clear()
    hook(dropped)  # a KeyboardInterrupt with no stop requested is reported
    assert seen == [other, dropped]


def test_a_stop_requested_between_trials_ends_the_study_as_ctrl_c(tmp_path):
    from mamo.stops import STOP_REQUESTED

    run_tune(load_config("quick"), study_dir=tmp_path, trials=1, objective=draws_alpha)
    STOP_REQUESTED.set()  # a stop signal whose KeyboardInterrupt Python dropped
    try:
        with pytest.raises(KeyboardInterrupt):
            run_tune(load_config("quick"), study_dir=tmp_path, trials=3, objective=draws_alpha)
    finally:
        STOP_REQUESTED.clear()
    assert len(load(tmp_path).trials) == 1  # no trial started after the stop


def test_a_tune_stopped_in_a_python_session_does_not_stop_the_next_run_there(tmp_path):
    # The stop's flag stayed set after run_tune returned: every later run_tune or run_search of the session
    # stopped at once (the CLI's wrapper cleared it, the Python API did not).
    import signal

    from mamo.errors import StopExplained
    from mamo.stops import STOP_REQUESTED

    def stops_itself(trial: optuna.Trial) -> float:
        trial.suggest_float("alpha", 0, 1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the stop interrupts this
        return 0.0

    with pytest.raises(StopExplained):
        run_tune(load_config("quick"), study_dir=tmp_path / "stopped", trials=2, objective=stops_itself)
    assert not STOP_REQUESTED.is_set()
    run_tune(load_config("quick"), study_dir=tmp_path / "next", trials=2, objective=draws_alpha)
    assert [t.state for t in load(tmp_path / "next").trials] == [TrialState.COMPLETE] * 2


def test_a_stop_inside_a_storage_call_waits_for_it_and_the_stopped_trial_is_recorded_at_once(tmp_path, monkeypatch):
    # A stop raised between a SELECT's execute and its fetch (here: trial.study.get_trials, as a pruner reads
    # the study) left that statement open, pinned by the KeyboardInterrupt's traceback, and with it a SQLite
    # read lock: the worker's own record of its stopped trial then waited the whole busy timeout (60 s, so the
    # command SIGKILLed the worker) and failed with "database is locked".
    import signal

    from sqlalchemy import event

    from mamo import tune_storage
    from mamo.errors import StopExplained
    from mamo.stops import STOP_REQUESTED
    from mamo.tune_workers import STOPPED

    monkeypatch.setitem(tune_storage.ENGINE_ARGS, "sqlite", {"connect_args": {"timeout": 1}})

    def stopped_in_a_select(trial: optuna.Trial) -> float:
        engine, sent = trial.study._storage._backend.engine, []

        def stop(conn, cursor, statement, *args):
            if not sent and statement.lstrip().upper().startswith("SELECT"):
                sent.append(statement)
                signal.raise_signal(signal.SIGINT)  # Ctrl-C, with the SELECT's first row stepped, none fetched
                for _ in range(10):  # the handler runs here, inside the storage call
                    pass

        trial.suggest_float("alpha", 0, 1)
        event.listen(engine, "after_cursor_execute", stop)
        try:
            trial.study.get_trials(deepcopy=False)
        finally:
            event.remove(engine, "after_cursor_execute", stop)
        assert sent
        for _ in range(1000):  # the trainer's steps, which raise a requested stop
            if STOP_REQUESTED.is_set():
                raise KeyboardInterrupt
            time.sleep(0.01)
        return 0.0

    started = time.monotonic()
    with pytest.raises(StopExplained):
        run_tune(load_config("quick"), study_dir=tmp_path, trials=2, objective=stopped_in_a_select)
    assert time.monotonic() - started < 30
    stopped, retry = load(tmp_path).trials  # the retry queued for the next command
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == STOPPED
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == stopped.number


def test_a_tune_leaves_optunas_logging_and_the_warning_filters_as_it_found_them(tmp_path):
    # run_tune set Optuna's verbosity to ERROR and added an ignore filter for good.
    import warnings

    optuna.logging.set_verbosity(optuna.logging.INFO)
    filters = list(warnings.filters)
    try:
        run_tune(load_config("quick"), study_dir=tmp_path, trials=1, objective=draws_alpha)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
        assert warnings.filters == filters
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_a_worker_takes_signals_as_ctrl_c_in_the_objective_until_it_records_its_stopped_trial():
    import signal

    from mamo.stops import STOP_REQUESTED
    from mamo.tune_workers import WorkerStop

    stop = WorkerStop()
    try:
        stop(signal.SIGTERM, None)  # outside the objective (Optuna making or telling a trial): requested only
        assert STOP_REQUESTED.is_set()
        with pytest.raises(KeyboardInterrupt):  # a second stop there does not wait (a storage call stuck, say)
            stop(signal.SIGINT, None)
        STOP_REQUESTED.clear()
        stop.armed = True
        with pytest.raises(KeyboardInterrupt):
            stop(signal.SIGTERM, None)
        assert STOP_REQUESTED.is_set()
        stop.recording = True
        stop(signal.SIGTERM, None)  # the parent's SIGTERM after the terminal's Ctrl-C: ignored, the record goes on
    finally:
        STOP_REQUESTED.clear()


def test_a_retry_clears_the_folder_its_stopped_trial_left_only_a_record_in(tmp_path):
    # A trial stopped before its search wrote config.yaml left its HPARAMS record alone in its folder, and every
    # retry failed there: "run folder ... already exists and is not empty".
    from mamo.tune_objective import _clear_records

    records = tmp_path / "records"
    records.mkdir()
    (records / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    _clear_records(records)
    assert records.is_dir() and not list(records.iterdir())
    other = tmp_path / "other"
    other.mkdir()
    (other / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    (other / "notes.txt").write_text("a user's")
    _clear_records(other)
    assert len(list(other.iterdir())) == 2  # anything else is left, and the retry says why it cannot run there


def test_trials_at_the_same_point_of_the_front_share_one_label(tmp_path, monkeypatch):
    # Two tied trials' numbers were drawn one over the other (a helper's look at pareto.png).
    from matplotlib.axes import Axes

    from mamo.tune_summary import plot_pareto

    study = optuna.create_study(directions=["maximize", "maximize"])
    with warnings.catch_warnings():  # experimental in Optuna, as mamo's own call (tune_study) knows
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["left.accuracy", "right.accuracy"])
    for values in ([0.5, 0.4], [0.5, 0.4], [0.3, 0.6], [0.2, 0.2]):
        study.add_trial(optuna.trial.create_trial(values=values))
    labels = []
    drawn = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, *args, **kwargs: labels.append(args[-1]) or drawn(self, *args,
                                                                                                     **kwargs))
    plot_pareto(study, tmp_path / "pareto.png")
    assert sorted(labels) == [" 0, 1", " 2"]


def test_multi_objective_reports_the_pareto_front(tmp_path, tiny):
    result = run_tune(tiny, study_dir=tmp_path, trials=5, multi_objective=True, objective=two_accuracies)
    study = load(tmp_path)
    assert study.metric_names == ["left.accuracy", "right.accuracy"]
    assert sorted(t.number for t in study.best_trials) == [0, 1, 2, 3]
    table = [line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in table[1:]] == ["| 0", "| 1", "| 2", "| 3"]
    assert (tmp_path / "pareto.png").stat().st_size > 5000
    assert result["best"] in (0, 1, 2, 3)


def test_quick_study_on_sqlite_end_to_end(tmp_path, capsys):
    study_dir = tmp_path / "study"
    args = ["tune", "quick", "--trials", "3", "--run-dir", str(study_dir), "--no-progress"]
    assert main([*args, *(x for o in TINY for x in ("--set", o))]) == 0
    captured = capsys.readouterr()
    out = captured.err  # progress, trial lines included, goes to stderr; stdout holds the summary alone
    # TINY fixes search.final_epochs while Z varies: the trials' budgets differ from the STL reference's.
    assert "search.final_epochs = 1 is fixed, so a trial with more rounds trains longer" in captured.err
    study = load(study_dir)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert sum(line.startswith(("trial 0 ", "trial 1 ", "trial 2 ")) for line in out.splitlines()) == 3
    # Without bars each trial's epochs are lines naming it (a piped or --no-progress study was silent in between).
    assert "\ntrial 0: pretrain epoch 1/1: val left loss " in out
    assert not [line for line in captured.out.splitlines() if line.startswith(("trial ", "study "))]
    assert all(t.state == TrialState.COMPLETE for t in study.trials), out  # the pruner waits for 3 trials
    best = max(study.trials, key=lambda t: t.value)
    summary = (study_dir / "summary.md").read_text()
    assert "| trial | val_delta | test Δ | win | T | alpha | rounds |" in summary
    assert f"trial-{best.number:04d}" in summary
    # The win rate reads as report.md writes it, a percentage (the summary showed 0.3333 beside report.md's 33%).
    best_row = next(line for line in summary.splitlines() if line.startswith(f"| {best.number} |"))
    assert f"| {best.user_attrs['win_rate']:.0%} |" in best_row
    assert f"| {best.user_attrs['params']:,} |" in best_row  # as report.md and show write a count (56868 was bare)
    assert (study_dir / f"trial-{best.number:04d}" / "weights.safetensors").is_file()
    for trial in study.trials:
        assert (study_dir / f"trial-{trial.number:04d}" / "report.md").is_file()
        hparams, status, columns, values = hparams_record(study_dir / f"trial-{trial.number:04d}")
        assert hparams == {**trial.params, "state": "complete"} and status == "STATUS_SUCCESS"
        assert values["tune/val_delta"] == pytest.approx(trial.value, abs=1e-4)
        assert values["tune/gmk_modules"] == trial.user_attrs["gmk_modules"]
        assert columns == HPARAMS_COLUMNS
    tuned = load_config(str(study_dir / "best.yaml"))
    assert (tuned.direction.tensioner.T, tuned.direction.tensioner.alpha, tuned.search.rounds) == (
        best.params["T"], best.params["alpha"], best.params["rounds"])
    assert (tuned.data.train_size, tuned.search.baselines) == (128, True)
    # STL (one entry per task and the merged one) and HPS were trained once for the study, before the trials,
    # and every trial reused them; no training checkpoint is left beside them.
    assert len(list((study_dir / ".baselines").glob("*.json"))) == 2 + 2
    assert not list((study_dir / ".baselines").glob("*.pt"))
    assert "stl_val" in study.user_attrs
    with open(study_dir / "trials.csv") as handle:
        header, *rows = list(csv.reader(handle))
    assert len(header) == len(set(header)) and header[:3] == ["trial", "state", "val_delta"]  # val_delta once
    assert [row[0] for row in rows] == ["0", "1", "2"]

    # Running the command again on the folder continues the same study with the configuration it was made with
    # (here without TensorBoard: the new trial writes no event file).
    assert main(["tune", "multimnist", "--trials", "1", "--run-dir", str(study_dir), "--no-progress",
                 "--no-tensorboard"]) == 0
    assert [t.number for t in load(study_dir).trials] == [0, 1, 2, 3]
    assert load_config(str(study_dir / "trial-0003" / "config.yaml")).data.train_size == 128
    assert not list((study_dir / "trial-0003").rglob("events.out.tfevents.*"))
    assert (study_dir / "trial-0003" / "report.md").is_file()


def test_a_multi_objective_study_without_baselines_still_picks_best_yaml_by_validation_delta(tmp_path):
    # Without search.baselines no STL reference was trained, no trial had a val Δ, and best.yaml was the front's
    # lowest-numbered trial, whatever its Δ (a helper's finding).
    from mamo.tune_summary import chosen_trial

    config = load_config("quick", [*TINY, "search.baselines=false", "tune.rounds=[0, 0]"])
    run_tune(config, study_dir=tmp_path, trials=2, multi_objective=True, progress=False, tensorboard=False)
    study = load(tmp_path)
    assert "stl_val" in study.user_attrs
    assert all(isinstance(t.user_attrs.get("val_delta"), float) for t in study.trials)
    chosen = chosen_trial(study, multi=True)
    assert chosen.user_attrs["val_delta"] == max(t.user_attrs["val_delta"] for t in study.best_trials)
    assert len(list((tmp_path / ".baselines").glob("*.json"))) == 2 + 1  # STL only: per task and merged


def test_workers_trials_record_their_threads_and_reuse_the_reference_trained_at_them(tmp_path):
    # The reference is trained under the key the trials (and best.yaml) look baselines up with: one set in the cache.
    study_dir = tmp_path / "study"
    run_tune(load_config("quick", [*TINY, "tune.rounds=[1, 1]", "tune.pruner=none"]), study_dir=study_dir,
             trials=2, workers=2, tensorboard=False)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    for number in (0, 1):
        assert load_config(str(study_dir / f"trial-{number:04d}" / "config.yaml")).train.threads == share
        assert "STL baseline: reusing the cached result" in (study_dir / f"trial-{number:04d}" / "log.txt").read_text()
    assert load_config(str(study_dir / "best.yaml")).train.threads == share
    assert len(list((study_dir / ".baselines").glob("*.json"))) == 2 + 2


@needs_postgres
def test_two_workers_on_postgres_run_every_trial_once(tmp_path):
    name = f"test-{uuid.uuid4().hex[:8]}"
    config = load_config("quick", [*TINY, "tune.pruner=none"])
    result = run_tune(config, study_dir=tmp_path, storage=POSTGRES_URL, study_name=name, trials=4, workers=2,
                      progress=False)
    trials = optuna.load_study(study_name=name, storage=open_storage(POSTGRES_URL)).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4
    for t in trials:
        assert (tmp_path / f"trial-{t.number:04d}" / "metrics.json").is_file()
    assert result["best"] is not None and (tmp_path / "best.yaml").is_file()


def test_a_study_without_pictures_keeps_each_trials_events_and_hparams(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config("quick", [*TINY, "tune.rounds=[1, 1]"])
    result = run_tune(config, study_dir=tmp_path, trials=1, progress=False, pictures=False)
    assert result["states"]["complete"] == 1
    # 128 samples in batches of 128: one final step, far fewer than quick's tune.T upper end 15 needs after a growth.
    assert "T + 1 = 16 steps" in capsys.readouterr().err  # where the study's baselines log too
    events = EventAccumulator(str(tmp_path / "trial-0000"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    assert events.Tags()["images"] == []  # the round had its conflicts, but no picture of them
    assert "conflicts/Q/left+right/cell0" in events.Tags()["scalars"]
    assert "tune/val_delta" in events.Tags()["scalars"]  # the HPARAMS record's metrics
    assert "_hparams_/session_start_info" in events.summary_metadata
    assert not (tmp_path / "trial-0000" / "plots").exists()


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_a_pruned_trial_is_in_the_hparams_tab_with_its_last_round(tmp_path, monkeypatch):
    from mamo.tune_space import PRUNERS

    monkeypatch.setitem(PRUNERS, "median", AlwaysPrune)  # the dict the workers look the pruner up in
    config = load_config("quick", [*TINY, "tune.rounds=[1, 1]"])
    result = run_tune(config, study_dir=tmp_path, trials=1, progress=False, pictures=False)
    assert result["states"]["pruned"] == 1
    trial = load(tmp_path).trials[0]
    assert list(trial.intermediate_values) == [1]
    # Before: RoundReporter's TrialPruned went past write_hparams, so a pruned trial had no HPARAMS record.
    hparams, status, columns, values = hparams_record(tmp_path / "trial-0000")
    assert hparams == {**trial.params, "state": "pruned"} and status == "STATUS_SUCCESS"
    assert values == {"tune/val_delta": pytest.approx(trial.intermediate_values[1], abs=1e-4), "tune/last_round": 1}
    assert columns == HPARAMS_COLUMNS  # as a complete trial's: TensorBoard shows the first trial's columns
    # Its log says it was pruned; before, "crashed with TrialPruned, a bug in mamo" and a traceback.
    log = (tmp_path / "trial-0000" / "log.txt").read_text()
    assert "pruned by the study's pruner: validation Δ" in log and "after round 1" in log
    assert "bug" not in log and "Traceback" not in log


def test_a_failed_trials_record_never_hides_its_error_nor_lands_in_a_folder_it_did_not_make(tmp_path, monkeypatch):
    import mamo.hparams
    import mamo.search
    from mamo.tune_objective import SearchObjective

    def failing_search(config, run_dir, **kwargs):
        Path(run_dir).mkdir(exist_ok=True)
        raise RuntimeError("CUDA out of memory")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mamo.search, "run_search", failing_search)
    objective = SearchObjective(load_config("quick"), tmp_path, {}, None, False)
    study = optuna.create_study(direction="maximize")
    (tmp_path / "trial-0000").mkdir()  # not this trial's: another run's folder, which the trial failed on
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        objective(study.ask())
    assert not list((tmp_path / "trial-0000").iterdir())
    with pytest.raises(RuntimeError, match="CUDA out of memory") as caught:
        objective(study.ask())  # its own folder: the record is written
    assert list((tmp_path / "trial-0001").glob("events.out.tfevents.*"))
    assert not getattr(caught.value, "__notes__", [])
    monkeypatch.setattr(mamo.hparams, "write_hparams", full_disk)
    with pytest.raises(RuntimeError, match="CUDA out of memory") as caught:
        objective(study.ask())
    assert caught.value.__notes__ == ["Its TensorBoard HPARAMS record could not be written either: "
                                      "[Errno 28] No space left on device"]


def test_best_yaml_is_the_chosen_trials_own_configuration(tmp_path):
    # A continuation with --set (another lr, more epochs) used to leak into best.yaml, which then no longer
    # described the trial it named.
    from optuna.distributions import IntDistribution

    from mamo.tune_summary import summarize

    trial_dir = tmp_path / "trial-0000"
    trial_dir.mkdir()
    ran = load_config("quick", ["train.lr=0.003", "direction.tensioner.T=5", "search.baselines=false"])
    dump_config(ran, trial_dir / "config.yaml")
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"T": 5}, distributions={"T": IntDistribution(2, 30)},
                                              value=1.0, user_attrs={"run_dir": str(trial_dir)}))
    later = load_config("quick", ["train.lr=0.5", "train.epochs=9"])
    summarize(study, tmp_path, later, multi=False, shown="memory")
    best = load_config(str(tmp_path / "best.yaml"))
    assert (best.train.lr, best.train.epochs, best.direction.tensioner.T) == (0.003, 4, 5)
    assert best.search.baselines  # as the study's configuration: a rerun of best.yaml reports against STL


def test_best_yaml_keeps_a_workers_thread_count_and_says_what_its_search_repeats(tmp_path):
    # With --workers 2 a trial ran at 1 thread, its rerun at the machine's default: the validation Δ moved from
    # -4.73 to -5.97. A tuned lr also gives best.yaml baselines of its own, so its Δ is not the objective.
    from optuna.distributions import FloatDistribution

    from mamo.config import dump_config
    from mamo.tune_summary import summarize

    trial_dir = tmp_path / "trial-0000"
    trial_dir.mkdir()
    dump_config(load_config("quick", ["train.lr=0.004", "train.threads=1", "search.baselines=false"]),
                trial_dir / "config.yaml")
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("stl_val", {})  # a study of searches: its STL reference trained at the preset's rate
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.004}, distributions={"lr": FloatDistribution(1e-3, 1e-2)},
                                              value=1.0, user_attrs={"run_dir": str(trial_dir)}))
    base = load_config("quick")
    text = summarize(study, tmp_path, base, multi=False, shown="memory")["text"]
    assert load_config(str(tmp_path / "best.yaml")).train.threads == 1
    assert "It keeps train.threads=1, the thread count its trial's worker ran with" in text
    assert f"Its train.lr is the trial's, not the {base.train.lr:g} the study's STL reference trained with" in text
    again = summarize(study, tmp_path, load_config("quick", ["train.threads=1"]), multi=False, shown="memory")["text"]
    assert "It keeps train.threads" not in again  # the study's own setting: nothing to say


def test_a_worker_share_of_the_cores_is_the_trials_train_threads_unless_the_preset_sets_them(tmp_path, tiny):
    from mamo.tune_objective import SearchObjective

    study = optuna.create_study(direction="maximize")
    for base, expected in ((tiny, 1), (dataclasses.replace(tiny, train=dataclasses.replace(tiny.train, threads=2)), 2)):
        objective = SearchObjective(base, tmp_path / str(expected), {}, None, multi=False, tensorboard=False,
                                    threads=1)
        study.optimize(objective, n_trials=1)
        folder = Path(study.trials[-1].user_attrs["run_dir"])
        assert load_config(str(folder / "config.yaml")).train.threads == expected


def test_a_trial_stopped_by_ctrl_c_is_recorded_with_its_reason():
    from mamo.tune_workers import Recorded

    def stopped(trial):
        raise KeyboardInterrupt

    study = optuna.create_study()
    with pytest.raises(KeyboardInterrupt):
        study.optimize(Recorded(stopped), n_trials=1)
    assert study.trials[0].user_attrs["fail_reason"] == "stopped by Ctrl-C before it finished"


def test_a_trial_stopped_before_its_objective_started_is_named_so_in_the_summary_and_csv(tmp_path):
    # A stop between Optuna's making a trial and its calling the objective: summary.md said "unknown reason".
    import csv

    from mamo.tune_summary import summarize

    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"host": "here"}))
    summarize(study, tmp_path, load_config("quick"), multi=False, shown="memory")
    summary = (tmp_path / "summary.md").read_text()
    assert "- trial 0: stopped before its objective started (it drew nothing)" in summary
    # A trial that began and recorded nothing: a heartbeat-failed one on a shared database (a PostgreSQL audit
    # found "unknown reason" in summary.md and trials.csv for a killed worker's trial).
    assert "- trial 1: no reason recorded: its worker was killed (on a shared database the heartbeat" in summary
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert rows[0]["fail_reason"].startswith("stopped before its objective started")


def test_trials_csv_keeps_a_pruned_trials_round_delta_out_of_the_objective_column(tmp_path):
    # Optuna stores a pruned trial's last report as its value; trials.csv showed it as the objective val_delta.
    from mamo.tune_summary import summarize

    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=-3.5,
                                              intermediate_values={1: -10.0, 2: -4.0}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, value=-33.97,
                                              intermediate_values={1: -33.97}))
    summarize(study, tmp_path, load_config("quick"), multi=False, shown="memory")
    complete, pruned = csv.DictReader((tmp_path / "trials.csv").open())
    assert (complete["objective_0"], complete["pruned_at_round"], complete["pruned_val_delta"]) == ("-3.5", "", "")
    assert (pruned["state"], pruned["objective_0"]) == ("pruned", "")
    assert (pruned["pruned_at_round"], pruned["pruned_val_delta"]) == ("1", "-33.97")


def test_joining_a_study_refuses_a_set_that_changes_its_space(tmp_path, capsys):
    folder = tmp_path / "study"
    created = ["tune.direction=[mgda, equal]"]
    run_tune(load_config("quick", created), overrides=created, study_dir=folder, trials=1, objective=staircase)
    for changed, message in [
        ("tune.direction=[central, pcgrad]", "--set tune.direction=[central, pcgrad] would change what study 'mamo' "
                                             "samples (tune.direction is [mgda, equal] there)"),
        ("tune.direction=[equal, mgda]", "tune.direction is [mgda, equal] there"),  # another order is another space
        ("tune.lr=[0.001, 0.1]", "--set tune.lr=[0.001, 0.1] would change what study 'mamo' samples (tune.lr is "
                                 "null there)"),
    ]:
        with pytest.raises(MamoError, match="leave it out to continue the study, or pass a new --run-dir") as error:
            run_tune(load_config("quick", [changed]), overrides=[changed], study_dir=folder, trials=1,
                     objective=staircase)
        assert message in str(error.value)
    assert len(load(folder).trials) == 1  # refused before a trial ran: no failed trial recorded
    same = [*created, "train.device=cpu"]  # the space as it was, and a setting that may change
    run_tune(load_config("quick", same), overrides=same, study_dir=folder, trials=1, objective=staircase)
    assert len(load(folder).trials) == 2


def test_joining_a_search_study_refuses_a_set_that_changes_its_data(tmp_path, tiny):
    # A continuation with --set data.seed=7 trained trials on another split and ranked them against the study's
    # STL reference validated on the old one (an audit's trial: -2.21 there, -15.15 against its own data's STL).
    folder = tmp_path / "study"
    run_tune(tiny, study_dir=folder, trials=0, progress=False)
    for changed, shown in [("data.seed=7", "data.seed=7 would change the data of study 'mamo' (data.seed is 0 "),
                           ("data.val_size=32", "data.val_size=32 would change the data of study 'mamo' (data.val_size "
                                                "is 64 ")]:
        with pytest.raises(MamoError, match="leave it out to continue the study, or pass a new --run-dir") as error:
            run_tune(load_config("quick", [changed]), overrides=[changed], study_dir=folder, trials=0, progress=False)
        assert shown in str(error.value)
    moved = [f"data.root={tmp_path}", "train.device=cpu"]  # where the same files are, and a setting that may change
    run_tune(load_config("quick", moved), overrides=moved, study_dir=folder, trials=0, progress=False)
    # A caller's own objective has no reference to keep: its study may change the data.
    own = tmp_path / "own"
    run_tune(load_config("quick"), study_dir=own, trials=1, objective=staircase)
    run_tune(load_config("quick", ["data.seed=7"]), overrides=["data.seed=7"], study_dir=own, trials=1,
             objective=staircase)
    assert len(load(own).trials) == 2


def test_a_reference_next_to_zero_gets_a_note_naming_its_metric():
    # tune logic ranked trials by -4e7 % against an STL MSE of 1e-13: round-off chose best.yaml, unannounced.
    tasks = load_data(load_config("logic").data).tasks
    stl = {task: {"mse": 0.02, "mae": 0.1} for task in tasks}
    assert near_zero_reference_note(stl, tasks) is None
    stl["and"]["mse"] = 1.1e-13
    note = near_zero_reference_note(stl, tasks)
    assert note.startswith("note: the STL reference scores and.mse = 1.1e-13 on the validation split, so")
    assert "--multi-objective" in note
    stl["and"]["mse"] = 0.0  # Eq 15 falls back to the plain difference there: no explosion
    assert near_zero_reference_note(stl, tasks) is None


def test_zero_trials_write_a_summary_that_says_so(tmp_path, capsys):
    result = run_tune(load_config("quick"), study_dir=tmp_path / "crafted", trials=0, objective=draws_alpha)
    assert "0 trials.\n" in result["text"] and result["best"] is None
    tiny_sets = [arg for setting in TINY for arg in ("--set", setting)]
    assert main(["tune", "quick", "--trials", "0", "--run-dir", str(tmp_path / "cli"), "--no-progress",
                 *tiny_sets]) == 1
    assert "mamo: no trial of the study has ended yet; run some with --trials N." in capsys.readouterr().out


def test_a_joined_study_runs_its_own_tune_trials_not_the_presets(tmp_path):
    run_tune(load_config("quick", ["tune.trials=2"]), study_dir=tmp_path, objective=draws_alpha)
    assert len(load(tmp_path).trials) == 2
    run_tune(load_config("multimnist"), study_dir=tmp_path, objective=draws_alpha)  # its tune.trials is 20
    assert len(load(tmp_path).trials) == 4


@pytest.mark.parametrize(("target", "message"), [
    ("file", "--run-dir {path} is a file, not a study folder; pass a new --run-dir."),
    ("below", "--run-dir {path} lies below {file}, which is a file; pick another --run-dir."),
    # Was "storage sqlite:///.../study.db could not be opened ...; make the study folder writable".
    ("dangling link", "{path} is a link to {nowhere}, which does not exist; create what it points to or pass "
                      "another path."),
])
def test_a_run_dir_that_cannot_be_a_folder_is_one_sentence(tmp_path, capsys, target, message):
    from cli_errors import single_error

    file = tmp_path / "afile"
    file.write_text("")
    path = {"file": file, "below": file / "study", "dangling link": tmp_path / "link"}[target]
    if target == "dangling link":
        path.symlink_to(tmp_path / "nowhere")
    assert main(["tune", "quick", "--trials", "1", "--run-dir", str(path), "--no-progress"]) == 2
    assert single_error(capsys.readouterr().err) == message.format(path=path, file=file, nowhere=tmp_path / "nowhere")


@pytest.mark.parametrize(("gpus", "expected"), [(0, []), (1, []), (3, [1])])
def test_workers_take_the_gpus_in_turn(monkeypatch, gpus, expected):
    # Every worker trained on the current device, GPU 0, whatever the machine had (a review of the CUDA paths);
    # worker 4 of 3 GPUs now makes GPU 1 its current device, which train.device auto and cuda mean.
    from mamo.tune_workers import spread_over_gpus

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    spread_over_gpus(4)
    assert chosen == expected


def test_no_more_workers_start_than_there_are_trials(tmp_path, capsys):
    run_tune(load_config("quick"), study_dir=tmp_path, trials=1, workers=3, objective=draws_alpha)
    err = capsys.readouterr().err
    # A caller's objective makes no trial folders: the line names the study folder (it named "trial folders").
    assert f"study 'mamo' (sqlite:///{(tmp_path / 'study.db').resolve()}): 1 trial on 1 worker, study folder " \
           f"{tmp_path}\n" in err
    assert f"new study 'mamo' of preset 'quick' in {tmp_path}\n" in err  # a caller's objective: no reference
    assert "1 trial: 1 complete." in (tmp_path / "summary.md").read_text()
    from mamo.cache import process_owner

    assert [t.user_attrs["owner"] for t in load(tmp_path).trials] == [process_owner()]  # run here, none spawned


def test_a_folder_another_command_is_setting_up_is_joined_not_refused(tmp_path):
    # Between its study.db and its study.yaml, the other command's folder used to be "not empty and holds no
    # study" to a second command started at the same moment.
    open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    run_tune(load_config("quick"), study_dir=tmp_path, trials=1, objective=draws_alpha)
    assert len(load(tmp_path).trials) == 1


def test_the_schema_version_race_counts_as_a_table_race():
    from mamo.tune_storage import _table_race

    assert _table_race("(sqlite3.IntegrityError) UNIQUE constraint failed: alembic_version.version_num")
    assert _table_race('duplicate key value violates unique constraint "alembic_version_pkc"')
    assert _table_race("table studies already exists")
    assert not _table_race("unable to open database file")


def test_a_storage_that_fails_while_a_trial_is_recorded_is_one_sentence(tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError

    run_tune(load_config("quick"), study_dir=tmp_path, trials=1, objective=draws_alpha)

    def failing(*args, **kwargs):
        raise OperationalError("UPDATE trials", {}, Exception("disk I/O error"))

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", failing)
    with pytest.raises(MamoError) as raised:
        run_tune(load_config("quick"), study_dir=tmp_path, trials=1, objective=draws_alpha)
    assert str(raised.value) == (
        f"the study's storage sqlite:///{(tmp_path / 'study.db').resolve()} failed while recording a trial (disk "
        "I/O error); free disk space or fix the study folder's permissions (or the database), then rerun the same "
        "command to continue the study.")


def test_tuning_what_no_trial_uses_is_noted():
    from mamo.tune_space import inert_keys_note

    off = load_config("quick", ["direction.tensioner.formulation=off"])
    assert inert_keys_note(off) == (
        "note: direction.tensioner.formulation is off and not tuned, so tune.T and tune.alpha change nothing in the "
        "trials; set tune.T=null and tune.alpha=null, or tune a formulation (e.g. --set "
        "'tune.formulation=[off, thesis]').")
    assert inert_keys_note(load_config("quick")) is None
    assert inert_keys_note(load_config("quick", ["direction.tensioner.formulation=off",
                                                  "tune.formulation=[off, relative]"])) is None
    assert inert_keys_note(load_config("quick", ["direction.tensioner.formulation=off", "tune.T=null",
                                                  "tune.alpha=null"])) is None
    # A normalisation range under central was drawn and never used, without a note.
    assert inert_keys_note(load_config("quick", ["direction.name=central", "tune.normalization=[none, l2]"])) == (
        "note: no trial runs mgda (direction.name is central), so tune.normalization changes nothing in the trials; "
        "set tune.normalization=null, or tune mgda among the directions.")
    assert inert_keys_note(load_config("quick", ["direction.name=central", "tune.normalization=[none, l2]",
                                                  "tune.direction=[central, mgda]"])) is None
    assert "tune.direction leaves it out" in inert_keys_note(load_config("quick", [
        "tune.normalization=[none, l2]", "tune.direction=[central, pcgrad]"]))


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "tune.lr=[1e-3, .inf]"], "tune.lr must be a range [low, high] of finite numbers with 0 < low ≤ high "
                                        "≤ 3.403e+38, got [0.001, inf]; fix it in the preset or --set."),  # train.lr
    # Passed, and every trial failed in the optimizer (float32 overflow), recorded as a bug in mamo.
    (["--set", "tune.lr=[1e39, 1e40]"], "tune.lr must be a range [low, high] of finite numbers with 0 < low ≤ high "
                                        "≤ 3.403e+38, got [1e+39, 1e+40]; fix it in the preset or --set."),
    (["--set", "tune.alpha=[0, .inf]"], "tune.alpha must be a range"),  # named direction.tensioner.alpha
    (["--set", "tune.alpha=[.nan, 1]"], "tune.alpha must be a range"),
    # Overflowed the tensioner's history in the first trial, leaving the study folder.
    (["--set", "tune.T=[1, 100000000000000000000]"], "tune.T must be a range [low, high] of finite numbers with "
     "1 ≤ low ≤ high ≤ 1,000,000,000, got [1, 100000000000000000000]; fix it in the preset or --set."),
    (["--set", "tune.trials=-1"], "tune.trials must be ≥ 0, got -1; fix the number."),  # named --trials
    (["--trials", "-1"], "--trials must be ≥ 0, got -1; fix the number."),
    (["--workers", "0"], "--workers must be ≥ 1, got 0; fix the number."),
])
def test_bad_tune_numbers_name_the_setting_they_came_from(tmp_path, capsys, args, message):
    from cli_errors import single_error

    assert main(["tune", "quick", *args, "--run-dir", str(tmp_path / "study"), "--no-progress"]) == 2
    assert message in single_error(capsys.readouterr().err)
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(("stop", "generic"), [("explained", False), ("plain", True)])
def test_a_tune_stop_that_said_how_to_continue_gets_no_generic_line_from_the_cli(monkeypatch, capsys, stop, generic):
    # After tune's own "stopped; ... rerun the command with --run-dir" the CLI added "interrupted; finished
    # checkpoints in the run folder are kept", about folders the study line had already covered.
    import mamo.tune
    from mamo.cli import main
    from mamo.errors import StopExplained

    def stopped(*args, **kwargs):
        raise StopExplained if stop == "explained" else KeyboardInterrupt

    monkeypatch.setattr(mamo.tune, "run_tune", stopped)
    assert main(["tune", "quick"]) == 130
    err = capsys.readouterr().err
    assert ("mamo: interrupted" in err) == generic
    # Nor does the generic line claim checkpoints that a stop before any folder existed never wrote.
    assert "checkpoints" not in err


def test_a_postgresql_url_uses_the_driver_that_is_installed(monkeypatch):
    # SQLAlchemy 2.1 reads postgresql:// as psycopg 3; with only psycopg2 installed that must still connect.
    import importlib.util

    from mamo import tune_storage

    seen = []
    monkeypatch.setattr(tune_storage, "_rdb_storage", lambda url, engine_kwargs, create: seen.append(url))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "psycopg2" else None)
    tune_storage.open_storage("postgresql://mamo:secret@db.example/x")
    assert seen == ["postgresql+psycopg2://mamo:secret@db.example/x"]


def test_a_mysql_url_without_a_driver_is_one_sentence(monkeypatch):
    import importlib.util

    from mamo.tune_storage import open_storage

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # neither MySQLdb nor pymysql
    with pytest.raises(MamoError, match=r"^storage mysql://mamo:\*\*\*@127.0.0.1:1/x needs the database driver "
                                        r"'\w+', which is not installed; install it\.$"):  # no psycopg2 for MySQL
        open_storage("mysql://mamo:secret@127.0.0.1:1/x")


@pytest.mark.parametrize(("error", "advice"), [
    ('FATAL:  password authentication failed for user "mamo"', "check the user and password in --storage"),
    ('FATAL:  database "nosuchdb" does not exist', "check the database name in --storage, or create it"),
])
def test_a_server_that_refuses_the_url_is_told_to_fix_the_url_not_to_start_the_database(monkeypatch, error, advice):
    # A PostgreSQL audit: a wrong password or database name said "start the database or pass a reachable URL".
    import optuna
    from sqlalchemy.exc import OperationalError

    from mamo.tune_storage import open_storage

    def refusing(*args, **kwargs):
        raise OperationalError("connect", {}, Exception(error))

    monkeypatch.setattr(optuna.storages, "RDBStorage", refusing)
    with pytest.raises(MamoError, match=re.escape(advice)):
        open_storage("sqlite:////nonexistent/study.db")


def test_only_a_table_race_is_retried_and_only_twice_after_a_pause(monkeypatch):
    # A database that does not answer fails at once; two commands creating the tables at once retry twice, half a
    # second apart, then the loser is told to run again.
    import optuna
    from sqlalchemy.exc import OperationalError

    from mamo.tune_storage import StorageBusy, open_storage

    calls, pauses = [], []
    monkeypatch.setattr("mamo.tune_storage.time.sleep", pauses.append)

    def refusing(*args, **kwargs):
        calls.append(1)
        raise OperationalError("connect", {}, Exception("connection refused"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", refusing)
    with pytest.raises(MamoError, match=r"could not be opened \(connection refused\)"):
        open_storage("sqlite:////nonexistent/study.db")
    assert (len(calls), pauses) == (1, [])

    def racing(*args, **kwargs):
        calls.append(1)
        raise OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    with pytest.raises(StorageBusy):
        open_storage("sqlite:////nonexistent/study.db")
    assert (len(calls), pauses) == (3, [0.5, 0.5])


def test_a_trial_killed_after_its_rounds_reports_them_again_when_retried(tmp_path, monkeypatch):
    # Killed in the final phase (after round 1's checkpoint), the retry resumes after the round and never ends it
    # again: it must report the round's Δ from the checkpoint, or the pruner judges it without that round.
    from optuna.trial import TrialState

    import mamo.search_phases

    config = load_config("quick", ONE_ROUND)
    run_tune(config, study_dir=tmp_path / "whole", trials=1, **QUIET)
    reference = load(tmp_path / "whole").trials[0]
    assert list(reference.intermediate_values) == [1]

    def killed(*args, **kwargs):
        raise SystemExit(137)

    with monkeypatch.context() as patch:
        patch.setitem(mamo.search_phases.PHASE_RUNNERS, "final", killed)
        with pytest.raises(SystemExit):
            run_tune(config, study_dir=tmp_path / "cut", trials=1, **QUIET)
    run_tune(config, study_dir=tmp_path / "cut", trials=1, **QUIET)
    _, retry = load(tmp_path / "cut").trials
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_of"] == 0
    assert retry.intermediate_values == reference.intermediate_values


class RaisesInDel:
    """Its finaliser raises a KeyboardInterrupt, as a stop that lands while the garbage collector runs one."""

    def __del__(self):
        raise KeyboardInterrupt


def test_a_sigterm_inside_a_command_requests_the_stop_and_the_command_leaves_everything_as_it_was(monkeypatch):
    import signal
    import sys

    from mamo.stops import STOP_REQUESTED, stop_signals_interrupt

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals_interrupt():
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        assert STOP_REQUESTED.is_set()  # in case Python drops the raise: the trainer and tune check it
        RaisesInDel()  # a dropped stop's KeyboardInterrupt: not reported
        assert seen == []
    assert not STOP_REQUESTED.is_set()  # the next command in this process is not stopped at its first step
    assert signal.getsignal(signal.SIGTERM) is before and sys.unraisablehook == seen.append  # both restored
    RaisesInDel()  # outside a command, the previous hook sees it again
    assert [type(unraisable.exc_value) for unraisable in seen] == [KeyboardInterrupt]


def _killed_by_sigkill() -> None:
    os.kill(os.getpid(), 9)


class _SelfKillingWorkers:
    """A process context whose workers die by SIGKILL at once, as the out-of-memory killer ends them."""

    @staticmethod
    def Process(target, args):  # noqa: N802 - multiprocessing's name
        import multiprocessing

        return multiprocessing.get_context("fork").Process(target=_killed_by_sigkill)


def test_a_worker_killed_by_a_signal_is_named_with_the_signal_not_an_error_printed_above() -> None:
    # A SIGKILLed worker prints nothing; the parent's sentence pointed at "an error printed above" that was not there.
    from mamo.tune_workers import run_workers, workers_failure

    with pytest.raises(MamoError) as caught:
        run_workers(None, 2, None, None, _SelfKillingWorkers)
    assert str(caught.value) == (
        "tune workers 0, 1 were killed by SIGKILL (on Linux usually the out-of-memory killer: run fewer --workers or "
        "a smaller model); the finished trials are kept in the study")
    assert workers_failure([0, 0]) is None
    assert workers_failure([2, -15]) == (
        "tune worker 0 (exit code 2) stopped with an error printed above; tune worker 1 was killed by SIGTERM; the "
        "finished trials are kept in the study")


def test_a_trial_killed_before_it_made_its_folder_is_listed_without_one(tmp_path: Path) -> None:
    # Killed between drawing its parameters and making trial-0000 (a helper's kill -9 audit): its retry ran in
    # trial-0001, and trials.csv and summary.md named trial-0000, which never existed.
    import socket

    from optuna.distributions import FloatDistribution

    from mamo.tune_summary import run_folder

    def trial(run_dir: Path, host: str) -> optuna.trial.FrozenTrial:
        return optuna.trial.create_trial(params={"alpha": 0.3}, distributions={"alpha": FloatDistribution(0, 1)},
                                         state=TrialState.FAIL, user_attrs={"run_dir": str(run_dir), "host": host})

    made = tmp_path / "trial-0001"
    made.mkdir()
    assert run_folder(trial(made, socket.gethostname()), tmp_path) == made
    assert run_folder(trial(tmp_path / "trial-0000", socket.gethostname()), tmp_path) is None
    elsewhere = Path("/elsewhere/study/trial-0000")  # another machine's folder is named as recorded
    assert run_folder(trial(elsewhere, "another-machine"), tmp_path) == elsewhere


def _descriptors_on(path: Path) -> int:
    """This process' open file descriptors on ``path`` (and its journal or WAL files)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(path))
    return count


def test_a_tune_leaves_no_connection_to_its_study_open(tmp_path):
    # A notebook's run_tune held 4 descriptors on study.db until the garbage collector found the storages, and for
    # as long as it kept a failed call's traceback (a helper's audit of many calls in one process).
    gc.disable()
    try:
        run_tune(load_config("quick"), study_dir=tmp_path, trials=2, objective=draws_alpha, progress=False)
        assert _descriptors_on(tmp_path / "study.db") == 0
        with pytest.raises(MamoError):
            run_tune(load_config("quick"), study_dir=tmp_path, trials=1, objective=draws_alpha, progress=False,
                     multi_objective=True)  # refused: the study has one objective
        assert _descriptors_on(tmp_path / "study.db") == 0
    finally:
        gc.enable()


def test_the_summary_says_when_the_best_trials_own_stl_is_not_the_studys_reference(tmp_path):
    # A continuation with --set train.batch_size=64 ranked its trial best at +13.45 against the study's reference
    # (batch 128), while the trial's report, its test Δ in the table and a search of best.yaml measured it against
    # an STL at batch 64: validation Δ -11.67, with nothing in summary.md saying so.
    from optuna.distributions import IntDistribution

    from mamo.tune_summary import summarize

    trial_dir = tmp_path / "trial-0000"
    trial_dir.mkdir()
    dump_config(load_config("quick", ["train.batch_size=64"]), trial_dir / "config.yaml")
    (trial_dir / "metrics.json").write_text(json.dumps({"val_delta": -11.67, "delta": -14.5}))
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"T": 5}, distributions={"T": IntDistribution(2, 30)},
                                              value=13.45, user_attrs={"run_dir": str(trial_dir), "val_delta": 13.45,
                                                                       "delta": -14.5}))
    text = summarize(study, tmp_path, load_config("quick"), multi=False, shown="memory")["text"]
    assert "its validation Δ is -11.67 there, not the objective's +13.45" in text
    (trial_dir / "metrics.json").write_text(json.dumps({"val_delta": 13.45, "delta": -14.5}))  # the same STL
    again = summarize(study, tmp_path, load_config("quick"), multi=False, shown="memory")["text"]
    assert "not the objective's" not in again
