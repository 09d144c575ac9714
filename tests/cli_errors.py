"""Checks shared by the command-line tests."""

from __future__ import annotations


def single_error(err: str) -> str:
    """The one 'mamo: error:' line, checked to be one sentence with no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mamo: error:")]
    assert len(lines) == 1, err
    message = lines[0].removeprefix("mamo: error: ")
    assert message.endswith(".") and message.count("; ") <= 2, message
    return message
