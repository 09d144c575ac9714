"""Several mamo processes on what users share: a run folder, a study folder. Each test sets up the interleaving
two real processes can take, so that none depends on timing luck."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
from optuna.trial import TrialState

from mamo.config import load_config
from mamo.errors import MamoError
from mamo.runs import FolderLock, cli, new_run_dir, write_run_config


@pytest.mark.parametrize("command", ["search", "train"])
def test_a_refused_resume_of_a_finished_run_leaves_an_export_in_progress_alone(tmp_path: Path, command: str) -> None:
    # Before: `search --resume` of a finished run removed every *.tmp in the folder (the staging folder of an
    # export writing model.onnx there, say) and only then said there was nothing to resume; the export crashed
    # with "FileNotFoundError: ... model.onnx".
    from mamo.search import run_search
    from mamo.train import run_train

    folder = tmp_path / "run"
    folder.mkdir()
    write_run_config(folder, command, load_config("quick"))
    (folder / "metrics.json").write_text("{}")
    staging = folder / "model.onnx.host.123.tmp"  # replace_from_folder's, while torch writes the ONNX file
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"half")
    written = folder / "architecture.dot.host.123.tmp"  # replace_atomically's
    written.write_text("digraph")
    resume = run_search if command == "search" else run_train
    with pytest.raises(MamoError, match="has finished \\(metrics.json is there\\); nothing to resume"):
        resume(None, folder, progress=False, quiet=True, loggers=False, resume=True)
    assert (staging / "model.onnx").read_bytes() == b"half" and written.read_text() == "digraph"


def test_a_resume_leaves_the_temporary_files_of_a_live_process_of_this_machine(tmp_path: Path) -> None:
    # Before: a resume removed every *.tmp, so an export writing beside a stopped run (its model files there,
    # not metrics.json yet) lost its staging folder; a dead or the resuming process's own leftovers still go.
    import socket
    import subprocess
    import sys

    from mamo.resume import read_run_config

    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    write_run_config(folder, "search", load_config("quick"))
    host = socket.gethostname()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
        exporting = folder / f"model.onnx.{host}.{live.pid}.tmp"
        exporting.mkdir()
        leftovers = [folder / f"model.onnx.{host}.{int(dead.stdout)}.tmp", folder / f"log.txt.{host}.{os.getpid()}.tmp",
                     folder / "checkpoints" / "last.pt.4242.tmp", folder / f"report.md.elsewhere.{live.pid}.tmp"]
        for leftover in leftovers:
            leftover.write_bytes(b"half")
        try:
            read_run_config(folder, "search", [], contextlib.ExitStack())
        finally:
            live.kill()
    assert exporting.is_dir() and not any(leftover.exists() for leftover in leftovers)


def test_a_run_folder_another_command_is_creating_is_not_taken_from_it(tmp_path: Path) -> None:
    # Two `search --run-dir D` started together: the first had made D/checkpoints/ and was writing config.yaml,
    # the second read that as a folder left by a killed command, emptied it and took it too; both wrote config.yaml
    # (the folder kept either one's settings) and one then stopped with "in use by another mamo command ...,
    # then resume", about a run it never started.
    folder = tmp_path / "run"
    config = load_config("quick")
    (folder / "checkpoints").mkdir(parents=True)
    with FolderLock(folder):  # the first command, between its checkpoints/ and its config.yaml
        with pytest.raises(MamoError, match="was taken by another run meanwhile; pass a new --run-dir"):
            new_run_dir(folder, load_config("quick", ["train.seed=7"]), "search")
        assert (folder / "checkpoints").is_dir() and not (folder / "config.yaml").exists()
    # A command killed at that moment held nothing: its folder is taken by the next one, as before, which holds
    # it from then on for as long as its run works there.
    with contextlib.ExitStack() as running:
        assert new_run_dir(folder, config, "search", held=running) == folder
        assert (folder / "config.yaml").is_file()
        with pytest.raises(MamoError, match="in use by another mamo command"):
            FolderLock(folder)
    FolderLock(folder).release()


def test_two_commands_joining_a_study_retry_its_killed_trial_once(tmp_path: Path) -> None:
    # Two `tune --run-dir S` started together on a study whose last command was killed mid-trial: each read the
    # trials, then each queued a retry of the killed one (it ran twice, both continuing its folder), and the
    # later one crashed failing the trial the other had failed (optuna's UpdateFinishedTrialError).
    import threading

    import optuna
    from optuna.trial import TrialState

    from mamo.cache import process_owner
    from mamo.tune_storage import open_storage
    from mamo.tune_study import retry_interrupted
    from mamo.tune_workers import TrialLine

    url = f"sqlite:///{tmp_path / 'study.db'}"
    killed = optuna.create_study(study_name="s", storage=open_storage(url)).ask()
    killed.suggest_float("alpha", 0, 1)
    killed.set_user_attr("owner", process_owner())  # this process's earlier command: gone
    first, second = (optuna.load_study(study_name="s", storage=open_storage(url)) for _ in range(2))
    errors = []

    def retry(study: optuna.Study) -> None:
        try:
            retry_interrupted(study, TrialLine(tmp_path / "tune.log"))
        except Exception as exc:  # noqa: BLE001 - what the command would have died of
            errors.append(exc)

    other = threading.Thread(target=retry, args=(second,))
    read = first.get_trials

    def read_then_let_the_other_run(*args: object, **kwargs: object) -> list:
        trials = read(*args, **kwargs)
        if not other.is_alive() and other.ident is None:
            other.start()  # the second command, once the first has read the trials
            other.join(timeout=2)  # as far as it gets before the first goes on
        return trials

    first.get_trials = read_then_let_the_other_run
    retry(first)
    other.join()
    assert errors == []
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs == {"retry_of": 0}


def dies_in_trial_0(trial) -> float:
    """A crafted objective (module level, for spawned workers): trial 0's worker is SIGKILLed, as the
    out-of-memory killer ends it."""
    alpha = trial.suggest_float("alpha", 0, 1)
    if trial.number == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return alpha


def test_a_study_whose_worker_was_killed_still_summarizes_the_trials_the_others_finished(tmp_path: Path) -> None:
    # Before: the command stopped with "tune worker 0 was killed by SIGKILL ..." and left summary.md, trials.csv
    # and best.yaml as an earlier command wrote them (here none at all), so the trials finished meanwhile, the
    # best among them included, were missing there, and the killed trial stayed RUNNING until the next command.
    import csv

    import optuna

    from mamo.tune import run_tune

    study = tmp_path / "study"
    with pytest.raises(MamoError, match="tune worker [01] was killed by SIGKILL") as failed:
        run_tune(load_config("quick"), study_dir=study, trials=3, workers=2, objective=dies_in_trial_0,
                 progress=False)
    # What this command still owes is the killed trial's retry: "rerun the same command" ran 3 more.
    assert str(failed.value).endswith(f"; the finished trials are kept in the study; continue with: "
                                      f"{cli('tune', '--run-dir', study, '--trials', '1', '--workers', '2')}")
    trials = optuna.load_study(study_name="mamo", storage=f"sqlite:///{study / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE", "WAITING"]  # the retry is queued
    with open(study / "trials.csv", encoding="utf-8", newline="") as table:
        rows = list(csv.DictReader(table))
    assert [(row["trial"], row["state"]) for row in rows] == [("0", "fail"), ("1", "complete"), ("2", "complete"),
                                                              ("3", "waiting")]
    summary = (study / "summary.md").read_text()
    assert "4 trials: 2 complete, 1 fail, 1 waiting." in summary
    # The failed trial's line says which trial retries it and how far that got (it said "retried by the next
    # command" even once the retry had run).
    assert "\n- trial 0: its command was killed before it finished (retried by the next command on the study); its " \
           "retry is trial 3 (waiting)\n" in summary
    assert (study / "best.yaml").is_file()


def dies_in_trials_0_to_2(trial) -> float:
    """Trials 0 and 1 (a command's first two) and 2 (the retry of trial 0) SIGKILL their worker."""
    alpha = trial.suggest_float("alpha", 0, 1)
    if trial.number <= 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return alpha


def test_a_continuation_whose_worker_is_killed_in_an_inherited_retry_still_owes_it(tmp_path: Path) -> None:
    # The retry of trial 0 is numbered below the continuation's first new trial (the killed command queued it), and
    # the owed trials were counted from there: the continuation said --trials 0 with one trial still to run.
    from mamo.tune import run_tune

    study = tmp_path / "study"
    for asked, owed in ((4, 4), (4, 1)):  # the first: both workers killed at once, the two others never taken
        with pytest.raises(MamoError, match="killed by SIGKILL") as failed:
            run_tune(load_config("quick"), study_dir=study, trials=asked, workers=2, objective=dies_in_trials_0_to_2,
                     progress=False)
        assert str(failed.value).endswith(
            f"continue with: {cli('tune', '--run-dir', study, '--trials', str(owed), '--workers', '2')}")
    run_tune(load_config("quick"), study_dir=study, trials=1, objective=dies_in_trials_0_to_2, progress=False)
    states = [t.state.name for t in optuna_trials(study)]
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == 3 and len(states) == 7, states


def dies_beside_another_commands_trial(trial) -> float:
    """Starts a trial as another command running on the study would (its owner lives), then SIGKILLs its worker."""
    trial.suggest_float("alpha", 0, 1)
    other = trial.study.ask()
    other.set_user_attr("owner", os.environ["MAMO_TEST_OWNER"])
    os.kill(os.getpid(), signal.SIGKILL)
    return 0.0


def test_a_killed_workers_command_owes_its_own_trials_not_another_commands_running_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every trial running once the command's workers ended was counted as owed, another command's on the study
    # too (its trials are running, not killed): --trials 4 for the 2 trials asked.
    from mamo.cache import process_owner
    from mamo.tune import run_tune

    host, _, namespace = process_owner().split()
    monkeypatch.setenv("MAMO_TEST_OWNER", f"{host} {os.getppid()} {namespace}")  # a process that lives on
    study = tmp_path / "study"
    with pytest.raises(MamoError, match="were killed by SIGKILL") as failed:
        run_tune(load_config("quick"), study_dir=study, trials=2, workers=2,
                 objective=dies_beside_another_commands_trial, progress=False)
    assert str(failed.value).endswith(
        f"continue with: {cli('tune', '--run-dir', study, '--trials', '2', '--workers', '2')}")
    assert [t.state.name for t in optuna_trials(study)].count("RUNNING") == 2  # the other command's, left alone


def optuna_trials(study: Path) -> list:
    import optuna

    return optuna.load_study(study_name="mamo", storage=f"sqlite:///{study / 'study.db'}").trials


@pytest.mark.parametrize("command", ["search", "train"])
def test_show_and_export_of_a_run_still_running_say_so_rather_than_to_resume_it(tmp_path: Path, command: str) -> None:
    # Before: "... holds a search run that has not finished (no architecture.json); finish it with python cli.py
    # search --resume ...", which beside the running command is refused ("in use by another mamo command").
    from mamo.export import export, load_trained

    folder = tmp_path / "run"
    folder.mkdir()
    write_run_config(folder, command, load_config("quick"))
    with FolderLock(folder):  # the run, working there
        for read in (load_trained, lambda run: export(run, ["onnx"])):
            with pytest.raises(MamoError) as refused:
                read(folder)
            assert str(refused.value) == (f"{folder} holds a {command} run that is still running (no "
                                          "architecture.json yet); pass it again once it has finished.")
    with pytest.raises(MamoError, match=f"has not finished \\(no architecture.json\\); finish it with .*{command} "
                                        "--resume"):
        load_trained(folder)  # stopped: nobody holds it
    assert not any(folder.glob("*.tmp"))


def test_a_worker_whose_tune_command_was_killed_takes_no_more_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: after a SIGKILL of `tune --workers 2` (which can stop no one), its orphaned workers ran every trial
    # the command had left, unwatched and never summarized, beside the command the user ran next.
    import multiprocessing

    from mamo.tune_workers import Tickets

    tickets = Tickets(3, multiprocessing.get_context("spawn"))
    child = os.getpid() + 1  # a worker of this command, as os.getpid() and os.getppid() read in it
    monkeypatch.setattr(os, "getpid", lambda: child)
    monkeypatch.setattr(os, "getppid", lambda: tickets.command)
    assert tickets.take() and tickets.left.value == 2
    monkeypatch.setattr(os, "getppid", lambda: 1)  # the command is gone: init (or a subreaper) adopted the worker
    assert tickets.take() is False and tickets.left.value == 2


def draws_alpha(trial) -> float:
    return trial.suggest_float("alpha", 0, 1)


def test_a_tune_command_whose_study_another_command_created_meanwhile_joins_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two `tune --run-dir S` started together on a new study, the second with --set data.seed=3: each found no
    # study and took its own configuration; the first created the study while the second trained its STL
    # reference, and the second then ran its trials on other data, scored against the first's reference (a
    # later join is refused that --set).
    from mamo import tune

    folder = tmp_path / "study"
    reference = {"left": {"accuracy": 0.5, "loss": 1.0}, "right": {"accuracy": 0.5, "loss": 1.0}}

    def trained(*args: object) -> tuple[dict, dict, None]:
        return {}, reference, None

    def the_other_command_first(*args: object) -> tuple[dict, dict, None]:
        monkeypatch.setattr(tune, "_reference", trained)
        tune.run_tune(load_config("quick"), study_dir=folder, trials=0, objective=draws_alpha, progress=False)
        return trained()

    monkeypatch.setattr(tune, "_reference", the_other_command_first)
    with pytest.raises(MamoError, match="--set data.seed=3 would change the data of study 'mamo'"):
        tune.run_tune(load_config("quick", ["data.seed=3"]), overrides=["data.seed=3"], study_dir=folder, trials=1,
                      objective=draws_alpha, progress=False)
    assert load_config(str(folder / "study.yaml")).data.seed == 0  # the study's own, left to it
    # The same settings join it quietly, and the creator itself is no joiner.
    monkeypatch.setattr(tune, "_reference", the_other_command_first)
    folder = tmp_path / "another"
    assert tune.run_tune(load_config("quick"), study_dir=folder, trials=1, objective=draws_alpha,
                         progress=False)["states"]["complete"] == 1


def test_two_waiters_finding_one_dead_owner_take_its_baseline_over_once(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: both judged the claim abandoned, the faster removed it and made its own, and the slower then removed
    # that new claim and made another, so both trained the baseline (reproduced by a concurrency audit).
    import socket
    import subprocess
    import sys

    import mamo.cache as cache_module
    from mamo.cache import BaselineCache, _pid_namespace

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (tmp_path / "key.claim").write_text(f"{socket.gethostname()} {gone} {_pid_namespace()}", encoding="utf-8")
    judge, other = cache_module._abandoned, []

    def judged_then_the_other_takes_over(path: Path) -> bool:
        verdict = judge(path)
        if not other:  # the other waiter, which judged the same claim, takes it over all the way meanwhile
            other.append(None)
            other.append(BaselineCache(tmp_path).try_claim("key"))
        return verdict

    monkeypatch.setattr(cache_module, "_abandoned", judged_then_the_other_takes_over)
    mine = BaselineCache(tmp_path).try_claim("key")
    try:
        assert other[1] is not None and other[1].path.exists()
        assert mine is None  # it waits for the other, whose claim stays
    finally:
        for claim in (mine, other[1]):
            if claim is not None:
                claim.release()


@pytest.mark.parametrize("in_objective", [False, True])
def test_a_retry_stopped_before_it_drew_its_parameters_has_them_queued_again(tmp_path: Path, in_objective) -> None:
    """A Ctrl-C while Optuna pops a queued retry, or in its objective before it draws, leaves a failed trial with
    no parameters of its own: its original's are queued again, or they never finished (a helper's re-check)."""
    import optuna

    from mamo.stops import STOP_REQUESTED
    from mamo.tune_storage import RETRY_OF, open_storage
    from mamo.tune_study import retry_interrupted
    from mamo.tune_workers import Recorded, TrialLine

    study = optuna.create_study(study_name="s", storage=open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    line = TrialLine(tmp_path / "tune.log")

    def drawn_then_stopped(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0, 1)
        raise KeyboardInterrupt

    def stopped(trial: optuna.Trial) -> float:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study.optimize(Recorded(drawn_then_stopped, line), n_trials=1)  # trial 0: its retry is queued
    if not in_objective:
        STOP_REQUESTED.set()  # a Ctrl-C while Optuna makes the retry's trial
    try:
        with pytest.raises(KeyboardInterrupt):
            study.optimize(Recorded(stopped, line), n_trials=1)
    finally:
        STOP_REQUESTED.clear()
    retry_interrupted(study, line)  # the next command's
    trials = study.get_trials()
    assert not trials[1].params and trials[1].user_attrs[RETRY_OF] == 0
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert [(t.user_attrs[RETRY_OF], t.system_attrs["fixed_params"]) for t in waiting] == [(0, trials[0].params)]


POPPER = """
import sys, time
from pathlib import Path
import optuna
from mamo.tune_storage import open_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
storage = open_storage(sys.argv[1], create=False)
if sys.argv[3] == "mamo":
    from mamo.tune_workers import OneTakerStudy
    study = OneTakerStudy(study_name="s", storage=storage, folder=Path(sys.argv[4]))
else:
    study = optuna.Study(study_name="s", storage=storage)
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
print(" ".join(str(study._pop_waiting_trial_id()) for _ in range(20)))
"""


def popped_by_three_workers(tmp_path: Path, kind: str) -> list[int]:
    """The queued trials three processes took at once from a local study of 60, 20 takes each."""
    import subprocess
    import sys
    import time

    import optuna

    from mamo.tune_storage import open_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    for i in range(60):
        study.enqueue_trial({"x": i})
    start = str(time.time() + 3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    poppers = [subprocess.Popen([sys.executable, "-c", POPPER, url, start, kind, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    popped = [int(n) for popper in poppers for n in popper.communicate(timeout=120)[0].split()]
    assert all(popper.returncode == 0 for popper in poppers)
    return popped


def test_two_workers_never_take_one_queued_trial_of_a_local_study(tmp_path: Path) -> None:
    # Optuna takes a queued trial (a retry) by reading it WAITING, then setting it RUNNING; SQLite ignores the
    # read's FOR UPDATE, so two workers that read it at once both ran it, in one trial folder, and another queued
    # retry was never run (a helper's re-check: 5 of 30 takes twice with plain optuna.Study).
    popped = popped_by_three_workers(tmp_path, "mamo")
    assert len(popped) == 60 and len(set(popped)) == 60, sorted(popped)



KILLED_AFTER_ASK = """
import os, signal, sys
from pathlib import Path
import optuna
from mamo.tune_storage import open_storage
from mamo.tune_workers import OneTakerStudy
optuna.logging.set_verbosity(optuna.logging.ERROR)
storage = open_storage(sys.argv[1], create=False)
kinds = {"mamo": lambda: OneTakerStudy(study_name="s", storage=storage, folder=Path(sys.argv[3])),
         "optuna": lambda: optuna.Study(study_name="s", storage=storage)}
kinds[sys.argv[2]]().ask()
os.kill(os.getpid(), signal.SIGKILL)  # killed after Optuna made the trial, before any objective could run
"""


@pytest.mark.parametrize("queued", [False, True])
def test_a_command_killed_as_it_makes_a_trial_leaves_one_the_next_command_retries_at_once(
        tmp_path: Path, queued: bool) -> None:
    # Optuna made a trial RUNNING without an owner; the objective recorded the owner a moment later, so a kill in
    # between left a trial the next command could not tell from a live one, and retried only after a minute.
    import subprocess
    import sys

    import optuna

    from mamo.tune_storage import open_storage
    from mamo.tune_study import left_running
    from mamo.tune_workers import OWNER

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    if queued:
        study.enqueue_trial({"x": 1})  # a retry in the queue: taken, then its owner recorded
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    for kind in ("mamo", "optuna"):
        ended = subprocess.run([sys.executable, "-c", KILLED_AFTER_ASK, url, kind, str(tmp_path)], env=env,
                               capture_output=True, text=True, timeout=120)
        assert ended.returncode == -signal.SIGKILL, ended.stderr
        if queued:
            break
    trials = study.get_trials()
    assert trials[0].state == TrialState.RUNNING and OWNER in trials[0].user_attrs
    assert left_running(trials[0])  # its process is gone: retried by the next command, not after a minute
    if not queued:
        assert trials[1].state == TrialState.RUNNING and OWNER not in trials[1].user_attrs  # plain Optuna's
        assert not left_running(trials[1])
