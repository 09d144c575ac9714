"""Run folder paths as mamo prints them in commands to paste, and the paths it refuses."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
from cli_errors import single_error
from test_cli_inputs import TINY, make_run

from mamo import bench
from mamo.cli import main
from mamo.config import Config, config_text
from mamo.errors import MamoError
from mamo.export import _rerun, load_trained
from mamo.resume import read_run_config
from mamo.runs import RUN_HEADER, cli
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

    _run_folder(folder, "train")
    assert pasted(_rerun(folder, "train").removeprefix("rerun it with ")) == [
        "train", str(folder / "config.yaml"), "--run-dir", "NEW_FOLDER"]
    with pytest.raises(MamoError) as refused:  # the other command's folder: continue it with that command
        read_run_config(folder, "search")
    assert pasted(str(refused.value).split("continue it with ")[1]) == ["train", "--resume", str(folder)]
    with pytest.raises(MamoError) as unfinished:
        load_trained(folder)
    assert pasted(str(unfinished.value).split("finish it with ")[1]) == ["train", "--resume", str(folder)]


# ------------------------------------------------------------------------------------------- not UTF-8

NOT_UTF8 = os.fsdecode(b"bad\xffname")  # a name Linux allows: its \xff byte is no UTF-8


@pytest.mark.parametrize("argv", [["search", "quick", *TINY, "--set", "train.epochs=4", "--run-dir"],
                                  ["train", "quick", *TINY, "--run-dir"],
                                  ["tune", "quick", "--trials", "1", "--run-dir"]])
def test_a_new_run_in_a_folder_that_is_not_utf8_is_refused_before_the_folder_is_made(
        argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a UnicodeEncodeError traceback from log.txt's first line, leaving config.yaml and an empty log.txt.
    folder = tmp_path / NOT_UTF8
    assert main([*argv, str(folder)]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"--run-dir {tmp_path}/bad\\xffname is not valid UTF-8, which mamo's log and model files need; rename it "
        "(or pass another path).")
    assert not folder.exists()


@pytest.mark.parametrize("command", ["train", "search"])
def test_resuming_a_run_whose_folder_is_not_utf8_is_refused(command: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = _run_folder(tmp_path / NOT_UTF8, command)
    assert main([command, "--resume", str(folder), "--no-progress", "--no-tensorboard"]) == 2
    assert "--resume " + f"{tmp_path}/bad\\xffname is not valid UTF-8" in single_error(capsys.readouterr().err)
    assert sorted(path.name for path in folder.iterdir()) == ["config.yaml"]  # no log.txt, no checkpoints


@pytest.mark.parametrize("command", ["show", "export"])
def test_an_intact_run_copied_to_a_name_that_is_not_utf8_is_not_called_damaged(
        command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: "the model files ... are unreadable or do not fit together (SafetensorError)": safetensors' reader
    # refuses such a path, the files were intact.
    folder = make_run(tmp_path / NOT_UTF8)
    assert main([command, str(folder)]) == 2
    message = single_error(capsys.readouterr().err)
    assert message.startswith(f"the run folder {tmp_path}/bad\\xffname is not valid UTF-8"), message


def test_an_export_out_folder_that_is_not_utf8_is_refused_before_it_is_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # torch.export's writer aborted the whole process on such a path (pybind11::error_already_set).
    out = tmp_path / NOT_UTF8
    assert main(["export", str(make_run(tmp_path / "run")), "--format", "json", "--out", str(out)]) == 2
    assert f"--out {tmp_path}/bad\\xffname is not valid UTF-8" in single_error(capsys.readouterr().err)
    assert not out.exists()


# ------------------------------------------------------------------------------ what a --run-dir is instead

SEARCH = ["search", "quick", *TINY, "--set", "train.epochs=4"]


def test_a_run_dir_that_is_a_link_to_nothing_or_a_file_says_so(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Before: "was taken by another run meanwhile" and "already exists and is not empty" (the file was empty).
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    assert main([*SEARCH, "--run-dir", str(link)]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"--run-dir {link} is a link to {tmp_path / 'nowhere'}, which does not exist; create what it points to or "
        "pass another --run-dir.")
    (tmp_path / "file").touch()
    assert main([*SEARCH, "--run-dir", str(tmp_path / "file")]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"--run-dir {tmp_path / 'file'} is a file, not a folder; pass a new --run-dir (a folder to create).")


def test_a_runs_folder_that_is_a_link_to_nothing_is_named_instead_of_retried_forever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mamo import runs
    from mamo.cli import os_failure

    monkeypatch.chdir(tmp_path)
    Path("runs").symlink_to(tmp_path / "nowhere")
    tries = []

    def counted_free_run_dir(*args: object) -> Path:  # the old loop asked for a new name forever
        tries.append(args)
        assert len(tries) < 5, "new_run_dir retries forever"
        return free_run_dir(*args)

    free_run_dir = runs.free_run_dir
    monkeypatch.setattr(runs, "free_run_dir", counted_free_run_dir)
    with pytest.raises(FileExistsError) as refused:
        runs.new_run_dir(None, Config(), "search")
    assert os_failure(refused.value) == (f"runs is a link to {tmp_path / 'nowhere'}, which does not exist; create "
                                         "what it points to or pass another path.")


@pytest.mark.parametrize("existed", [False, True])
def test_a_full_disk_while_writing_config_yaml_advises_a_retry_that_works(
        existed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: "... then continue with --resume", which said the folder "holds no config.yaml ... run the search again".
    import errno

    from mamo.runs import new_run_dir

    folder = tmp_path / "run"
    if existed:
        folder.mkdir()  # the user's empty folder stays theirs
    write_text = Path.write_text

    def full_disk(self: Path, *args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(MamoError) as refused:
        new_run_dir(folder, Config(), "search")
    assert str(refused.value) == (f"could not write {folder / 'config.yaml'} (No space left on device), so the run "
                                  "did not start; free disk space or fix the folder's permissions, then run the "
                                  "command again.")
    assert folder.exists() == existed and (not existed or not any(folder.iterdir()))
    monkeypatch.setattr(Path, "write_text", write_text)
    assert new_run_dir(folder, Config(), "search") == folder  # the retry, with the same --run-dir
    assert (folder / "config.yaml").is_file()


def test_a_run_missing_its_config_yaml_too_is_not_told_to_rerun_it(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Before: "rerun it with mamo search RUN/config.yaml --run-dir NEW_FOLDER", a file that is gone.
    folder = make_run(tmp_path / "run")
    (folder / "architecture.json").unlink()
    (folder / "metrics.json").write_text("{}")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "phase-00-pretrain.pt").touch()  # what names it a search run, config.yaml gone
    assert main(["export", str(folder)]) == 2
    assert single_error(capsys.readouterr().err).endswith(
        "rerun it with the preset and --set options it ran with (metrics.json lists them under 'config'): "
        f"{cli('search', 'PRESET', '--set', 'KEY=VALUE')}.")


def test_a_resume_clears_what_killed_writers_left_folders_too(tmp_path: Path) -> None:
    # An export killed while it wrote model.onnx left its staging folder (name.<host>.<pid>.tmp); unlink raised
    # IsADirectoryError on it, a traceback instead of the resume.
    folder = _run_folder(tmp_path / "run", "train")
    (folder / "model.onnx.host.1.tmp").mkdir()
    (folder / "model.onnx.host.1.tmp" / "model.onnx").write_bytes(b"half")
    (folder / "config.yaml.host.2.tmp").write_text("half")
    read_run_config(folder, "train")
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]


def test_a_terminal_without_a_width_gets_the_epoch_lines_not_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under `script` with a 0 x 0 terminal tqdm drew nothing and, stderr being a terminal, the epoch lines were
    # off: a run showed no progress at all (a user audit).
    import io
    import os
    import sys

    from mamo.runs import stderr_on_terminal

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

        def fileno(self) -> int:
            return 2

    monkeypatch.setattr(sys, "stderr", Terminal())
    for columns, bars in ((0, False), (80, True)):
        monkeypatch.setattr(os, "get_terminal_size", lambda fd, columns=columns: os.terminal_size((columns, 24)))
        assert stderr_on_terminal() is bars

    def unknown(fd: int) -> os.terminal_size:
        raise OSError(25, "Inappropriate ioctl for device")

    monkeypatch.setattr(os, "get_terminal_size", unknown)
    assert stderr_on_terminal()  # a terminal that cannot say its size keeps its bars, as before
