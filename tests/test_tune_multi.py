"""``mamo tune --multi-objective`` as a user continues it: the commands a stop prints, and a study joined with
the other kind of objective."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from test_tune import TINY

from mamo.cli import main
from mamo.config import load_config
from mamo.errors import MamoError
from mamo.tune import run_tune

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: real searches here are tiny


@pytest.fixture(scope="module")
def tiny():
    return load_config("quick", TINY)


# Crafted objectives live at module level so that spawned workers could unpickle them.

def two_values(trial: optuna.Trial) -> tuple[float, float]:
    alpha = trial.suggest_float("alpha", 0, 1)
    return alpha, 1 - alpha


def two_values_stopped_at_trial_1(trial: optuna.Trial) -> tuple[float, float]:
    values = two_values(trial)
    if trial.number == 1:
        raise KeyboardInterrupt
    return values


def never_trained(*args, **kwargs):
    raise AssertionError("the study's reference trained before the join was refused")


def test_a_stopped_multi_objective_study_prints_a_continue_line_that_continues_it(tmp_path, tiny, capsys):
    # The line left out --multi-objective, and pasted it stopped with "study 'mamo' optimises [...]" (an audit
    # of real `cli.py tune --multi-objective` commands).
    with pytest.raises(KeyboardInterrupt):
        run_tune(tiny, study_dir=tmp_path, trials=3, multi_objective=True, objective=two_values_stopped_at_trial_1)
    line = f"continue with: python cli.py tune --run-dir {tmp_path} --trials 2 --multi-objective"
    assert line in capsys.readouterr().err
    run_tune(tiny, study_dir=tmp_path, trials=2, multi_objective=True, objective=two_values)
    states = [t.state.name for t in optuna.load_study(study_name="mamo", storage=f"sqlite:///{tmp_path}/study.db").trials]
    assert states.count("COMPLETE") == 3, states


def test_a_ctrl_c_while_a_multi_objective_reference_trains_prints_the_flag(tmp_path, monkeypatch, capsys):
    import mamo.tune

    monkeypatch.setattr(mamo.tune, "_reference", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["tune", "quick", "--trials", "2", "--multi-objective", "--run-dir", str(tmp_path / "study"),
                 "--no-progress"]) == 130
    assert (f"continue with: python cli.py tune --run-dir {tmp_path / 'study'} --trials 2 --multi-objective"
            in capsys.readouterr().err)


def test_a_multi_objective_study_joined_without_the_flag_is_refused_before_its_reference_trains(
        tmp_path, tiny, monkeypatch):
    # The refusal came after the reference was trained or read (16 epochs of STL and HPS for a join with another
    # --workers count), and told a local folder's user to "pass another --study", which that folder refuses.
    import mamo.tune

    run_tune(tiny, study_dir=tmp_path, trials=1, multi_objective=True, objective=two_values)
    monkeypatch.setattr(mamo.tune, "_reference", never_trained)
    message = (f"study 'mamo' in {tmp_path} optimises the Pareto front of left.accuracy and right.accuracy (it was "
               "started with --multi-objective); add --multi-objective to continue it, or pass a new --run-dir for "
               "a study of one objective.")
    with pytest.raises(MamoError) as refused:
        run_tune(tiny, study_dir=tmp_path, trials=1, progress=False)
    assert str(refused.value) == message


def test_a_single_objective_study_joined_with_the_flag_is_refused_before_its_reference_trains(
        tmp_path, tiny, monkeypatch):
    import mamo.tune

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    run_tune(tiny, study_dir=tmp_path / "a", storage=url, study_name="s", trials=0, progress=False)
    monkeypatch.setattr(mamo.tune, "_reference", never_trained)
    message = ("study 's' optimises one objective, val_delta (it was started without --multi-objective); leave "
               "--multi-objective out to continue it, or pass a new --study for a multi-objective study.")
    with pytest.raises(MamoError) as refused:
        run_tune(tiny, storage=url, study_name="s", study_dir=tmp_path / "b", trials=0, multi_objective=True,
                 progress=False)
    assert str(refused.value) == message.replace("a new --study", "a new --study and --run-dir")
    assert not (tmp_path / "b").exists()  # the folder made for the refused join holds nothing: removed


def test_joining_a_study_says_so_on_stderr_not_in_the_result(tmp_path, tiny, capsys):
    # stdout is the result (`> file` keeps the summary alone); the join's note went there.
    run_tune(tiny, study_dir=tmp_path, trials=1, multi_objective=True, objective=two_values)
    capsys.readouterr()
    run_tune(tiny, study_dir=tmp_path, trials=1, multi_objective=True, objective=two_values)
    out, err = capsys.readouterr()
    assert "joining study 'mamo'" in err and "joining study" not in out


def test_the_study_folder_default_is_named_in_a_refusal_of_the_wrong_objective(tmp_path, tiny, monkeypatch):
    # Without --run-dir a shared study's folder is runs/tune-<study>: a new --study alone is the fix.
    import mamo.tune

    monkeypatch.setattr(mamo.tune, "RUNS_ROOT", tmp_path)
    monkeypatch.setattr(mamo.tune, "_shared_study_folder", lambda name: Path(tmp_path) / f"tune-{name}")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    run_tune(tiny, storage=url, study_name="s", trials=1, multi_objective=True, objective=two_values)
    monkeypatch.setattr(mamo.tune, "_reference", never_trained)
    with pytest.raises(MamoError, match=r"add --multi-objective to continue it, or pass a new --study for a study "
                                        r"of one objective\.$"):
        run_tune(tiny, storage=url, study_name="s", trials=1, progress=False)


def test_tune_resume_names_the_way_a_study_continues(tmp_path, capsys):
    # `search --resume DIR` continues a search; `tune --resume DIR` was argparse's "unrecognized arguments".
    assert main(["tune", "--resume", str(tmp_path), "--trials", "1"]) == 2
    assert capsys.readouterr().err == (
        f"mamo: error: tune continues a study when it runs again on the study's folder, not with --resume; pass "
        f"--run-dir {tmp_path} instead (and --multi-objective if the study was started with it).\n")
    assert list(tmp_path.iterdir()) == []


def test_a_multi_objective_study_is_not_told_to_use_multi_objective_for_a_reference_next_to_zero():
    # `tune logic --multi-objective` printed "rank such tasks with --multi-objective"; there the Δ only picks
    # best.yaml from the Pareto front, which round-off then picks.
    from mamo.data import load_data
    from mamo.tune import near_zero_reference_note

    tasks = load_data(load_config("logic").data).tasks
    stl = {task: {"mse": 0.02, "mae": 0.1} for task in tasks}
    stl["and"]["mse"] = 1.1e-13
    note = near_zero_reference_note(stl, tasks, multi=True)
    assert note == ("note: the STL reference scores and.mse = 1.1e-13 on the validation split, so a trial's error "
                    "there is a relative change of orders of magnitude that alone decides its validation Δ (Eq 15 "
                    "divides by STL), by which best.yaml is picked from the Pareto front; choose from the front in "
                    "summary.md by the metrics themselves.")
    assert "rank such tasks with --multi-objective" in near_zero_reference_note(stl, tasks)
