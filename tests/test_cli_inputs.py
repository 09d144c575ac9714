"""Bad command-line inputs: each gives one sentence naming the input and the fix, and leaves no folder behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_errors import single_error

from mamo import graph as g
from mamo.cli import main
from mamo.config import ModelConfig
from mamo.export import load_trained
from mamo.model import compile_model
from mamo.spaces import create_space
from mamo.tasks import TaskSpec
from mamo.train import save_model


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``mamo argv`` in this process: its exit status and its stderr."""
    code = main(argv)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- name


@pytest.mark.parametrize("name", ["a/b", "../../x", "..", ".", "a\\b", "x" * 300])
def test_a_name_that_is_no_folder_name_is_refused_before_any_folder_is_made(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Run folders are runs/<time>-<command>-<name>: 'a/b' nested them and '../../x' escaped runs/.
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", "quick", "--set", f"name={name}", "--set", "train.epochs=1", "--no-progress"],
                        capsys)
    assert code == 2
    message = single_error(err)
    assert "'name'" in message and "'/'" in message
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ show and export


def make_run(folder: Path, modules: str = "gmk") -> Path:
    """A finished run's model files without training: a two-cell MLP on 6 inputs with one branch grown at cell0."""
    folder.mkdir(parents=True)
    space = create_space(ModelConfig(backbone="mlp", hidden=[8, 8]), (6,))
    tasks = {"a": TaskSpec("a", "classification", classes=2), "b": TaskSpec("b", "regression", dim=1)}
    graph = g.build_hps_graph(space, tasks)
    g.grow(graph, (("a", "b"), 0), modules)
    save_model(folder, compile_model(graph))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "run")


def damaged_copy(run_dir: Path, folder: Path, architecture: object) -> Path:
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes((run_dir / "weights.safetensors").read_bytes())
    (folder / "architecture.json").write_text(json.dumps(architecture))
    return folder


@pytest.mark.parametrize("modules", ["gmk", "exclusive"])
def test_an_intact_architecture_passes_the_check(modules: str, tmp_path: Path) -> None:
    assert set(load_trained(make_run(tmp_path / "run", modules)).tasks) == {"a", "b"}


@pytest.mark.parametrize(("architecture", "said"), [
    ([], "holds an array"), ("hello", "holds a string"), (None, "holds null"), (3, "holds a number"),
])
@pytest.mark.parametrize("command", ["show", "export"])
def test_an_architecture_that_is_not_a_json_object_is_one_sentence(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], architecture: object, said: str,
        command: str) -> None:
    # Valid JSON of another type was an AttributeError traceback.
    copy = damaged_copy(run_dir, tmp_path / "copy", architecture)
    code, err = run_cli([command, str(copy), *(["--format", "json"] if command == "export" else [])], capsys)
    assert code == 2
    assert f"the model files in {copy} are unreadable or do not fit together (architecture.json {said}, not a graph " \
        "object)" in single_error(err)


@pytest.mark.parametrize(("damage", "said"), [
    ("no edges", "node 'cell0' does not read from 'input'"),
    ("no branch edge into a fusion", "node 'fusion_b' reads from ['cell1'], not ['cell1', 'gmk_a+b_1']"),
    ("a cycle", "its edges form a cycle"),
    ("no head", "node 'head_a' of task 'a' is missing"),
])
@pytest.mark.parametrize("command", ["show", "export"])
def test_an_architecture_with_damaged_edges_is_one_sentence(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, said: str,
        command: str) -> None:
    # With its edges emptied, show printed a tree and export died inside torch.export with an IndexError.
    spec = json.loads((run_dir / "architecture.json").read_text())
    edges = spec["edges"]
    if damage == "no edges":
        spec["edges"] = []
    elif damage == "no branch edge into a fusion":
        spec["edges"] = [e for e in edges if (e["source"], e["target"]) != ("gmk_a+b_1", "fusion_b")]
    elif damage == "a cycle":
        spec["edges"] = [*edges, {"source": "cell1", "target": "cell0"}]
    else:
        spec["nodes"] = [n for n in spec["nodes"] if n["id"] != "head_a"]
        spec["edges"] = [e for e in edges if "head_a" not in (e["source"], e["target"])]
    copy = damaged_copy(run_dir, tmp_path / "copy", spec)
    out = tmp_path / "out"
    code, err = run_cli([command, str(copy), *(["--format", "pt2", "--out", str(out)] if command == "export" else [])],
                        capsys)
    assert code == 2
    message = single_error(err)
    assert f"the model files in {copy} are unreadable or do not fit together (architecture.json is damaged: {said}" \
        in message
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- --out


def test_export_out_below_a_file_is_one_sentence(run_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    code, err = run_cli(["export", str(run_dir), "--format", "json", "--out", str(a_file / "sub")], capsys)
    assert code == 2  # was a NotADirectoryError traceback from mkdir
    assert f"--out {a_file / 'sub'} lies below {a_file}, which is a file" in single_error(err)


@pytest.mark.parametrize(("below", "said"), [(False, "is a file"), (True, "lies below")])
def test_bench_out_that_is_or_lies_below_a_file_is_one_sentence(
        below: bool, said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    out = a_file / "sub" if below else a_file
    code, err = run_cli(["bench", "step", "--quick", "--device", "cpu", "--out", str(out)], capsys)
    assert code == 2  # was a NotADirectoryError traceback (from iterdir, or mkdir below the file)
    assert f"--out {out} {said}" in single_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
