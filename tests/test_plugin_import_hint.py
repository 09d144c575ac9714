"""The hint of a plugin named module:function that failed to import (mamo/data_plugins.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mamo.config import DataConfig
from mamo.data import load_data
from mamo.errors import MamoError


def test_a_module_found_whose_own_import_fails_is_not_told_to_be_named_by_its_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: the file beside the user was found (its folder on PYTHONPATH) and failed importing a dependency it
    # lacks, yet the error said to name it by its path, which fails the same way: the advice hid the missing one.
    (tmp_path / "dep_missing_xyz.py").write_text("import no_such_dependency_xyz\ndef build(**kw): pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MamoError) as raised:
        load_data(DataConfig(name="dep_missing_xyz:build"))
    message = str(raised.value)
    assert "No module named 'no_such_dependency_xyz'" in message and "named by its path" not in message
    sys.modules.pop("dep_missing_xyz", None)


def test_a_package_missing_beside_the_user_still_gets_the_path_hint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pkg_xyz").mkdir()
    (tmp_path / "pkg_xyz" / "data.py").write_text("def build(**kw): pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    with pytest.raises(MamoError, match=r"named by its path: data\.name=\./pkg_xyz/data\.py:build\.$"):
        load_data(DataConfig(name="pkg_xyz.data:build"))
