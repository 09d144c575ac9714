"""Bad command-line inputs: each gives one sentence naming the input and the fix, and leaves no folder behind."""

from __future__ import annotations

import errno
import json
import os
import types
from pathlib import Path

import pytest
from cli_errors import single_error

from mamo import bench
from mamo import graph as g
from mamo.cli import main
from mamo.config import ModelConfig
from mamo.errors import MamoError
from mamo.export import load_trained
from mamo.model import compile_model
from mamo.session import save_model
from mamo.spaces import create_space
from mamo.tasks import TaskSpec

TINY = ["--set", "train.epochs=1", "--set", "data.train_size=256", "--set", "data.val_size=64",
        "--set", "data.test_size=64", "--set", "train.device=cpu", "--no-progress", "--no-tensorboard"]


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
    ("no edges", "node 'cell0' reads from [], not ['input']"),
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


@pytest.mark.parametrize("command", ["show", "export"])
def test_what_is_not_a_run_folder_says_what_it_is_and_what_to_pass(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    # A file was looked into ("x.json/architecture.json not found"), a finished run missing its model was called
    # no run at all, a tune study folder got the generic text, and damaged files were to be "re-exported from
    # the run's checkpoints", which no command does.
    def error(folder: Path) -> str:
        code, err = run_cli([command, str(folder), *(["--format", "json"] if command == "export" else [])], capsys)
        assert code == 2
        return single_error(err)

    assert error(run_dir / "architecture.json") == (
        f"{run_dir / 'architecture.json'} is a file; pass the run folder that holds it, e.g. {run_dir}.")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "config.yaml").write_text("# mamo search run: 2026-11-25\nname: quick\n")
    (finished / "metrics.json").write_text("{}")
    (finished / "weights.safetensors").write_bytes((run_dir / "weights.safetensors").read_bytes())
    (finished / "checkpoints").mkdir()
    (finished / "checkpoints" / "best.pt").write_bytes(b"")
    assert error(finished / "checkpoints" / "best.pt") == (  # the run folder, not checkpoints/
        f"{finished / 'checkpoints' / 'best.pt'} is a file; pass the run folder that holds it, e.g. {finished}.")
    rerun = f"python cli.py search {finished / 'config.yaml'} --run-dir NEW_FOLDER"
    assert error(finished) == (f"{finished} is a finished search run whose architecture.json is gone; restore it "
                               f"from a copy or rerun it with {rerun}.")
    (finished / "architecture.json").write_text("{")
    assert error(finished).endswith(f"(JSONDecodeError); restore them from a copy or rerun it with {rerun}.")
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.yaml").write_text("name: quick\n")
    assert error(study) == (f"{study} is a tune study folder none of whose trials has finished yet; pass a trial "
                            "folder once one has.")
    (study / "trial-0001").symlink_to(run_dir)
    assert error(study) == (f"{study} is a tune study folder; pass one of its trial folders, e.g. "
                            f"{study / 'trial-0001'} (summary.md names the best).")
    # A pruned trial: it was advised "finish it with python cli.py search --resume", against the pruner.
    pruned = study / "trial-0002"
    pruned.mkdir()
    (pruned / "config.yaml").write_text("# mamo search run: 2026-11-25\nname: quick\n")
    assert error(pruned) == (f"{pruned} is a tune trial that did not finish (pruned, failed or still running: no "
                             f"architecture.json); pass a finished trial of its study (summary.md in {study} names "
                             "the best).")


# ---------------------------------------------------------------------------------------------------- --out


