"""A study's data identity beyond its config: the source of its data plugin."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from mamo.config import load_config
from mamo.data import DataMemo
from mamo.errors import MamoError
from mamo.search import run_search
from mamo.tune import run_tune

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: real searches here are tiny


EDITABLE_PLUGIN = """
import torch
from mamo.data import TensorTaskDataset

SCALE = 1.0


def build(seed, root, **sizes):
    x = torch.rand(96, 4, generator=torch.Generator().manual_seed(seed))
    def split(part):
        return TensorTaskDataset(x[part], {"a": (x[part, 0] > 0.5).long(), "b": x[part, 1:2] * SCALE})
    return {"train": split(slice(0, 64)), "val": split(slice(64, 80)), "test": split(slice(80, 96)),
            "tasks": {"a": {"type": "classification", "classes": 2}, "b": {"type": "regression", "dim": 1}}}
"""


def test_joining_a_search_study_refuses_a_data_plugin_edited_since_it_began(tmp_path):
    # A study continued after its plugin was edited (a regression target scaled by 10) trained the STL on the new
    # data, yet scored its trial against the stored reference of the old: -24,700 % where a study of the edited
    # data gave the same draw -173.5 %, and nothing said so (an audit's user walkthrough).
    plugin = tmp_path / "mydata.py"
    plugin.write_text(EDITABLE_PLUGIN)
    settings = [f"data.name={plugin}:build", "model.backbone=mlp", "model.hidden=[8]", "model.head_hidden=0",
                "train.batch_size=32", "train.epochs=1", "search.final_epochs=1", "tune.rounds=[0, 1]"]
    folder = tmp_path / "study"
    run_tune(load_config("quick", settings), study_dir=folder, trials=0, progress=False)
    run_tune(load_config("quick", settings), study_dir=folder, trials=0, progress=False)  # unchanged: joins
    plugin.write_text(EDITABLE_PLUGIN.replace("SCALE = 1.0", "SCALE = 10.0"))
    with pytest.raises(MamoError, match="changed since study 'mamo' began") as error:
        run_tune(load_config("quick", settings), study_dir=folder, trials=0, progress=False)
    assert str(plugin) in str(error.value) and "pass a new --run-dir" in str(error.value)
    plugin.write_text(EDITABLE_PLUGIN)  # the edit undone: the study goes on
    run_tune(load_config("quick", settings), study_dir=folder, trials=0, progress=False)
    # Comments, blank lines and line breaks return the same data: no reason to refuse (they were refused).
    reformatted = EDITABLE_PLUGIN.replace("SCALE = 1.0\n", "# the target's scale\nSCALE = 1.0  # as given\n\n")
    label = '"a": (x[part, 0] > 0.5).long(), '
    plugin.write_text(reformatted.replace(label, f"\n        {label.strip()}\n"))
    run_tune(load_config("quick", settings), study_dir=folder, trials=0, progress=False)
    plugin.write_text(reformatted.replace("SCALE = 1.0", "SCALE = 1.5"))  # code: refused still
    with pytest.raises(MamoError, match="changed since study 'mamo' began"):
        run_tune(load_config("quick", settings), study_dir=folder, trials=0, progress=False)


COUNTING_PLUGIN = EDITABLE_PLUGIN.replace("def build(seed, root, **sizes):\n", """def build(seed, root, **sizes):
    with open(__file__ + ".builds", "a") as builds:
        builds.write("built\\n")
""")


def _builds(plugin) -> int:
    path = plugin.with_name(plugin.name + ".builds")
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_the_trials_of_one_process_build_the_data_once_and_train_as_on_a_fresh_build(tmp_path):
    # Each trial built its data again: 0.6 s of a quick-preset trial for the built-in digits (a fifth of it), and
    # a lazily read plugin's read-through each time.
    plugin = tmp_path / "counted.py"
    plugin.write_text(COUNTING_PLUGIN)
    settings = [f"data.name={plugin}:build", "model.backbone=mlp", "model.hidden=[8]", "model.head_hidden=0",
                "train.batch_size=32", "train.epochs=3", "search.pretrain_epochs=1", "search.round_epochs=1",
                "search.final_epochs=null", "tune.rounds=[1, 1]"]
    folder = tmp_path / "study"
    run_tune(load_config("quick", settings), study_dir=folder, trials=2, progress=False, tensorboard=False)
    assert _builds(plugin) == 1  # the reference's build, shared by both trials
    trial = folder / "trial-0001"
    metrics = run_search(load_config(str(trial / "config.yaml")), tmp_path / "again", progress=False, quiet=True,
                         loggers=False, cache_root=folder / ".baselines")
    assert _builds(plugin) == 2
    assert metrics["val"] == json.loads((trial / "metrics.json").read_text())["val"]


def test_a_data_memo_builds_again_for_other_settings_an_edited_plugin_and_after_pickling(tmp_path):
    plugin = tmp_path / "counted.py"
    plugin.write_text(COUNTING_PLUGIN)
    memo = DataMemo()
    config = load_config("quick", [f"data.name={plugin}:build"]).data
    first = memo(config)
    assert memo(config) is first and _builds(plugin) == 1
    reseeded = dataclasses.replace(config, seed=1)
    reseeded_data = memo(reseeded)
    assert reseeded_data is not first and _builds(plugin) == 2
    plugin.write_text(COUNTING_PLUGIN.replace("SCALE = 1.0", "SCALE = 10.0"))
    edited = memo(reseeded)
    assert _builds(plugin) == 3
    assert float(edited.train[0][1]["b"]) == pytest.approx(10 * float(reseeded_data.train[0][1]["b"]))
    copy = pickle.loads(pickle.dumps(memo))  # what a spawned tune worker receives: no tensors
    assert copy(reseeded) is not edited and _builds(plugin) == 4
