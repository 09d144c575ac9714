"""A study's data identity beyond its config: the source of its data plugin."""

from __future__ import annotations

import pytest
import torch

from mamo.config import load_config
from mamo.errors import MamoError
from mamo.tune import run_tune


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
