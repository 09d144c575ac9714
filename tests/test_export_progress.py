"""What `export` shows while it writes: each file is named as soon as it is written (the ONNX and torch.export
programs of a ResNet-18 run take seconds each, and the terminal showed nothing until every file was done), and on
a terminal a bar names the file being written."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli_inputs import make_run

from mamo import export as exporting


def test_each_exported_file_is_named_before_the_next_is_written(tmp_path: Path, monkeypatch) -> None:
    run = make_run(tmp_path / "run")
    named: list[Path] = []
    seen_by_dot: list[list[Path]] = []

    def write_dot(model, path: Path) -> None:
        seen_by_dot.append(list(named))
        path.write_text("digraph {}")

    monkeypatch.setitem(exporting.FORMATS, "dot", ("architecture.dot", write_dot))
    out = tmp_path / "out"
    written = exporting.export(run, ["json", "dot"], out, on_written=named.append)
    assert seen_by_dot == [[out / "architecture.json"]]
    assert named == written == [out / "architecture.json", out / "architecture.dot"]


def test_a_bar_names_the_file_being_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run")
    exporting.export(run, ["json", "dot"], tmp_path / "out", progress=True)
    assert "exporting architecture.dot" in capsys.readouterr().err
    exporting.export(run, ["json", "dot"], tmp_path / "quiet")
    assert capsys.readouterr().err == ""


def test_the_command_prints_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mamo.cli import main

    run = make_run(tmp_path / "run")
    out = tmp_path / "out"
    assert main(["export", str(run), "--format", "json", "--format", "dot", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(out / "architecture.json"), str(out / "architecture.dot")]
