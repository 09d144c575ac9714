"""run_tune with a caller's own objective, as docs/python.md documents it: what its study folder says."""

from __future__ import annotations

import optuna

from mamo.config import load_config
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
