"""The search end to end (MAMO Algorithm 1): run folder, growth records, resume, export round trips, bad input."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch

import mamo
from mamo import graph as g
from mamo.checkpoint import (
    IN_PHASE,
    PHASE_KEYS,
    load_checkpoint,
    newest_state,
    remove_search_checkpoints,
    save_checkpoint,
)
from mamo.cli import main
from mamo.config import load_config
from mamo.errors import MamoError, TrainingDiverged
from mamo.export import FORMATS, architecture_tree, export, load_trained
from mamo.report import delta, win_rate
from mamo.resume import computed_changes
from mamo.runs import FolderLock
from mamo.search import run_search
from mamo.search_plan import (
    budget_note,
    check_search_config,
    final_epochs,
    method_name,
    plan_line,
    search_phases,
    tensioner_window_note,
)
from mamo.trainer import Callback

TINY = [
    "data.train_size=256", "data.val_size=64", "data.test_size=64", "train.batch_size=64", "train.epochs=2",
    "search.pretrain_epochs=1", "search.round_epochs=1", "search.final_epochs=1",
    "train.device=cpu",  # the resume tests compare runs exactly; CUDA's convolution backward is not deterministic
]


SMALL_TIMM = ["data.train_size=64", "data.val_size=32", "data.test_size=32", "search.baselines=false"]


def tiny(*extra: str, preset: str = "quick"):
    return load_config(preset, [*TINY, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "search"
    metrics = run_search(tiny(), run_dir, progress=False, quiet=True, loggers=False)
    return run_dir, metrics


def test_search_writes_the_run_folder(finished):
    run_dir, metrics = finished
    for name in ("config.yaml", "log.txt", "metrics.json", "report.md", "report.csv", "architecture.json",
                 "architecture.graphml", "architecture.dot", "architecture.png", "weights.safetensors"):
        assert (run_dir / name).is_file(), name
    graph = g.graph_from_dict(json.loads((run_dir / "architecture.json").read_text()))
    assert set(nx.read_graphml(run_dir / "architecture.graphml").nodes) == set(graph.nodes)
    assert all(f'"{node}" [label=' in (run_dir / "architecture.dot").read_text() for node in graph.nodes)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert set(saved["tasks"]) == {"left", "right"}
    assert isinstance(saved["gmk_modules"], int) and len(saved["rounds"]) == 2
    assert {"stl", "hps"} <= set(saved["baselines"]) and 0.0 <= saved["win_rate"] <= 1.0
    assert saved["gmk_modules"] == sum(r["modules"] for r in saved["rounds"])
    assert saved["environment"]["mamo"] == mamo.__version__ and saved["environment"]["device"] == "cpu"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    assert checkpoints == ["phase-00-pretrain.pt", "phase-01-round1.pt", "phase-02-round2.pt", "phase-03-final.pt"]
    report = (run_dir / "report.md").read_text()
    assert "STL" in report and "HPS (equal)" in report and "MAMO-1" in report
    assert ("s/epoch is the training time of one epoch (validation excluded); STL's adds its networks' and a grown "
            "model's is its final phase's.\n") in report


def test_the_report_times_each_phase_and_the_grown_network_by_its_final_phase(finished):
    run_dir, metrics = finished
    history = torch.load(run_dir / "checkpoints" / "phase-03-final.pt", weights_only=False)["history"]
    assert [h["phase"] for h in history] == ["pretrain", "round1", "round2", "final"]
    # Not the mean over every phase (other network sizes, and the rounds' per-cell Gramians).
    assert metrics["seconds_per_epoch"] == history[-1]["seconds"]
    time_section = (run_dir / "report.md").read_text().split("## Time")[1]
    assert [line.split(" | ")[0] for line in time_section.splitlines() if line.startswith("| ")][1:] == [
        "| pretrain", "| round1", "| round2", "| final", "| other: data, baselines, test", "| all"]


def test_a_finished_search_can_drop_its_checkpoints_and_keep_its_model(finished, tmp_path):
    # A tune study keeps one folder per trial; every round's checkpoint of each (~0.9 GB for a 5-round
    # ResNet-18 trial) outlived its use, which ends with metrics.json.
    run_dir = tmp_path / "lean"
    metrics = run_search(tiny("search.keep_checkpoints=false"), run_dir, progress=False, quiet=True, loggers=False)
    assert not (run_dir / "checkpoints").exists()
    assert "removed the phase checkpoints (" in (run_dir / "log.txt").read_text()
    # The same search as the one that kept them, and the same model from the run folder.
    kept, _ = finished
    assert metrics["tasks"] == json.loads((kept / "metrics.json").read_text())["tasks"]
    image = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        lean, full = load_trained(run_dir)(image), load_trained(kept)(image)
    assert lean.keys() == full.keys() and all(torch.equal(lean[task], full[task]) for task in full)
    with pytest.raises(MamoError, match=r"has finished \(metrics.json is there\); nothing to resume"):
        run_search(None, run_dir, progress=False, quiet=True, resume=True)
    # What a finished search keeps changes nothing it computes: a stopped one may resume with another choice.
    assert computed_changes(tiny().to_dict(), tiny("search.keep_checkpoints=false").to_dict()) == []


def test_removing_a_searchs_checkpoints_leaves_files_it_did_not_write(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, size in (("phase-00-pretrain.pt", 3), ("phase-11-round11.pt", 5), (IN_PHASE, 7),
                       ("phase-final.pt", 1), ("notes.txt", 1)):
        (folder / name).write_bytes(b"x" * size)
    assert remove_search_checkpoints(folder) == 15
    assert sorted(path.name for path in folder.iterdir()) == ["notes.txt", "phase-final.pt"]


def test_the_headline_numbers_compare_the_right_splits(finished):
    # Δ and Win are the test split's against STL's test metrics, val_delta (final and per round) the validation
    # split's against STL's validation metrics (swapping either went unnoticed before).
    run_dir, _ = finished
    saved = json.loads((run_dir / "metrics.json").read_text())
    tasks, stl = load_trained(run_dir).tasks, saved["baselines"]["stl"]
    assert saved["tasks"] != saved["val"] and stl["tasks"] != stl["val"]  # so a swap shows
    assert saved["delta"] == delta(saved["tasks"], stl["tasks"], tasks)
    assert saved["win_rate"] == win_rate(saved["tasks"], stl["tasks"], tasks)
    assert saved["val_delta"] == delta(saved["val"], stl["val"], tasks)
    assert [r["val_delta"] for r in saved["rounds"]] == [delta(r["val"], stl["val"], tasks) for r in saved["rounds"]]


def test_a_tensioner_window_longer_than_the_final_phase_is_noted_in_the_log(finished):
    run_dir, _ = finished  # 256 / 64 = 4 steps an epoch, one final epoch, the quick preset's T = 4
    assert ("the tensioner needs T + 1 = 5 steps before it acts, and the final phase has 4 (1 epoch of 4 steps)"
            in (run_dir / "log.txt").read_text())


def test_the_search_says_its_plan_when_it_starts(finished):
    run_dir, _ = finished
    assert ("plan: pretrain 1 epoch, 2 detection rounds of 1 epoch, final 1 epoch; first the baselines (STL: 2 "
            "networks, HPS: one), 2 epochs each unless cached") in (run_dir / "log.txt").read_text()
    assert plan_line(tiny("search.rounds=0", "search.baselines=false", "search.pretrain_epochs=2"), 3) == (
        "plan: pretrain 2 epochs, no detection round, final 1 epoch")


def test_the_tensioner_note_appears_only_when_the_window_cannot_fit():
    assert tensioner_window_note(tiny("search.final_epochs=2"), 256) is None  # 8 steps for a window of 5
    assert tensioner_window_note(tiny("search.final_epochs=2"), 256, T=7) is None  # exactly fits: 8 ≤ 8
    assert "T + 1 = 9" in tensioner_window_note(tiny("search.final_epochs=2"), 256, T=8)
    assert tensioner_window_note(tiny("direction.tensioner.formulation=off"), 256) is None
    assert tensioner_window_note(tiny("search.rounds=0"), 256) is None  # nothing grows, nothing resets it
    assert "Lower tune.T's upper end" in tensioner_window_note(tiny(), 256, T=30, setting="tune.T's upper end")
    assert "if the last round grows, it will not act there" in tensioner_window_note(tiny(), 256, T=30)
    # Under ub the final phase always restarts the window, grown or not.
    ub = tensioner_window_note(tiny("train.gradients=ub"), 256, T=30)
    assert "under train.gradients=ub that phase always starts a new window, so it will not act there" in ub


def test_a_reports_method_name_tells_apart_every_setting_the_direction_reads():
    names = {method_name(tiny(*settings)) for settings in [
        (), ("train.gradients=ub",), ("direction.normalization=l2",), ("direction.tensioner.formulation=relative",),
        ("direction.tensioner.formulation=off",), ("search.modules=exclusive",)]}
    assert len(names) == 6
    assert method_name(tiny("train.gradients=ub")) == "MAMO (mgda+tensioner(thesis), ub)"
    assert method_name(tiny("direction.name=cagrad", "direction.tensioner.formulation=off")) == "MAMO (cagrad(c=0.5))"


def test_the_final_phase_takes_the_rest_of_the_baselines_budget_unless_set():
    budget = ["train.epochs=30", "search.pretrain_epochs=4", "search.round_epochs=3", "search.final_epochs=null"]
    assert [final_epochs(tiny(*budget, f"search.rounds={z}")) for z in (0, 2, 5)] == [26, 20, 11]
    assert final_epochs(tiny(*budget, "search.final_epochs=7")) == 7
    with pytest.raises(MamoError, match=r"4 \+ 10 × 3 = 34 epochs leave no epoch of the budget train.epochs = 30"):
        check_search_config(tiny(*budget, "search.rounds=10"))
    with pytest.raises(MamoError, match=r"= 30 epochs leave no epoch"):  # the last round's modules need training
        check_search_config(tiny("train.epochs=30", "search.pretrain_epochs=28", "search.round_epochs=1",
                                 "search.rounds=2", "search.final_epochs=null"))
    check_search_config(tiny("train.epochs=30", "search.pretrain_epochs=30", "search.rounds=0",
                             "search.final_epochs=null"))  # no rounds: nothing grows, a final phase may be 0


def test_the_plan_gives_each_phase_its_kind_round_and_epochs_and_every_kind_has_a_runner():
    from mamo.search_phases import PHASE_RUNNERS

    plan = search_phases(tiny("train.epochs=30", "search.pretrain_epochs=4", "search.round_epochs=3",
                              "search.rounds=2", "search.final_epochs=null"))
    assert [(p.index, p.name, p.kind, p.round, p.epochs) for p in plan] == [
        (0, "pretrain", "pretrain", 0, 4), (1, "round1", "round", 1, 3), (2, "round2", "round", 2, 3),
        (3, "final", "final", 0, 20)]
    assert {p.kind for p in plan} == set(PHASE_RUNNERS)
    assert [p.kind for p in search_phases(tiny("search.rounds=0"))] == ["pretrain", "final"]


def test_round_epochs_must_be_positive_only_when_there_are_rounds():
    with pytest.raises(MamoError, match=r"search.round_epochs must be ≥ 1 when search.rounds > 0 .*got 0"):
        check_search_config(tiny("search.round_epochs=0"))
    check_search_config(tiny("search.round_epochs=0", "search.rounds=0"))
    # Before: exit 0 with an untrained model (train refuses epochs=0 for that reason).
    with pytest.raises(MamoError, match=r"are all 0, so the search would train nothing"):
        check_search_config(tiny("search.rounds=0", "search.pretrain_epochs=0", "search.final_epochs=0"))
    with pytest.raises(MamoError, match=r"search.pretrain_epochs must be a non-negative integer, got -1"):
        check_search_config(tiny("search.pretrain_epochs=-1"))
    # Both ran: a module grown and never trained, and an MTL search whose config.yaml said stl.
    with pytest.raises(MamoError, match=r"^search.final_epochs = 0 leaves the modules the last round grows "
                                        r"untrained; .* or set search.rounds to 0\.$"):
        check_search_config(tiny("search.final_epochs=0"))
    with pytest.raises(MamoError, match=r"^train.mode 'stl' is for the train command; a search always trains"):
        check_search_config(tiny("train.mode=stl"))


def test_a_search_whose_stl_scores_a_metric_next_to_zero_says_the_report_delta_hangs_on_it(tmp_path, monkeypatch):
    # search concave reported Δ = -3,948,480 % against an STL MSE of 1.3e-6, with nothing saying why.
    import mamo.search

    real = mamo.search.cached_baselines

    def near_zero(*args, **kwargs):
        results = real(*args, **kwargs)
        results["stl"]["val"]["left"]["accuracy"] = 2e-5
        return results

    monkeypatch.setattr(mamo.search, "cached_baselines", near_zero)
    run_search(tiny("search.rounds=0"), tmp_path / "r", progress=False, quiet=True, loggers=False)
    assert ("note: STL scores left.accuracy = 2.0e-05 on the validation split; the report's Δ divides by STL (Eq 15)"
            in (tmp_path / "r" / "log.txt").read_text())


def test_a_search_longer_or_shorter_than_its_baselines_is_noted():
    assert budget_note(tiny("search.final_epochs=null")) is None
    assert "trains 5 epochs and the STL/HPS baselines train.epochs = 2" in budget_note(tiny("search.final_epochs=2"))
    assert budget_note(tiny("search.final_epochs=2", "search.baselines=false")) is None


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).parents[1] / "search_spaces").glob("*.yaml")))
def test_every_preset_searches_with_its_baselines_budget(preset):
    from mamo.tune_space import check_space_ends

    config = load_config(preset)
    check_search_config(config)
    assert budget_note(config) is None, preset
    check_space_ends(config)  # `tune PRESET` too: its range of Z leaves every trial's final phase ≥ 0 epochs


def test_round_records_match_the_grown_graph(finished):
    run_dir, metrics = finished
    graph = g.graph_from_dict(json.loads((run_dir / "architecture.json").read_text()))
    activated = [tuple(pos[0]) for r in metrics["rounds"] for pos in r["activated"]]
    assert len(g.branch_nodes(graph)) == metrics["gmk_modules"]
    for pair in activated:
        assert any(tuple(graph.nodes[n]["group"]) == pair for n in g.branch_nodes(graph))
    for record in metrics["rounds"]:
        assert np.array(record["conflicts"]["counts"]).shape == (3, 2, 2)


class SlowRoundEnd(Callback):
    def on_round_end(self, record) -> None:
        time.sleep(0.6)  # as a round's pictures take (45% of a 10-task search's wall time)


def test_a_rounds_wall_time_includes_what_its_callbacks_did_after_it(tmp_path):
    # The round's pictures were counted in no phase: the report put them under "other: data, baselines, test".
    metrics = run_search(tiny("search.rounds=1", "search.baselines=false"), tmp_path / "run", progress=False,
                         quiet=True, loggers=False, callbacks=[SlowRoundEnd()])
    assert metrics["phase_seconds"]["round1"] >= 0.6
    report = (tmp_path / "run" / "report.md").read_text()
    assert "A detection round's wall time includes growing the network and drawing the round's pictures." in report


class Closable(Callback):
    closed = False

    def close(self) -> None:
        self.closed = True


def test_a_search_leaves_its_callers_callbacks_open(tmp_path):
    # It closed any callback with a close(); train closed only its own logger (a helper's code review).
    mine = Closable()
    run_search(tiny("search.rounds=1", "search.baselines=false"), tmp_path / "run", progress=False, quiet=True,
               callbacks=[mine])
    assert not mine.closed


def test_a_round_in_which_nothing_conflicted_says_so(tmp_path, monkeypatch):
    # A 6-task logic search's rounds 4-5 logged "activated nothing" with 7 positions still free and all Q = 0.
    from mamo.search_phases import ConflictRecorder

    real_close = ConflictRecorder.close

    def without_conflicts(self):
        stats = real_close(self)
        stats.counts[:] = 0
        return stats

    monkeypatch.setattr(ConflictRecorder, "close", without_conflicts)
    run_search(tiny("search.rounds=1", "search.baselines=false"), tmp_path / "run", progress=False, quiet=True,
               loggers=False)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "activated nothing (no position that can still grow conflicted in any mini-batch); 0 new modules" in log


def test_a_round_in_which_a_tasks_gradient_was_always_zero_names_it(tmp_path, monkeypatch):
    # A task with one class froze the trunk under MGDA (min-norm direction zero) and the log said nothing.
    from mamo.search_phases import ConflictRecorder

    real_close = ConflictRecorder.close

    def right_silent(self):
        stats = real_close(self)
        stats.measured[:, 1, :] = stats.measured[:, :, 1] = 0  # as update leaves them for a zero gradient
        return stats

    monkeypatch.setattr(ConflictRecorder, "close", right_silent)
    run_search(tiny("search.rounds=1", "search.baselines=false"), tmp_path / "run", progress=False, quiet=True,
               loggers=False)
    assert "note: right's gradient was zero at every shared cell in all 4 mini-batches of round 1" in (
        tmp_path / "run" / "log.txt").read_text()


def test_every_activated_position_is_listed_with_its_modules_even_none(tmp_path):
    # A position whose modules already existed (a deeper cell of a pair activated lower too) vanished from the
    # report's "Modules per activated (pair, cell)" and metrics.json (63 of 70 in an 8-task exclusive search).
    # `layer` activates the pair at every cell where it conflicted: the shallowest grows the branch, the rest none.
    metrics = run_search(tiny("search.threshold=layer", "search.rounds=1", "search.baselines=false"),
                         tmp_path / "run", progress=False, quiet=True, loggers=False)
    activated = [f"{'+'.join(pair)}@cell{cell}" for pair, cell in metrics["rounds"][0]["activated"]]
    assert sorted(metrics["modules_per_position"]) == sorted(activated) == [f"left+right@cell{c}" for c in range(3)]
    assert metrics["modules_per_position"] == {"left+right@cell0": 3, "left+right@cell1": 0, "left+right@cell2": 0}
    assert "- left+right@cell2: 0" in (tmp_path / "run" / "report.md").read_text()


def test_a_round_with_nothing_left_to_grow_says_so(tmp_path):
    # Round 1 grows every pair from cell 0, so round 2 cannot grow anything; its log line said only "nothing".
    run_search(tiny("search.threshold=topk:100", "search.baselines=false"), tmp_path / "run", progress=False,
               quiet=True, loggers=False)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "round 1: " in log and "activated nothing" not in log.split("round 2: ")[0]
    assert "activated nothing (every position already had its module: no round can grow more)" in log


def test_json_and_weights_rebuild_the_model_exactly(finished, tmp_path):
    run_dir, _ = finished
    model = load_trained(run_dir)
    state = torch.load(run_dir / "checkpoints" / "phase-03-final.pt", weights_only=False)
    reference = load_trained(run_dir)
    reference.load_state_dict(state["model"])
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        for task, value in model(x).items():
            assert torch.equal(value, reference.eval()(x)[task])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA fails")
def test_a_device_that_fails_is_not_reported_as_damaged_files(finished):
    # Loading straight onto the device, its error (no driver here) read "the model files ... are unreadable or do
    # not fit together ... restore them from a copy" (a review of the CUDA paths).
    run_dir, _ = finished
    with pytest.raises(MamoError) as caught:  # torch's "Found no NVIDIA driver" named no option (a user audit)
        load_trained(run_dir, device="cuda")
    assert str(caught.value) == "load_trained's device is 'cuda' but no CUDA device is visible; use auto or cpu."
    assert load_trained(run_dir, device="cpu").graph.number_of_nodes() > 0
    assert load_trained(run_dir, device=torch.device("cpu")).graph.number_of_nodes() > 0


def test_onnx_and_pt2_programs_give_the_same_outputs(finished, tmp_path):
    run_dir, _ = finished
    onnxruntime = pytest.importorskip("onnxruntime")
    written = export(run_dir, ["onnx", "pt2", "json", "graphml", "dot"], tmp_path)
    assert [p.name for p in written] == [FORMATS[f][0] for f in ("onnx", "pt2", "json", "graphml", "dot")]
    model = load_trained(run_dir)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    alone = tmp_path / "alone"  # the .onnx is the whole program: copied without anything beside it, it runs
    alone.mkdir()
    (alone / "model.onnx").write_bytes((tmp_path / "model.onnx").read_bytes())
    assert not (tmp_path / "model.onnx.data").exists()
    session = onnxruntime.InferenceSession(str(alone / "model.onnx"))
    outputs = session.run(None, {"x": x.numpy()})
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    assert isinstance(program(x), tuple) and len(program(x)) == len(model.tasks)  # as README says: task order
    for index, task in enumerate(model.tasks):
        np.testing.assert_allclose(outputs[index], expected[task].numpy(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(program(x)[index], expected[task])

    assert set(nx.read_graphml(tmp_path / "architecture.graphml").nodes) == set(model.graph.nodes)
    dot = (tmp_path / "architecture.dot").read_text()
    assert "digraph mamo" in dot
    assert '"cell0" [label="cell0\\n' in dot and "\\\\n" not in dot  # a line break, not a printed backslash
    trunk = model.graph.nodes["cell2"]["params"]
    assert f'"cell2" [label="cell2\\n{trunk:,} params"' in dot and trunk >= 1000  # as show and the PNG write it


def test_a_small_models_onnx_export_removes_an_earlier_exports_weights_file(finished, tmp_path):
    run_dir, _ = finished
    pytest.importorskip("onnx")
    stale = tmp_path / "model.onnx.data"  # what a larger model's export left in the same folder
    stale.write_bytes(b"weights of another model")
    export(run_dir, ["onnx"], tmp_path)
    assert (tmp_path / "model.onnx").is_file() and not stale.exists()


def test_a_search_on_the_cnn_grows_and_exports_programs_that_match_it(tmp_path):
    run_dir = tmp_path / "run"
    metrics = run_search(tiny("model.backbone=cnn", "model.hidden=[8, 8]", "search.threshold=topk:100",
                              "search.baselines=false"), run_dir, progress=False, quiet=True, loggers=False)
    assert metrics["gmk_modules"] == 2  # the one pair, at both cells
    onnxruntime = pytest.importorskip("onnxruntime")
    export(run_dir, ["onnx", "pt2"], tmp_path)
    model = load_trained(run_dir)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    outputs = onnxruntime.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"x": x.numpy()})
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    assert isinstance(program(x), tuple) and len(program(x)) == len(model.tasks)  # as README says: task order
    for index, task in enumerate(model.tasks):
        np.testing.assert_allclose(outputs[index], expected[task].numpy(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(program(x)[index], expected[task])


@pytest.mark.parametrize("name", ["x'y", "sp ace", "ü/ø", "{x}", "9x", "x#y%z"])
def test_odd_task_names_that_are_allowed_export_a_pt2_that_loads(name, tmp_path):
    # The names the task check lets through; '"', '\\' and control characters broke the program (refused now).
    from mamo.config import ModelConfig
    from mamo.export import write_pt2
    from mamo.graph import build_hps_graph
    from mamo.model import compile_model
    from mamo.spaces import create_space
    from mamo.tasks import parse_tasks

    tasks = parse_tasks({"a": {"type": "classification", "classes": 2},
                         name: {"type": "classification", "classes": 3}}, "a test")
    model = compile_model(build_hps_graph(create_space(ModelConfig(backbone="mlp"), (1, 8, 8)), tasks)).eval()
    write_pt2(model, tmp_path / "model.pt2")
    x = torch.rand(3, 1, 8, 8)
    outputs = torch.export.load(str(tmp_path / "model.pt2")).module()(x)
    with torch.no_grad():
        assert torch.equal(outputs[1], model(x)[name])


def test_the_python_export_takes_one_format_as_a_string(finished, tmp_path):
    run_dir, _ = finished  # a string was iterated: "dot" was the unknown formats "d", "o" and "t"
    assert export(run_dir, "dot", tmp_path / "out") == [tmp_path / "out" / "architecture.dot"]
    assert (tmp_path / "out" / "architecture.dot").read_text().startswith("digraph")


def test_export_out_must_be_a_folder(finished, tmp_path, capsys):
    run_dir, _ = finished
    a_file = tmp_path / "architecture.json"
    a_file.write_text("{}")
    assert main(["export", str(run_dir), "--format", "json", "--out", str(a_file)]) == 2  # was FileExistsError
    assert f"--out {a_file} is a file; --out takes a folder" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated weights", "json without nodes", "weights of another model"])
def test_damaged_model_files_are_one_sentence(finished, tmp_path, damage):
    run_dir, _ = finished
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("architecture.json", "weights.safetensors"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    if damage == "truncated weights":
        (copy / "weights.safetensors").write_bytes((run_dir / "weights.safetensors").read_bytes()[:100])
    elif damage == "json without nodes":
        spec = json.loads((run_dir / "architecture.json").read_text())
        (copy / "architecture.json").write_text(json.dumps({**spec, "nodes": spec["nodes"][:3]}))
    else:
        from safetensors.torch import load_file, save_file

        state = load_file(str(run_dir / "weights.safetensors"))
        save_file({k: v for k, v in state.items() if "gmk" not in k and "branch" not in k} | {"extra": torch.ones(1)},
                  str(copy / "weights.safetensors"))
    with pytest.raises(MamoError, match=f"the model files in {copy} are unreadable or do not fit together"):
        load_trained(copy)


def test_show_prints_the_tree(finished, capsys):
    run_dir, metrics = finished
    assert main(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "cell0" in out and f"{metrics['gmk_modules']} GMK modules" in out
    assert architecture_tree(load_trained(run_dir)) in out
    # A terminal without box-drawing characters gets the same tree in ASCII (it used to crash printing it).
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    ascii_tree = subprocess.run([sys.executable, "-m", "mamo.cli", "show", str(run_dir)], env=env,
                                capture_output=True, text=True)
    assert ascii_tree.returncode == 0, ascii_tree.stderr
    assert ascii_tree.stdout.isascii() and "\n|- left: fusion [trunk + beta*" in ascii_tree.stdout
    assert len(ascii_tree.stdout.splitlines()) == len(out.splitlines())
    # Started with stdout closed (`>&-`) Python has no sys.stdout: show read its encoding and crashed.
    closed = subprocess.run(["sh", "-c", '"$0" -m mamo.cli show "$1" >&-', sys.executable, str(run_dir)],
                            capture_output=True, text=True)
    assert closed.returncode == 0 and closed.stderr == ""


class Crash(Callback):
    """Stops the search as the phase after round 1 starts: round 1 is checkpointed (it ends before its checkpoint,
    so a stop in on_round_end would redo it)."""

    def __init__(self):
        self.ended = False

    def on_round_end(self, record) -> None:
        self.ended = self.ended or record.round == 1

    def on_phase_start(self, phase, model) -> None:
        if self.ended:
            raise KeyboardInterrupt


class SlowThenCrash(Crash):
    """Spends 1.5 s in pretraining before the stop, so that the time before a stop is visible after a resume."""

    def on_epoch_end(self, trainer, metrics) -> None:
        if trainer.description == "pretrain":
            time.sleep(1.5)


def test_a_stopped_search_resumes_to_the_same_architecture(tmp_path):
    config = tiny("search.threshold=topk:1", "search.rounds=2")
    whole = run_search(config, tmp_path / "whole", progress=False, quiet=True, loggers=False)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, tmp_path / "cut", progress=False, quiet=True, loggers=False, callbacks=[SlowThenCrash()])
    assert not (tmp_path / "cut" / "metrics.json").exists()
    before_stop = torch.load(tmp_path / "cut" / "checkpoints" / "phase-01-round1.pt", weights_only=False)["seconds"]
    assert before_stop >= 1.5
    log = (tmp_path / "cut" / "log.txt").read_text().splitlines()
    assert log[-1].endswith(f"); continue with: python cli.py search --resume {tmp_path / 'cut'}")
    # A refused --set is not kept: it was written into config.yaml first, and every later resume failed on it.
    saved = (tmp_path / "cut" / "config.yaml").read_text()
    with pytest.raises(MamoError, match="train.device is 'cuda:99' but"):
        run_search(None, tmp_path / "cut", progress=False, quiet=True, loggers=False, resume=True,
                   resume_settings=["train.device=cuda:99"])
    assert (tmp_path / "cut" / "config.yaml").read_text() == saved
    resumed = run_search(config, tmp_path / "cut", progress=False, quiet=True, loggers=False, resume=True)
    whole_graph = json.loads((tmp_path / "whole" / "architecture.json").read_text())
    resumed_graph = json.loads((tmp_path / "cut" / "architecture.json").read_text())
    assert whole_graph == resumed_graph
    assert [r["activated"] for r in whole["rounds"]] == [r["activated"] for r in resumed["rounds"]]
    for task, values in whole["tasks"].items():
        assert values == pytest.approx(resumed["tasks"][task], rel=1e-5)
    # The time before the stop counts (it used to start again from 0 in the resumed process).
    assert resumed["seconds"] >= before_stop + resumed["phase_seconds"]["round2"] + resumed["phase_seconds"]["final"]
    finished = (tmp_path / "cut" / "metrics.json").read_bytes()
    with pytest.raises(MamoError, match=r"has finished \(metrics.json is there\); nothing to resume"):
        run_search(config, tmp_path / "cut", progress=False, quiet=True, loggers=False, resume=True)
    assert (tmp_path / "cut" / "metrics.json").read_bytes() == finished


class CrashAtRoundOne(Callback):
    def on_phase_start(self, phase, model) -> None:
        if phase == "round1":
            raise KeyboardInterrupt


def test_a_stopped_mgda_ub_search_resumes_to_the_same_weights(tmp_path):
    # Rounds switch MGDA-UB to exact gradients, which restarts the tensioner's history; a resumed run must
    # know which kind of gradient norms its restored history holds.
    config = tiny("train.gradients=ub", "search.rounds=1", "search.pretrain_epochs=2", "search.final_epochs=1",
                  "search.baselines=false")
    run_search(config, tmp_path / "whole", progress=False, quiet=True, loggers=False)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, tmp_path / "cut", progress=False, quiet=True, loggers=False, callbacks=[CrashAtRoundOne()])
    run_search(config, tmp_path / "cut", progress=False, quiet=True, loggers=False, resume=True)
    assert (tmp_path / "cut" / "weights.safetensors").read_bytes() == (
        tmp_path / "whole" / "weights.safetensors").read_bytes()


class CrashInPhase(Callback):
    """Stops the search inside ``phase``, after its second epoch (the in-phase checkpoint holds the first)."""

    def __init__(self, phase: str):
        self.phase, self.epochs = phase, 0

    def on_epoch_end(self, trainer, metrics):
        self.epochs += trainer.description == self.phase
        if self.epochs == 2:
            raise KeyboardInterrupt


def test_a_search_resumed_inside_the_final_phase_keeps_the_best_epoch_from_before_the_stop(tmp_path, monkeypatch):
    # Every validation score is worse than the one before, so the final phase's first epoch is its best. That
    # epoch ran before the stop: the resumed run must restore it from the in-phase checkpoint, not pick the best
    # of the epochs it ran itself (the unpatched score usually favours the last epoch either way, which hides
    # a forgotten best).
    scores = itertools.count()
    monkeypatch.setattr("mamo.trainer.selection_score", lambda metrics, reference: float(next(scores)))
    config = tiny("search.threshold=topk:1", "search.rounds=1", "search.pretrain_epochs=1", "search.round_epochs=1",
                  "search.final_epochs=3", "search.baselines=false", "train.checkpoint_seconds=0")
    whole = run_search(config, tmp_path / "whole", progress=False, quiet=True, loggers=False)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_search(config, cut, progress=False, quiet=True, loggers=False, callbacks=[CrashInPhase("final")])
    inside = torch.load(cut / "checkpoints" / IN_PHASE, weights_only=False)
    assert inside["phase"] == "final" and inside["epochs_done"] == 1
    assert inside["best"]["best_epoch"] == inside["epoch"]  # the best so far is the epoch before the stop
    resumed = run_search(config, cut, progress=False, quiet=True, loggers=False, resume=True)
    assert resumed["tasks"] == whole["tasks"] and resumed["val"] == whole["val"]
    assert (cut / "weights.safetensors").read_bytes() == (tmp_path / "whole" / "weights.safetensors").read_bytes()


def _save(folder, name: str, phase_index: int, **extra) -> None:
    # Only the keys a search's checkpoint must have: their values do not matter to newest_state.
    keys = dict.fromkeys(PHASE_KEYS)
    save_checkpoint(folder / name, {**keys, "phase_index": phase_index, "which": name, **extra})


def test_newest_state_prefers_the_in_phase_checkpoint_only_inside_the_phase_after_the_newest(tmp_path):
    assert newest_state(tmp_path) is None
    _save(tmp_path, IN_PHASE, 0, epochs_done=1)  # stopped inside pretraining, before any phase checkpoint
    assert newest_state(tmp_path)["which"] == IN_PHASE
    _save(tmp_path, "phase-00-pretrain.pt", 0)
    _save(tmp_path, "phase-01-round1.pt", 1)
    # A stale in-phase checkpoint (of round 1, which its own phase checkpoint has since superseded, e.g. when
    # the stop came between writing that and deleting in-phase.pt) must not be resumed.
    _save(tmp_path, IN_PHASE, 1, epochs_done=2)
    assert newest_state(tmp_path)["which"] == "phase-01-round1.pt"
    _save(tmp_path, IN_PHASE, 0, epochs_done=1)  # older still
    assert newest_state(tmp_path)["which"] == "phase-01-round1.pt"
    _save(tmp_path, IN_PHASE, 2, epochs_done=1)  # inside the phase after round 1: newer than its checkpoint
    assert newest_state(tmp_path)["which"] == IN_PHASE


@pytest.mark.parametrize("phase", ["pretrain", "round1", "final"])
def test_a_search_stopped_inside_a_phase_resumes_inside_it(tmp_path, phase):
    config = tiny("search.threshold=topk:1", "search.rounds=1", "search.pretrain_epochs=3",
                  "search.round_epochs=3", "search.final_epochs=3", "search.baselines=false",
                  "train.checkpoint_seconds=0")
    whole = run_search(config, tmp_path / "whole", progress=False, quiet=True, loggers=False)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_search(config, cut, progress=False, quiet=True, loggers=False, callbacks=[CrashInPhase(phase)])
    inside = torch.load(cut / "checkpoints" / "in-phase.pt", weights_only=False)
    assert inside["phase"] == phase and inside["epochs_done"] == 1
    assert (inside["stats"] is not None) == (phase == "round1")
    assert (inside["best"]["best_epoch"] == inside["epoch"]) == (phase == "final")  # the final phase's best so far
    resumed = run_search(config, cut, progress=False, quiet=True, loggers=False, resume=True)
    log = (cut / "log.txt").read_text()
    assert f"resumed in phase '{phase}' after 1 of its epochs" in log
    after = log.split("resumed in phase")[1]  # the phase's epoch lines count on from the checkpoint's epoch
    assert [f"{phase} epoch {e}/3:" in after for e in (1, 2, 3)] == [False, True, True]
    assert resumed["rounds"][0]["activated"] == whole["rounds"][0]["activated"]
    assert resumed["rounds"][0]["conflicts"] == whole["rounds"][0]["conflicts"]
    assert resumed["tasks"] == whole["tasks"] and resumed["val"] == whole["val"]
    assert (cut / "weights.safetensors").read_bytes() == (tmp_path / "whole" / "weights.safetensors").read_bytes()
    assert not (cut / "checkpoints" / "in-phase.pt").exists()


def test_every_phase_saves_in_phase_after_its_first_epoch_whatever_the_clock(tmp_path, monkeypatch):
    # One clock for the whole search let a later phase go unsaved for checkpoint_seconds (a stopped final phase of
    # five epochs lost them all); a phase's last epoch is left to the phase's own checkpoint.
    config = tiny("search.rounds=2", "search.pretrain_epochs=2", "search.round_epochs=1", "search.final_epochs=3",
                  "search.baselines=false", "train.checkpoint_seconds=1e9")
    saved, real_save = [], save_checkpoint

    def record(path, payload):
        if path.name == IN_PHASE:
            saved.append((payload["phase"], payload["epochs_done"]))
        real_save(path, payload)

    monkeypatch.setattr("mamo.checkpoint.save_checkpoint", record)
    run_search(config, tmp_path / "r", progress=False, quiet=True, loggers=False)
    assert saved == [("pretrain", 1), ("final", 1)]


class DivergeAfterRoundOne(Callback):
    def on_epoch_end(self, trainer, metrics):
        if trainer.description == "round1":
            trainer.step.optimizer.param_groups[0]["lr"] = 1e30


def test_a_diverged_search_keeps_its_checkpoints_and_logs_why(tmp_path):
    config = tiny("search.rounds=1", "search.baselines=false")
    with pytest.raises(TrainingDiverged, match="training 'final' diverged at step .*lower train.lr .now 1e.30"):
        run_search(config, tmp_path / "r", progress=False, quiet=True, loggers=False,
                   callbacks=[DivergeAfterRoundOne()])
    assert (tmp_path / "r" / "checkpoints" / "phase-01-round1.pt").exists()
    assert (tmp_path / "r" / "log.txt").read_text().splitlines()[-1].split(" ", 1)[1].startswith(
        "error: training 'final' diverged")


def test_show_on_a_stopped_search_says_how_to_finish_it(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        run_search(tiny("search.rounds=1", "search.baselines=false"), tmp_path / "r", progress=False, quiet=True,
                   loggers=False, callbacks=[Crash()])
    assert main(["show", str(tmp_path / "r")]) == 2
    run = tmp_path / "r"
    expected = (f"{run} holds a search run that has not finished (no architecture.json); finish it with "
                f"python cli.py search --resume {run}.")
    assert capsys.readouterr().err.strip() == f"mamo: error: {expected}"


def test_a_resumed_search_takes_its_baselines_from_the_checkpoint(tmp_path):
    # Continued on another machine, without the baseline cache (or with another data.root, part of its key), the
    # search used to retrain STL and HPS before going on: hours for NYUv2.
    config = tiny("search.rounds=1")
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        run_search(config, tmp_path / "r", progress=False, quiet=True, loggers=False, callbacks=[Crash()],
                   cache_root=cache)
    for entry in cache.iterdir():
        entry.unlink()
    resumed = run_search(config, tmp_path / "r", progress=False, quiet=True, loggers=False, resume=True,
                         cache_root=cache)
    assert not list(cache.iterdir())  # nothing was trained again
    whole = run_search(config, tmp_path / "whole", progress=False, quiet=True, loggers=False,
                       cache_root=tmp_path / "other")
    for kind in ("stl", "hps"):
        assert {k: resumed["baselines"][kind][k] for k in ("tasks", "val", "params")} == {
            k: whole["baselines"][kind][k] for k in ("tasks", "val", "params")}
    assert resumed["delta"] == whole["delta"] and resumed["tasks"] == whole["tasks"]


# torch's zip reader raises RuntimeError or OSError (EINVAL) depending on where a file ends; the latter crashed.
DAMAGES = {"garbage": lambda data: b"not a checkpoint", "cut at 5 kB": lambda data: data[:5000],
           "cut at 50 kB": lambda data: data[:50_000]}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_corrupt_checkpoint_is_named(tmp_path, damage):
    config = tiny("search.rounds=1")
    with pytest.raises(KeyboardInterrupt):
        run_search(config, tmp_path / "r", progress=False, quiet=True, loggers=False, callbacks=[Crash()])
    path = tmp_path / "r" / "checkpoints" / "phase-01-round1.pt"
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    with pytest.raises(MamoError, match="phase-01-round1.pt is corrupt"):
        run_search(config, tmp_path / "r", progress=False, quiet=True, loggers=False, resume=True)


def test_a_foreign_checkpoint_is_named_and_a_stray_phase_file_ignored(tmp_path):
    config = tiny("search.rounds=1")
    with pytest.raises(KeyboardInterrupt):
        run_search(config, tmp_path / "r", progress=False, quiet=True, loggers=False, callbacks=[Crash()])
    checkpoints = tmp_path / "r" / "checkpoints"
    (checkpoints / "phase-final.pt").write_bytes((checkpoints / "phase-01-round1.pt").read_bytes())  # a user's copy
    torch.save({"epoch": 3, "model": {}}, checkpoints / IN_PHASE)  # another program's file, say
    with pytest.raises(MamoError, match=f"{IN_PHASE} is not one of this run's checkpoints \\(it lacks graph, "):
        run_search(config, tmp_path / "r", progress=False, quiet=True, loggers=False, resume=True)
    (checkpoints / IN_PHASE).unlink()
    assert newest_state(checkpoints)["phase"] == "round1"  # the copy has no phase number: not a phase checkpoint


class TryTheFolder(Callback):
    """After the first epoch, what a second command on the run folder gets."""

    def __init__(self, folder: Path):
        self.folder, self.refusal = folder, None

    def on_epoch_end(self, trainer, metrics) -> None:
        if self.refusal is None:
            with pytest.raises(MamoError) as refused:
                FolderLock(self.folder)
            self.refusal = str(refused.value)


def test_a_search_still_running_in_its_folder_is_not_resumed_beside_it(tmp_path):
    # Before: a second `search --resume` of a running search trained too, both writing the same files, and the
    # second deleted the first's temporary files.
    config = tiny("search.rounds=1")
    folder = tmp_path / "r"
    first = TryTheFolder(folder)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, folder, progress=False, quiet=True, loggers=False, callbacks=[first, Crash()])
    assert first.refusal == f"{folder} is in use by another mamo command that is still running; wait for it to end " \
                            "or stop it, then resume."
    writing = folder / "checkpoints" / "in-phase.pt.tmp"  # the running search's checkpoint, half written
    with FolderLock(folder):  # the search, still running in another process
        writing.write_bytes(b"half")
        with pytest.raises(MamoError, match="is in use by another mamo command"):
            run_search(config, folder, progress=False, quiet=True, loggers=False, resume=True)
        assert writing.read_bytes() == b"half"
    resumed = TryTheFolder(folder)
    run_search(config, folder, progress=False, quiet=True, loggers=False, resume=True, callbacks=[resumed])
    assert resumed.refusal == first.refusal and not writing.exists()


def test_an_unreadable_checkpoint_is_named_as_a_read(tmp_path, monkeypatch):
    # Simulated: root reads any file. It used to reach the CLI as "could not write <checkpoint>".
    def refuse(path, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(MamoError, match=r"^could not read the checkpoint .*last.pt \(Permission denied\); fix its"):
        load_checkpoint(tmp_path / "last.pt")


def test_a_full_disk_is_one_sentence_and_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    config = tiny("search.rounds=1", "search.baselines=false")
    saves, real_save = [], torch.save

    def save_until_the_disk_fills(payload, file):
        if len(saves) == 1:  # the pretrain phase's checkpoint fits (its one epoch needs no in-phase one), then no more
            file.write(b"partial")
            raise OSError(28, "No space left on device")
        saves.append(file)
        real_save(payload, file)

    monkeypatch.setattr("mamo.checkpoint.torch.save", save_until_the_disk_fills)
    full = r"could not write the checkpoint .*phase-01-round1.pt \(No space left on device\); free disk space"
    with pytest.raises(MamoError, match=full + ".* resume the run with --resume"):
        run_search(config, tmp_path / "r", progress=False, quiet=True, loggers=False)
    checkpoints = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["phase-00-pretrain.pt"]  # no half-written file
    monkeypatch.undo()
    run_search(config, tmp_path / "r", progress=False, quiet=True, loggers=False, resume=True)
    assert (tmp_path / "r" / "metrics.json").exists()


class StepSettings(Callback):
    """What the training step of the final phase ran with."""

    def on_step(self, trainer, result) -> None:
        self.direction, self.gradients = repr(trainer.step.direction), trainer.step.gradients


@pytest.mark.parametrize(
    ("overrides", "direction", "gradients"),
    [
        (["search.modules=exclusive"], "Tensioner(MGDA(", "exact"),  # "w/o GMK"
        (["direction.name=equal", "direction.tensioner.formulation=off"], "Equal()", "exact"),  # "w/o MO"
        (["search.rounds=0"], "Tensioner(MGDA(", "exact"),  # HPS
        (["direction.name=central", "search.threshold=layer", "train.gradients=ub"], "Tensioner(Central()", "ub"),
    ],
)
def test_ablations_run(tmp_path, overrides, direction, gradients):
    settings = StepSettings()
    metrics = run_search(tiny(*overrides), tmp_path / "r", progress=False, quiet=True, loggers=False,
                         callbacks=[settings])
    graph = load_trained(tmp_path / "r").graph
    assert settings.direction.startswith(direction) and settings.gradients == gradients
    if "search.rounds=0" in overrides:
        assert metrics["gmk_modules"] == 0 and metrics["rounds"] == []
    if "search.modules=exclusive" in overrides:
        assert g.branch_nodes(graph) and all(len(graph.nodes[n]["group"]) == 1 for n in g.branch_nodes(graph))


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("logic", ["search.pretrain_epochs=20", "search.round_epochs=20", "search.final_epochs=5",
                   "train.epochs=5", "data.options.gates=[xor, and, or]"]),
        ("quick", ["model.backbone=timm:resnet18", "model.head_hidden=0", *SMALL_TIMM]),
        ("quick", ["model.backbone=timm:regnetx_002", "model.head_hidden=0", *SMALL_TIMM]),
    ],
)
def test_every_kind_of_search_space_searches(tmp_path, preset, overrides):
    # The batch size of TINY; the sizes are the rows' own (logic has fixed splits and refuses sizes).
    config = load_config(preset, ["train.batch_size=64", *overrides, "search.rounds=1"])
    metrics = run_search(config, tmp_path / "r", progress=False, quiet=True, loggers=False)
    assert set(metrics["tasks"]) == set(load_trained(tmp_path / "r").tasks)
    assert len(metrics["rounds"]) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.modules=pairs"], "unknown search.modules 'pairs'"),
        (["search.threshold=mean"], "unknown search.threshold 'mean'"),
        (["search.round_epochs=0"], "search.round_epochs"),
    ],
)
def test_bad_search_settings_fail_before_anything_runs(tmp_path, overrides, message):
    with pytest.raises(MamoError, match=message):
        run_search(tiny(*overrides), tmp_path / "r", progress=False, quiet=True, loggers=False)
    assert not (tmp_path / "r").exists()


def test_resume_needs_a_run_folder(tmp_path, capsys):
    assert main(["search", "--resume", str(tmp_path / "nothing")]) == 2
    assert "--resume needs an existing search run folder" in capsys.readouterr().err


def test_history_restored_without_phases_is_named_by_the_plan():
    # Checkpoints before 2026-11-25 kept no phase per epoch: a search resumed from one showed "-" in its time table.
    from mamo.search_plan import label_phases

    config = tiny("search.rounds=2", "search.pretrain_epochs=2", "search.round_epochs=1", "search.final_epochs=2")
    history = [{"epoch": k} for k in range(1, 5)]  # stopped in round 2
    label_phases(history, config)
    assert [entry["phase"] for entry in history] == ["pretrain", "pretrain", "round1", "round2"]
    named = [{"phase": "final"}]
    label_phases(named, config)
    assert named == [{"phase": "final"}]  # recorded phases are kept


def test_the_newest_phase_checkpoint_is_found_by_number_past_99_phases(tmp_path):
    from mamo.checkpoint import latest_checkpoint

    names = ["phase-00-pretrain.pt", *(f"phase-{k:02d}-round{k}.pt" for k in range(1, 100)), "phase-100-final.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "phase-100-final.pt"
    assert latest_checkpoint(tmp_path / "none") is None


def test_resume_refuses_a_config_yaml_edited_since_the_checkpoints(tmp_path, capsys):
    from cli_errors import single_error

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):  # stopped after round 1 of 2
        run_search(tiny("search.rounds=2", "search.baselines=false"), cut, progress=False, quiet=True,
                   loggers=False, callbacks=[Crash()])
    saved = (cut / "config.yaml").read_text()
    for edit, key, before, after in [
        (("rounds: 2", "rounds: 1"), "search.rounds", 2, 1),  # resumed, it skipped the final phase
        (("name: mgda", "name: pcgrad"), "direction.name", "'mgda'", "'pcgrad'"),
        (("modules: gmk", "modules: exclusive"), "search.modules", "'gmk'", "'exclusive'"),
        (("gradients: exact", "gradients: ub"), "train.gradients", "'exact'", "'ub'"),
        (("baselines: false", "baselines: true"), "search.baselines", "false", "true"),  # as config.yaml says
    ]:
        assert edit[0] in saved
        (cut / "config.yaml").write_text(saved.replace(edit[0], edit[1], 1))
        assert main(["search", "--resume", str(cut), "--no-progress", "--no-tensorboard"]) == 2
        assert single_error(capsys.readouterr().err) == (
            f"{cut / 'config.yaml'} sets {key} to {after} but the run's checkpoints were computed with {before}; "
            "undo the edit, or start a new run for the new value.")
    assert not (cut / "metrics.json").exists()
    # A checkpoint written before checkpoints recorded the config: the phase it was saved in still catches an
    # edit that moves it (round 1 of 2 would have become the final phase).
    newest = cut / "checkpoints" / "phase-01-round1.pt"
    state = load_checkpoint(newest)
    state.pop("config")
    save_checkpoint(newest, state)
    (cut / "config.yaml").write_text(saved.replace("rounds: 2", "rounds: 0", 1))
    assert main(["search", "--resume", str(cut), "--no-progress", "--no-tensorboard"]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"{cut / 'config.yaml'} sets search.rounds to 0, but the run's newest checkpoint was saved in phase "
        "'round1' of another plan; undo the edit, or start a new run for the new value.")
    (cut / "config.yaml").write_text(saved.replace("checkpoint_seconds: 60.0", "checkpoint_seconds: 0.0"))
    capsys.readouterr()
    assert main(["search", "--resume", str(cut), "--no-progress", "--no-tensorboard"]) == 0  # an allowed key
    assert len(json.loads((cut / "metrics.json").read_text())["rounds"]) == 2
    # The report is the command's result, on stdout (`> file` and `| tee` kept nothing); progress on stderr.
    out, err = capsys.readouterr()
    assert "Absolute test metrics" in out and "search finished in" in out and "Absolute test metrics" not in err
    assert "resuming in" in err


ONE_TASK_PLUGIN = """
import torch
from mamo.data import TensorTaskDataset