def test_export_out_below_a_file_is_one_sentence(run_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    code, err = run_cli(["export", str(run_dir), "--format", "json", "--out", str(a_file / "sub")], capsys)
    assert code == 2  # was a NotADirectoryError traceback from mkdir
    assert f"--out {a_file / 'sub'} lies below {a_file}, which is a file" in single_error(err)


def test_export_out_into_another_run_is_refused_and_leaves_it_intact(run_dir: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Was exit 0: the other run's architecture.json replaced, after which it no longer loaded (a helper's audit).
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.yaml", "architecture.json", "weights.safetensors"):
        (other / name).write_bytes(b"theirs")
    code, err = run_cli(["export", str(run_dir), "--format", "json", "--out", str(other)], capsys)
    assert code == 2
    assert single_error(err) == (f"--out {other} is the folder of another run (it holds config.yaml), whose "
                                 "architecture export would replace; pass a new or empty folder to --out.")
    assert all((other / name).read_bytes() == b"theirs" for name in ("config.yaml", "architecture.json"))


def test_export_into_its_own_run_folder_keeps_architecture_json_as_the_run_wrote_it(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Rewritten from the loaded model, it lost the starting-weights path that load_trained forgets.
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    canonical = copy / "architecture.json"
    before = canonical.read_bytes(), canonical.stat().st_mtime_ns
    code, _ = run_cli(["export", str(copy), "--format", "json", "--format", "graphml"], capsys)
    assert code == 0 and (canonical.read_bytes(), canonical.stat().st_mtime_ns) == before
    code, _ = run_cli(["export", str(copy), "--format", "json", "--out", str(tmp_path / "out")], capsys)
    assert code == 0 and (tmp_path / "out" / "architecture.json").is_file()


def test_export_of_a_folder_that_does_not_exist_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["export", str(tmp_path / "nope")], capsys)
    assert code == 2
    missing = tmp_path / "nope"
    assert single_error(err) == f"{missing} does not exist; pass the folder of a finished train or search run."


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


# --------------------------------------------------------------------------------------- the machine's refusals


def test_a_run_dir_with_a_name_over_255_bytes_is_one_sentence(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / ("x" * 300) / "run"
    code, err = run_cli(["train", "quick", *TINY, "--run-dir", str(run)], capsys)
    assert code == 2  # was an OSError (Errno 36) traceback from free_run_dir
    message = single_error(err)
    assert "(File name too long); shorten the path" in message and "255 bytes" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (Path("/proc").is_dir() and os.statvfs("/proc").f_blocks == 0), reason="needs Linux's /proc")
def test_a_run_dir_in_proc_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", "quick", *TINY, "--run-dir", "/proc/mamo-test-run"], capsys)
    assert code == 2  # was a FileNotFoundError traceback from mkdir
    assert "could not create /proc/mamo-test-run (No such file or directory): /proc is a virtual file system" \
        in single_error(err)


@pytest.mark.parametrize("command", ["train", "search"])
def test_a_run_folder_that_cannot_be_created_is_not_advised_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     command: str) -> None:
    # Before: "...fix the folder's permissions, then continue with --resume", but no run existed to resume.
    # Simulated (root may write anywhere): sysfs and an immutable parent refuse the mkdir with EPERM.
    mkdir = Path.mkdir

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        if self.name == "run":
            raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    budget = ["--set", "train.epochs=4"] if command == "search" else []  # room for the search's phases
    code, err = run_cli([command, "quick", *TINY, *budget, "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2
    assert single_error(err) == (f"could not create the run folder {tmp_path / 'run'} (Operation not permitted); pass "
                                 "a --run-dir where you can write, or fix the folder's permissions.")


def test_an_immutable_out_folder_is_one_sentence(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # chattr +i makes writes fail with EPERM, not EACCES, even for root; simulated, as chattr needs root.
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    out = tmp_path / "out"
    code, err = run_cli(["export", str(run_dir), "--format", "json", "--out", str(out)], capsys)
    assert code == 2  # was a PermissionError traceback
    assert f"could not write {out / 'architecture.json'} (Operation not permitted)" in single_error(err)


def test_an_out_folder_that_is_a_dangling_link_or_holds_a_folder_by_a_files_name_is_one_sentence(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Both were tracebacks with exit 1 (FileExistsError from mkdir, IsADirectoryError from the write).
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    code, err = run_cli(["export", str(run_dir), "--format", "json", "--out", str(link)], capsys)
    assert code == 2
    assert single_error(err) == (f"{link} is a link to {tmp_path / 'nowhere'}, which does not exist; create what it "
                                 "points to or pass another path.")
    (tmp_path / "out" / "architecture.json").mkdir(parents=True)
    code, err = run_cli(["export", str(run_dir), "--format", "json", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert single_error(err) == (f"could not write {tmp_path / 'out' / 'architecture.json'}: a folder has that name; "
                                 "move the folder away or pass another path.")


def test_a_write_failure_says_how_its_command_goes_on(tmp_path: Path) -> None:
    from mamo.cli import COMMANDS, os_failure

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    assert os_failure(full, COMMANDS["export"].again).endswith("then run the command again.")
    assert os_failure(full, COMMANDS["search"].again).endswith("then continue with --resume.")
    assert os_failure(OSError(errno.EEXIST, "File exists", str(tmp_path))) is None  # not a link: a bug


def test_a_model_file_that_could_not_be_written_is_named_and_no_half_of_it_is_left(tmp_path: Path, monkeypatch) -> None:
    # Before: a full disk while a search saved its model left half a weights.safetensors, and the sentence named
    # no file ("could not write (No space left on device)"): a failed write() carries no file name.
    from mamo.cli import os_failure

    folder = make_run(tmp_path / "run")
    model = load_trained(folder)
    before = (folder / "weights.safetensors").read_bytes()

    def full_disk(self: Path, data: bytes) -> int:
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError) as failed:
        save_model(folder, model)
    assert (folder / "weights.safetensors").read_bytes() == before
    assert not list(folder.glob("*.tmp"))
    assert os_failure(failed.value, "continue with --resume") == (
        f"could not write {folder / 'weights.safetensors'} (No space left on device); free disk space or fix the "
        "folder's permissions, then continue with --resume.")


def test_a_missing_file_elsewhere_is_still_a_bug_with_its_traceback(tmp_path: Path) -> None:
    from mamo.cli import os_failure

    assert os_failure(FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "gone"))) is None
    assert os_failure(OSError(errno.EIO, "Input/output error", str(tmp_path))) is None


# --------------------------------------------------------------------------------------------------- bench


def failing_bench(error: BaseException) -> types.ModuleType:
    """A benchmark that stops with ``error`` before it writes anything."""
    module = types.ModuleType("failing", "A benchmark that fails.")

    def run(options: object) -> dict:
        raise error

    module.run = run  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("a bug"), MamoError("refused.")])
@pytest.mark.parametrize("given", ["default", "--out"])
def test_bench_removes_the_folder_it_made_whatever_stops_it(
        error: BaseException, given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Only a MamoError removed it: Ctrl-C or a crash left an empty runs/bench/<name>-<time> behind.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "load_bench", lambda name: failing_bench(error))
    out = ["--out", str(tmp_path / "out")] if given == "--out" else []
    if isinstance(error, RuntimeError):
        with pytest.raises(RuntimeError, match="a bug"):
            main(["bench", "step", "--device", "cpu", *out])
    else:
        assert main(["bench", "step", "--device", "cpu", *out]) == (130 if isinstance(error, KeyboardInterrupt) else 2)
    assert list(tmp_path.iterdir()) == []  # runs/bench and runs too, which the command made (they stayed)


def test_a_stopped_resumable_bench_says_how_to_continue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # A stopped ablation printed only the generic "interrupted; finished checkpoints ... are kept".
    module = types.ModuleType("resumable", "A benchmark that stops after writing a variant.")

    def run(options: object) -> dict:
        (Path(options.out) / "variant").mkdir()  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    module.run = run  # type: ignore[attr-defined]
    module.add_options = lambda parser: parser.add_argument("--resume")  # type: ignore[attr-defined]
    monkeypatch.setattr(bench, "load_bench", lambda name: module)
    assert main(["bench", "ablation", "--quick", "--out", str(tmp_path / "out"), "--seeds", "2"]) == 130
    out, err = capsys.readouterr()
    # With the options it ran with: a resume refuses other ones (or, for some, quietly drops rows). On stderr, as
    # search's, train's and tune's stops: it went to stdout, so `bench ablation > results.txt` stopped silently.
    assert err.strip() == ("stopped; continue with: python cli.py bench ablation --quick --seeds 2 --resume "
                           f"{tmp_path / 'out'}")
    assert out == ""


def test_bench_keeps_an_empty_out_folder_the_user_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "load_bench", lambda name: failing_bench(MamoError("refused.")))
    (tmp_path / "out").mkdir()
    assert main(["bench", "step", "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    assert (tmp_path / "out").is_dir()


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("argv, unknown", [
    (["bench", "step", "--set", "train.lr=1"], "--set"),  # was read as --setups and refused the value instead
    (["search", "no-such-preset", "--run", "x"], "--run"),  # was read as --run-dir
])
def test_an_abbreviated_option_is_not_taken_for_another(argv: list[str], unknown: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert f"unrecognized arguments: {unknown}" in capsys.readouterr().err


@pytest.mark.parametrize(("argv0", "where", "expected"), [
    ("/usr/local/bin/mamo", "elsewhere", "mamo search --resume runs/x"),
    ("cli.py", "checkout", "python cli.py search --resume runs/x"),
    ("CHECKOUT/cli.py", "elsewhere", "python CHECKOUT/cli.py search --resume runs/x"),
    ("/some/script.py", "elsewhere", "python cli.py search --resume runs/x"),  # the Python API's caller
])
def test_printed_commands_run_mamo_the_way_it_was_run(argv0: str, where: str, expected: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Always "python cli.py ...": after `mamo train` or from another folder, pasting it failed (a helper's audit).
    import sys

    from mamo.runs import cli

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "cli.py").write_text("")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / where)
    monkeypatch.setattr(sys, "argv", [argv0.replace("CHECKOUT", str(checkout))])
    assert cli("search", "--resume", "runs/x") == expected.replace("CHECKOUT", str(checkout))

