"""docs/python.md runs as written: every Python block of it, each in a fresh namespace."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "python.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", PAGE.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


def test_the_page_has_its_examples() -> None:
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_each_example_runs(index: int, capsys: pytest.CaptureFixture, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where the examples' run folders go
    exec(compile(BLOCKS[index], f"{PAGE}:block{index + 1}", "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    assert printed.strip(), "each example prints what it shows"


def test_every_name_the_page_lists_exists() -> None:
    names = set(re.findall(r"`(mamo(?:\.\w+)+)", PAGE.read_text(encoding="utf-8")))
    assert "mamo.search.run_search" in names
    for name in names:
        module, _, attribute = name.rpartition(".")
        try:
            found = importlib.import_module(name)
        except ModuleNotFoundError:
            found = getattr(importlib.import_module(module), attribute, None)
        assert found is not None, name