def one(seed, root):
    ds = TensorTaskDataset(torch.randn(16, 4), {"y": torch.randn(16, 1)})
    return {"train": ds, "val": ds, "test": ds, "tasks": {"y": {"type": "regression", "dim": 1}}}
"""


def test_a_search_of_one_task_is_refused_before_its_folder_is_made(tmp_path, capsys):
    # Before: it ran every detection round, which could never find a pair to grow modules for.
    plugin = tmp_path / "one_task.py"
    plugin.write_text(ONE_TASK_PLUGIN)
    run = tmp_path / "run"
    assert main(["search", "logic", "--set", f"data.name={plugin}:one", "--set", "data.options={}", "--no-progress",
                 "--run-dir", str(run)]) == 2
    assert "the data has 1 task (y), and a search grows modules between pairs of tasks" in capsys.readouterr().err
    assert not run.exists()


SEARCH_QUIET = {"progress": False, "quiet": True, "loggers": False}


def test_the_final_phase_ends_on_its_best_validation_epoch(tmp_path, monkeypatch):
    # Every validation score is worse than the one before, so the final phase's first epoch is its best: the
    # tested (and saved) network must be that epoch's, not the last one trained.
    scores = itertools.count()
    monkeypatch.setattr("mamo.trainer.selection_score", lambda metrics, reference: float(next(scores)))
    config = tiny("search.rounds=1", "search.final_epochs=3", "search.baselines=false")
    metrics = run_search(config, tmp_path / "r", **SEARCH_QUIET)
    history = torch.load(tmp_path / "r" / "checkpoints" / "phase-02-final.pt", weights_only=False)["history"]
    final = [entry["val"] for entry in history if entry["phase"] == "final"]
    assert len(final) == 3 and final[0] != final[-1]
    assert metrics["val"] == final[0]
    # A round records (and reports to a tune pruner) the validation of its own last epoch, not pretraining's.
    round1 = [entry["val"] for entry in history if entry["phase"] == "round1"]
    assert round1[-1] != history[0]["val"] and metrics["rounds"][0]["val"] == round1[-1]


def test_a_search_resumed_inside_a_phase_keeps_its_baselines_and_phase_times(tmp_path):
    # The in-phase checkpoint carries the baselines (a resume takes them from there) and the phase's time so far.
    config = tiny("search.rounds=1", "search.final_epochs=3", "train.checkpoint_seconds=0")
    cut = tmp_path / "cut"
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_search(config, cut, callbacks=[CrashInPhase("final")], **SEARCH_QUIET)
    inside = torch.load(cut / "checkpoints" / "in-phase.pt", weights_only=False)
    assert set(inside["baselines"]) == {"stl", "hps"}
    resumed = run_search(config, cut, resume=True, **SEARCH_QUIET)
    assert set(resumed["baselines"]) == {"stl", "hps"} and resumed["delta"] is not None
    wall = time.perf_counter() - started  # what both commands together can have counted, at most
    assert 0 < inside["phase_seconds"]["final"] <= inside["seconds"] <= wall
    assert sum(resumed["phase_seconds"].values()) <= resumed["seconds"] <= wall


def test_a_search_stopped_twice_inside_one_phase_counts_its_epochs_from_the_phase_start(tmp_path):
    # The second stop's in-phase checkpoint must count the epochs before the first stop too, or the second
    # resume trains the phase again from the wrong epoch.
    config = tiny("search.rounds=1", "search.final_epochs=4", "search.baselines=false", "train.checkpoint_seconds=0")
    whole = run_search(config, tmp_path / "whole", **SEARCH_QUIET)
    cut = tmp_path / "cut"
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            run_search(config, cut, resume=cut.exists(), callbacks=[CrashInPhase("final")], **SEARCH_QUIET)
    inside = torch.load(cut / "checkpoints" / "in-phase.pt", weights_only=False)
    assert inside["phase"] == "final" and inside["epochs_done"] == 2
    resumed = run_search(config, cut, resume=True, **SEARCH_QUIET)
    assert resumed["tasks"] == whole["tasks"] and resumed["val"] == whole["val"]


def test_a_search_resumed_after_a_phase_counts_only_the_time_it_ran(tmp_path):
    config = tiny("search.rounds=2", "search.baselines=false")
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_search(config, tmp_path / "r", callbacks=[Crash()], **SEARCH_QUIET)  # stopped after round 1's checkpoint
    saved = torch.load(tmp_path / "r" / "checkpoints" / "phase-01-round1.pt", weights_only=False)["seconds"]
    resumed = run_search(config, tmp_path / "r", resume=True, **SEARCH_QUIET)
    wall = time.perf_counter() - started
    assert 0 < saved <= resumed["seconds"] <= wall


def test_a_search_of_a_single_epoch_is_allowed():
    from mamo.search_plan import check_search_config

    check_search_config(tiny("search.rounds=0", "search.pretrain_epochs=0", "search.final_epochs=1"))
    check_search_config(tiny("search.rounds=0", "search.pretrain_epochs=1", "search.final_epochs=0"))


def test_a_checkpoint_from_a_phase_past_the_edited_plans_end_is_one_sentence(tmp_path):
    # Saved in the final phase of 2 rounds (index 3), resumed with search.rounds=1 (phases 0-2).
    from mamo.search_plan import check_resumed_phase

    with pytest.raises(MamoError, match="sets search.rounds to 1, but the run's newest checkpoint was saved in "
                                        "phase 'final' of another plan"):
        check_resumed_phase(tiny("search.rounds=1"), {"phase_index": 3, "phase": "final"}, tmp_path)
    check_resumed_phase(tiny("search.rounds=2"), {"phase_index": 3, "phase": "final"}, tmp_path)


@pytest.mark.parametrize("config", [None, {"train": {"epochs": 1}}])
def test_a_new_run_from_python_without_a_config_is_one_sentence(tmp_path, config):
    from mamo.train import run_train

    # Before: AttributeError ("'NoneType' object has no attribute 'train'"); None is right only with resume=True.
    for run, name in ((run_search, "run_search"), (run_train, "run_train")):
        with pytest.raises(MamoError, match=rf"^{name} got {type(config).__name__} for config; pass "
                                            r"mamo\.config\.load_config\(\.\.\.\) for a new run, or resume=True"):
            run(config, tmp_path / name, progress=False)
        assert not (tmp_path / name).exists()
