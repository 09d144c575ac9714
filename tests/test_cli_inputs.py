"""Bad command-line inputs: each gives one sentence naming the input and the fix, and leaves no folder behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_errors import single_error

from mamo.cli import main


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
