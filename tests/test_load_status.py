"""A status on the terminal while the data is built: after the imports' seconds, the 20,000-image sets (1 s), a
scene folder's file headers or a plugin's own work left the terminal blank before a run's first line (3.4–5.8 s
measured on 2 cores, more for a slow plugin)."""

from __future__ import annotations

import pytest

from mamo.config import DataConfig
from mamo.data import load_data


@pytest.mark.parametrize("progress", [True, False])
def test_the_data_being_built_is_named_with_progress_only(progress: bool, capsys: pytest.CaptureFixture[str]) -> None:
    load_data(DataConfig(name="logic"), progress=progress)
    err = capsys.readouterr().err
    assert ("loading dataset 'logic'" in err) is progress


def test_a_plugin_being_built_is_named(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "tiny.py"
    plugin.write_text("import torch\nfrom mamo.data import TensorTaskDataset\n\n"
                      "def build(seed, root):\n"
                      "    split = TensorTaskDataset(torch.rand(4, 2), {'t': torch.tensor([0, 1, 0, 1])})\n"
                      "    return {'train': split, 'val': split, 'test': split,\n"
                      "            'tasks': {'t': {'type': 'classification', 'classes': 2}}}\n")
    load_data(DataConfig(name=f"{plugin}:build"), progress=True)
    assert f"loading data plugin '{plugin}:build'" in capsys.readouterr().err
