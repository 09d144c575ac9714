"""Δ (MAMO Eq 15) and win rate on hand-computed examples; the report's table layout and files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mamo.report import (
    build_rows,
    delta,
    metric_columns,
    relative_changes,
    time_notes,
    win_rate,
    write_metrics,
    write_report,
)
from mamo.tasks import parse_tasks

# One classification task (accuracy, higher is better) and one regression task (mse and mae, lower is better).
TASKS = parse_tasks({"a": {"type": "classification", "classes": 10}, "b": {"type": "regression", "dim": 2}}, "test")
STL = {"a": {"accuracy": 0.8, "loss": 0.5}, "b": {"mse": 0.5, "mae": 0.25, "loss": 0.5}}
# a: 0.8 -> 0.88 is +10 %; b.mse: 0.5 -> 0.4 is 20 % lower, so +20 %; b.mae: 0.25 -> 0.3 is 20 % higher, so -20 %.
HPS = {"a": {"accuracy": 0.88, "loss": 9.0}, "b": {"mse": 0.4, "mae": 0.3, "loss": 9.0}}


def test_metric_columns_cover_every_metric_with_its_direction() -> None:
    assert metric_columns(TASKS) == [("a", "accuracy", True), ("b", "mse", False), ("b", "mae", False)]


def test_relative_changes_are_signed_so_plus_means_better() -> None:
    changes = relative_changes(HPS, STL, TASKS)
    assert changes == pytest.approx({("a", "accuracy"): 10.0, ("b", "mse"): 20.0, ("b", "mae"): -20.0})


def test_delta_and_win_rate_by_hand() -> None:
    # Δ = (10 + 20 - 20) / 3; two of three metrics beat STL. The training loss is not a metric of Δ.
    assert delta(HPS, STL, TASKS) == pytest.approx(10.0 / 3)
    assert win_rate(HPS, STL, TASKS) == pytest.approx(2 / 3)


def test_identical_results_give_zero_delta_and_no_wins() -> None:
    assert delta(STL, STL, TASKS) == 0.0
    assert win_rate(STL, STL, TASKS) == 0.0  # a tie is not a win


def test_lower_is_better_only() -> None:
    tasks = parse_tasks({"r": {"type": "regression", "dim": 1}}, "test")
    stl = {"r": {"mse": 2.0, "mae": 1.0}}
    worse = {"r": {"mse": 3.0, "mae": 1.5}}  # both 50 % higher: -50 % each
    better = {"r": {"mse": 1.0, "mae": 0.75}}  # 50 % and 25 % lower
    assert delta(worse, stl, tasks) == pytest.approx(-50.0)
    assert win_rate(worse, stl, tasks) == 0.0
    assert delta(better, stl, tasks) == pytest.approx(37.5)
    assert win_rate(better, stl, tasks) == 1.0


def test_zero_stl_value_uses_the_absolute_difference() -> None:
    # Eq 15 divides by STL; where STL is exactly 0 the change is taken against 1 instead (in percent), so Δ stays
    # finite and keeps its sign.
    tasks = parse_tasks({"r": {"type": "regression", "dim": 1}, "c": {"type": "classification", "classes": 2}}, "t")
    stl = {"r": {"mse": 0.0, "mae": 0.0}, "c": {"accuracy": 0.0}}
    mtl = {"r": {"mse": 0.02, "mae": 0.0}, "c": {"accuracy": 0.5}}
    changes = relative_changes(mtl, stl, tasks)
    assert changes == pytest.approx({("r", "mse"): -2.0, ("r", "mae"): 0.0, ("c", "accuracy"): 50.0})
    assert delta(mtl, stl, tasks) == pytest.approx(16.0)
    assert win_rate(mtl, stl, tasks) == pytest.approx(1 / 3)


def test_a_zero_stl_value_is_noted_with_the_near_zero_ones() -> None:
    # The switch to points was silent: only 0 < |STL| < 1e-4 got a note (a helper's audit).
    from mamo.report import near_zero_note

    tasks = parse_tasks({"r": {"type": "regression", "dim": 1}, "c": {"type": "classification", "classes": 2}}, "t")
    note = near_zero_note({"r": {"mse": 0.0, "mae": 2e-5}, "c": {"accuracy": 0.0}}, tasks)
    assert note == ("note: STL scores r.mae = 2.0e-05 on the validation split; the report's Δ divides by STL (Eq 15), "
                    "so a tiny error there decides it alone: read the per-metric columns.\nnote: STL scores r.mse, "
                    "c.accuracy = 0 on the validation split, where Eq 15's relative change is undefined; the report's "
                    "Δ takes that change as (MTL − STL) × 100, in points, not percent.")
    assert near_zero_note({"r": {"mse": 0.5, "mae": 0.4}, "c": {"accuracy": 0.9}}, tasks) is None


def _from_relative(stl: dict, percents: dict, tasks) -> dict:
    """The absolute MTL values that a row of relative changes in a paper table stands for."""
    out: dict = {task: {} for task in stl}
    for task, metric, higher in metric_columns(tasks):
        sign = 1.0 if higher else -1.0
        out[task][metric] = stl[task][metric] * (1 + sign * percents[(task, metric)] / 100)
    return out


@pytest.mark.parametrize(
    ("row", "expected_delta", "expected_win"),
    [
        ((1.39, 0.33, 4.80, 3.74), 2.565, 1.0),  # MAMO: printed +2.57, 100 %
        ((0.93, 0.20, 0.0, -2.41), -0.32, 0.5),  # PCGrad: printed -0.31, 50 %; the 0 change is not a win
        ((0.96, 0.29, -0.80, -7.48), -1.7575, 0.5),  # HPS: printed -1.75, 50 %
    ],
)
def test_mamo_table_1_rows(row: tuple, expected_delta: float, expected_win: float) -> None:
    # CityScapes, MAMO Table 1: mIoU and pixel accuracy (higher is better), depth abs and rel error (lower is
    # better) against STL = 69.60, 91.82, 0.0125, 45.95; rebuilt from the printed relative changes.
    tasks = parse_tasks(
        {"miou": {"type": "classification", "classes": 7}, "pix": {"type": "classification", "classes": 7},
         "depth": {"type": "regression", "dim": 1}},
        "table 1",
    )
    stl = {"miou": {"accuracy": 69.60}, "pix": {"accuracy": 91.82}, "depth": {"mse": 0.0125, "mae": 45.95}}
    percents = dict(zip([("miou", "accuracy"), ("pix", "accuracy"), ("depth", "mse"), ("depth", "mae")], row,
                        strict=True))
    mtl = _from_relative(stl, percents, tasks)
    assert relative_changes(mtl, stl, tasks) == pytest.approx(percents)
    assert delta(mtl, stl, tasks) == pytest.approx(expected_delta)
    assert win_rate(mtl, stl, tasks) == expected_win


# -------------------------------------------------------------------------------------------------- layout


def _results() -> dict:
    return {
        "STL": {"tasks": STL, "params": 2000, "seconds_per_epoch": 2.0},
        "HPS (equal)": {"tasks": HPS, "params": 1200, "seconds_per_epoch": 1.0},
    }


def test_build_rows_stl_absolute_others_relative() -> None:
    stl_row, hps_row = build_rows(_results(), "STL", TASKS)
    assert stl_row["method"] == "STL" and "relative" not in stl_row
    assert stl_row["tasks"] == STL
    assert (stl_row["delta"], stl_row["win_rate"]) == (0.0, 0.0)  # as MAMO Table 1 prints the STL row
    assert hps_row["method"] == "HPS (equal)"
    assert hps_row["relative"] == pytest.approx(relative_changes(HPS, STL, TASKS))
    assert hps_row["delta"] == pytest.approx(10.0 / 3)
    assert hps_row["win_rate"] == pytest.approx(2 / 3)
    assert (hps_row["params"], hps_row["seconds_per_epoch"]) == (1200, 1.0)


def test_build_rows_without_stl_has_no_delta() -> None:
    (row,) = build_rows({"HPS": _results()["HPS (equal)"]}, None, TASKS)
    assert "delta" not in row and "relative" not in row and "win_rate" not in row


def test_report_md_and_csv(tmp_path: Path) -> None:
    rows = build_rows(_results(), "STL", TASKS)
    text = write_report(tmp_path, "mamo train: unit", rows, TASKS, "STL", notes="a note")
    assert (tmp_path / "report.md").read_text() == text
    lines = text.splitlines()
    assert lines[0] == "# mamo train: unit"
    assert lines[2].startswith("Test metrics as the relative change against STL in %")  # which split the tables show
    header = next(line for line in lines if line.startswith("| Method"))
    assert header == "| Method | a accuracy ↑ | b mse ↓ | b mae ↓ | Δ % ↑ | Win ↑ | Params | s/epoch |"
    assert "| STL | 0.8 | 0.5 | 0.25 | +0.00 | – | 2,000 | 2 |" in lines  # STL is the reference: no Win of its own
    assert "| HPS (equal) | +10.00 | +20.00 | -20.00 | +3.33 | 67% | 1,200 | 1 |" in lines
    # The second table holds every row's absolute values.
    assert "| HPS (equal) | 0.88 | 0.4 | 0.3 |" in lines
    assert lines[-1] == "a note"

    with open(tmp_path / "report.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert [(r["method"], r["task"], r["metric"]) for r in records] == [
        ("STL", "a", "accuracy"), ("STL", "b", "mse"), ("STL", "b", "mae"),
        ("HPS (equal)", "a", "accuracy"), ("HPS (equal)", "b", "mse"), ("HPS (equal)", "b", "mae"),
    ]
    mse = records[4]
    assert float(mse["value"]) == 0.4
    assert float(mse["relative_to_stl_percent"]) == pytest.approx(20.0)
    assert float(mse["delta"]) == pytest.approx(10.0 / 3)
    assert float(mse["win_rate"]) == pytest.approx(2 / 3)
    assert mse["params"] == "1200"
    assert records[0]["relative_to_stl_percent"] == ""  # STL is the reference, not relative to itself


def test_report_is_utf8_whatever_the_locale(tmp_path: Path) -> None:
    # Δ and the arrows used to be written in the locale's encoding: under a plain C locale (no UTF-8 coercion)
    # write_report raised UnicodeEncodeError after the whole run had trained.
    script = (  # ASCII only: the command line itself is read in the C locale
        "import sys; from pathlib import Path; from mamo.tasks import parse_tasks; "
        "from mamo.report import build_rows, write_report; "
        "tasks = parse_tasks({'a': {'type': 'classification', 'classes': 2}}, 'test'); "
        "result = {'tasks': {'a': {'accuracy': 0.5}}, 'params': 1, 'seconds_per_epoch': 1.0}; "
        "rows = build_rows({'STL': result, 'HPS': result}, 'STL', tasks); "
        "write_report(Path(sys.argv[1]), 'mamo', rows, tasks, 'STL')"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| Δ % ↑ |" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_report_without_stl_is_absolute_only(tmp_path: Path) -> None:
    rows = build_rows({"HPS": _results()["HPS (equal)"]}, None, TASKS)
    text = write_report(tmp_path, "t", rows, TASKS, None)
    assert "Δ" not in text and "Win" not in text
    assert "| HPS | 0.88 | 0.4 | 0.3 | 1,200 | 1 |" in text.splitlines()


def test_write_metrics_is_json(tmp_path: Path) -> None:
    write_metrics(tmp_path, {"tasks": HPS, "params": 1200, "delta": 3.5})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"tasks": HPS, "params": 1200, "delta": 3.5}


def test_growth_table_of_a_search_without_rounds_has_a_cell_under_each_header():
    from mamo.report import growth_notes

    header, rule, row = growth_notes([], {}, "multimnist").splitlines()[4:7]
    assert header == "| Detection | (no rounds) |" and row.count("|") == header.count("|") == 3


def test_the_time_section_gives_each_phase_its_epochs_and_the_rest_of_the_run() -> None:
    history = [{"phase": "pretrain", "seconds": 2.0}, {"phase": "round1", "seconds": 3.0},
               {"phase": "final", "seconds": 4.0}, {"phase": "final", "seconds": 6.0}]
    rows = time_notes(history, {"pretrain": 2.5, "round1": 3.5, "final": 11.0}, 100.0).splitlines()[4:9]
    assert rows == ["| pretrain | 1 | 2.5 s | 2 |", "| round1 | 1 | 3.5 s | 3 |", "| final | 2 | 11 s | 5 |",
                    "| other: data, baselines, test | - | 1 min 23 s | - |", "| all | 4 | 1 min 40 s | - |"]


def test_the_growth_table_names_a_plugin_by_its_file_not_its_folders() -> None:
    from mamo.report import growth_notes

    rounds = [{"round": 1, "modules": 2}]
    assert "| digits.py:make | 2 |" in growth_notes(rounds, {}, "/home/me/data/digits.py:make")
    assert "| multimnist | 2 |" in growth_notes(rounds, {}, "multimnist")


def test_a_markdown_tables_rule_has_a_cell_under_every_header():
    # GitHub's markdown renders no table when the rule row has fewer cells than the header.
    from mamo.runs import table_lines

    assert table_lines(["method", "left", "right"], [["STL", "0.8", "0.7"]]) == [
        "| method | left | right |", "|---|---|---|", "| STL | 0.8 | 0.7 |"]


def test_a_bar_in_a_cell_is_escaped_so_every_row_keeps_its_cells():
    # A task named 'a|b' gave report.md's header ten cells and its rows nine.
    from mamo.runs import table_lines

    header, rule, row = table_lines(["method", "a|b accuracy"], [["STL", "0.8"]])
    assert header == "| method | a\\|b accuracy |"
    assert [len(line.replace("\\|", "").split("|")) for line in (header, rule, row)] == [4, 4, 4]


def test_report_csv_carries_the_training_time_per_epoch_beside_the_params(tmp_path: Path) -> None:
    # DESIGN §8: parameter counts and training time per epoch beside Δ and Win, in the markdown and the CSV
    # table; the CSV had the params but not the time, so a script reading it lost the s/epoch column.
    rows = build_rows(_results(), "STL", TASKS)
    write_report(tmp_path, "mamo train: unit", rows, TASKS, "STL")
    with open(tmp_path / "report.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert [float(r["seconds_per_epoch"]) for r in records] == [2.0] * 3 + [1.0] * 3


def test_report_csv_leaves_an_unknown_time_per_epoch_empty(tmp_path: Path) -> None:
    results = _results()
    results["HPS (equal)"]["seconds_per_epoch"] = None  # e.g. a baseline cached before its time was recorded
    write_report(tmp_path, "mamo train: unit", build_rows(results, "STL", TASKS), TASKS, "STL")
    with open(tmp_path / "report.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert [r["seconds_per_epoch"] for r in records[3:]] == [""] * 3
