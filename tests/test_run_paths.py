"""Run folder paths as mamo prints them in commands to paste, and the paths it refuses."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from mamo import bench
from mamo.config import Config, config_text
from mamo.errors import MamoError
from mamo.export import _rerun, load_trained
from mamo.runs import RUN_HEADER, cli, read_run_config
from mamo.train import TRAIN_MODES
from mamo.tune import _continuing

ODD = "my run (1)"  # what bash splits into words and chokes on unquoted: a space and parentheses


@pytest.fixture
def as_mamo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Printed commands start with ``mamo`` (the installed command), whatever runs the tests."""
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/mamo"])


def pasted(line: str) -> list[str]:
    """The words bash hands mamo when ``line`` (``mamo ...``, perhaps ending a sentence) is pasted."""
    words = shlex.split(line.strip().strip("`").removesuffix("."))
    assert words[0] == "mamo", line
    return words[1:]


def _run_folder(path: Path, command: str) -> Path:
    """A stopped ``command`` run: only its config.yaml."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"{RUN_HEADER} {command} run: test\n" + config_text(Config()))
    return path


def test_a_plain_path_prints_unchanged_and_an_odd_one_quoted(as_mamo: None) -> None:
    assert cli("search", "--resume", Path("runs/x")) == "mamo search --resume runs/x"
    assert pasted(cli("search", "--resume", Path(f"/tmp/x/{ODD}"))) == ["search", "--resume", f"/tmp/x/{ODD}"]


def test_every_printed_command_quotes_its_paths(as_mamo: None, tmp_path: Path) -> None:
    # Each printed `... --resume /tmp/x/my run (1)`, which bash cannot run (an audit's finding).
    folder = tmp_path / ODD
    assert pasted(TRAIN_MODES["mtl"].how_to_continue(folder)) == ["train", "--resume", str(folder)]
    assert pasted(_continuing(folder, None, "", "study", 3)) == ["tune", "--run-dir", str(folder), "--trials", "3"]
    assert pasted(bench.resume_command("ablation", ["--quick", "--out", "x"], folder)) == [
        "bench", "ablation", "--quick", "--resume", str(folder)]
    assert pasted(_rerun(folder, "search").removeprefix("rerun it with ")) == [
        "search", str(folder / "config.yaml"), "--run-dir", "NEW_FOLDER"]

    _run_folder(folder, "train")
    with pytest.raises(MamoError) as refused:  # the other command's folder: continue it with that command
        read_run_config(folder, "search")
    assert pasted(str(refused.value).split("continue it with ")[1]) == ["train", "--resume", str(folder)]
    with pytest.raises(MamoError) as unfinished:
        load_trained(folder)
    assert pasted(str(unfinished.value).split("finish it with ")[1]) == ["train", "--resume", str(folder)]
