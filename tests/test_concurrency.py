"""Several mamo processes on what users share: a run folder, a study folder. Each test sets up the interleaving
two real processes can take, so that none depends on timing luck."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from mamo.config import load_config
from mamo.errors import MamoError
from mamo.runs import FolderLock, new_run_dir, write_run_config


@pytest.mark.parametrize("command", ["search", "train"])
def test_a_refused_resume_of_a_finished_run_leaves_an_export_in_progress_alone(tmp_path: Path, command: str) -> None:
    # Before: `search --resume` of a finished run removed every *.tmp in the folder (the staging folder of an
    # export writing model.onnx there, say) and only then said there was nothing to resume; the export crashed
    # with "FileNotFoundError: ... model.onnx".
    from mamo.search import run_search
    from mamo.train import run_train

    folder = tmp_path / "run"
    folder.mkdir()
    write_run_config(folder, command, load_config("quick"))
    (folder / "metrics.json").write_text("{}")
    staging = folder / "model.onnx.host.123.tmp"  # replace_from_folder's, while torch writes the ONNX file
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"half")
    written = folder / "architecture.dot.host.123.tmp"  # replace_atomically's
    written.write_text("digraph")
    resume = run_search if command == "search" else run_train
    with pytest.raises(MamoError, match="has finished \\(metrics.json is there\\); nothing to resume"):
        resume(None, folder, progress=False, quiet=True, loggers=False, resume=True)
    assert (staging / "model.onnx").read_bytes() == b"half" and written.read_text() == "digraph"


def test_a_run_folder_another_command_is_creating_is_not_taken_from_it(tmp_path: Path) -> None:
    # Two `search --run-dir D` started together: the first had made D/checkpoints/ and was writing config.yaml,
    # the second read that as a folder left by a killed command, emptied it and took it too; both wrote config.yaml
    # (the folder kept either one's settings) and one then stopped with "in use by another mamo command ...,
    # then resume", about a run it never started.
    folder = tmp_path / "run"
    config = load_config("quick")
    (folder / "checkpoints").mkdir(parents=True)
    with FolderLock(folder):  # the first command, between its checkpoints/ and its config.yaml
        with pytest.raises(MamoError, match="was taken by another run meanwhile; pass a new --run-dir"):
            new_run_dir(folder, load_config("quick", ["train.seed=7"]), "search")
        assert (folder / "checkpoints").is_dir() and not (folder / "config.yaml").exists()
    # A command killed at that moment held nothing: its folder is taken by the next one, as before, which holds
    # it from then on for as long as its run works there.
    with contextlib.ExitStack() as running:
        assert new_run_dir(folder, config, "search", held=running) == folder
        assert (folder / "config.yaml").is_file()
        with pytest.raises(MamoError, match="in use by another mamo command"):
            FolderLock(folder)
    FolderLock(folder).release()
