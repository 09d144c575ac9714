"""docs/examples: the data plugin and preset users copy run as written, from the repository's root."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mamo.config import load_config
from mamo.data_plugins import load_plugin
from mamo.errors import MamoError
from mamo.search import run_search

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "docs" / "examples" / "digits.yaml"


def _build():
    """The plugin's function, loaded as a run loads it (data.name with an absolute path)."""
    return load_plugin(f"{ROOT / 'docs' / 'examples' / 'digits_plugin.py'}:build")


def test_the_digits_plugin_splits_the_digits_disjointly_by_seed():
    data = _build()(seed=3)
    assert [len(data[s]) for s in ("train", "val", "test")] == [1197, 300, 300]
    x, targets = data["train"][0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(targets["image"], x) and targets["digit"].shape == () and 0 <= targets["digit"] < 10
    images = {split: {tuple(data[split].x[k].flatten().tolist()) for k in range(len(data[split]))}
              for split in ("train", "val", "test")}
    # The digits hold a few exact duplicates, so the splits share at most those.
    assert len(images["train"] & images["test"]) <= 2 and len(images["val"] & images["test"]) <= 2
    again, other = _build()(seed=3), _build()(seed=4)
    assert torch.equal(again["test"].x, data["test"].x) and not torch.equal(other["test"].x, data["test"].x)


def test_the_digits_plugin_refuses_sizes_beyond_the_digits_in_one_sentence():
    with pytest.raises(MamoError, match=r"\(1500, 300, 300\) must each be at least 1 and together at most the 1797"):
        _build()(train_size=1500)
    with pytest.raises(MamoError, match=r"\(1197, 0, 300\) must each be at least 1 .* set sizes that fit\.$"):
        _build()(val_size=0)


def test_the_digits_preset_searches_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the preset names its plugin by a path relative to the repository's root
    config = load_config(str(PRESET), ["train.epochs=3", "search.pretrain_epochs=1", "search.round_epochs=1",
                                       "search.rounds=1"])
    assert config.model.backbone == "cnn" and config.data.name == "docs/examples/digits_plugin.py:build"
    metrics = run_search(config, tmp_path / "run", progress=False, quiet=True, loggers=False)
    assert set(metrics["tasks"]) == {"digit", "image"}
    assert metrics["tasks"]["digit"]["accuracy"] > 0.3  # three epochs of Adam on 1,197 digits: well above chance
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| STL |" in report and "| HPS (equal) |" in report and "MAMO (mgda+tensioner(thesis))" in report
