"""run_tune with a caller's own objective, as docs/python.md documents it: what its study folder says."""

from __future__ import annotations

import optuna
import pytest

from mamo.config import load_config
from mamo.errors import MamoError
from mamo.tune import run_tune


def draws_lr(trial: optuna.Trial) -> float:
    """A caller's objective that tunes a mamo setting (it would call run_train itself): no run folder, no STL."""
    return -abs(trial.suggest_float("lr", 1e-4, 1e-2, log=True) - 3e-3)


def test_an_own_objective_s_summary_names_no_run_folder_and_no_stl_reference(tmp_path):
    # Before: "Best configuration: .../best.yaml (trial 1, run folder ?)" and "Its train.lr is the trial's, not the
    # 0.003 the study's STL reference trained with", for a study that trained no reference and made no folders.
    result = run_tune(load_config("quick"), study_dir=tmp_path, trials=2, objective=draws_lr, progress=False)
    assert result["best_config"] == tmp_path / "best.yaml"
    assert f"Best configuration: {tmp_path / 'best.yaml'} (trial {result['best']}); run it" in result["text"]
    assert "run folder" not in result["text"]
    assert "STL reference" not in result["text"]
    assert (tmp_path / "summary.md").read_text() == result["text"]


def test_an_objective_workers_cannot_receive_is_refused_before_the_study_folder_is_made(tmp_path):
    # Before: the folder and study.db were made and the study line printed, then the workers' start failed with a
    # raw "AttributeError: Can't pickle local object ...<lambda>".
    with pytest.raises(MamoError) as caught:
        run_tune(load_config("quick"), study_dir=tmp_path / "study", trials=2, workers=2,
                 objective=lambda trial: trial.suggest_float("alpha", 0, 1), progress=False)
    message = str(caught.value)
    assert message.startswith("the objective test_an_objective_workers_cannot_receive_is_refused_before_the_study_"
                              "folder_is_made.<locals>.<lambda> cannot be pickled into the 2 worker processes")
    assert message.endswith("; pass a module-level function, or workers=1.")
    assert message.count(". ") == 0  # one sentence
    assert not (tmp_path / "study").exists()
