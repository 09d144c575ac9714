"""A data plugin edited between two calls in one Python process (a notebook): the second call runs the new code,
as the baseline cache's key (the source's sha256) already assumes (mamo/data_plugins.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mamo.data_plugins import load_plugin

SOURCE = "SCALE = {}\n\n\ndef build(seed, root):\n    return SCALE\n"


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable package ``edited_pkg_xyz`` whose ``data`` module is the plugin; gone from sys.modules after."""
    (tmp_path / "edited_pkg_xyz").mkdir()
    (tmp_path / "edited_pkg_xyz" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "edited_pkg_xyz" / "data.py"
    for name in ("edited_pkg_xyz.data", "edited_pkg_xyz"):
        sys.modules.pop(name, None)


def test_a_module_plugin_edited_between_two_loads_runs_its_new_code(package: Path) -> None:
    # Before: importlib's cached module ran the old code, while the baseline cache keyed its results by the new
    # source: a fresh process then compared its run on the new data with STL and HPS of the old (Δ −197,926 %).
    package.write_text(SOURCE.format(1.0))
    assert load_plugin("edited_pkg_xyz.data:build")(0, None) == 1.0
    package.write_text(SOURCE.format(100.0))
    assert load_plugin("edited_pkg_xyz.data:build")(0, None) == 100.0
    assert load_plugin("edited_pkg_xyz.data:build")(0, None) == 100.0  # unchanged since: not run again


def test_a_module_plugin_imported_by_the_user_before_an_edit_runs_the_new_code(package: Path) -> None:
    package.write_text(SOURCE.format(1.0))
    import edited_pkg_xyz.data  # noqa: F401 (the user's own import, which mamo has not seen)

    package.write_text(SOURCE.format(100.0))
    assert load_plugin("edited_pkg_xyz.data:build")(0, None) == 100.0


def test_a_plugin_rewritten_at_its_size_within_its_second_runs_the_new_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: Path) -> None:
    # Python's bytecode cache trusts a source of the same size and modification second: 1.0 came back for 9.0.
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # the default outside this project's test machines
    plugin = tmp_path / "same_size_xyz.py"
    for path, name in ((plugin, f"{plugin}:build"), (package, "edited_pkg_xyz.data:build")):
        path.write_text(SOURCE.format(1.0))
        stamp = path.stat().st_mtime_ns
        assert load_plugin(name)(0, None) == 1.0
        path.write_text(SOURCE.format(9.0))
        os.utime(path, ns=(stamp, stamp))
        assert load_plugin(name)(0, None) == 9.0, name
