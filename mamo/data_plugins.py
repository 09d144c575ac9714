"""Finding and calling a dataset builder: plugins and the keyword arguments every builder gets.

A plugin is named ``path/to/file.py:function`` or ``package.module:function`` in ``data.name``;
:func:`load_plugin` imports it with a one-sentence error for each way that can fail. :func:`builder_arguments`
turns ``data.*`` into the builder's keyword arguments (``seed``, ``root``, the split sizes and
``data.options``) and refuses what the builder's signature does not take, before anything is built.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import re
import sys
import sysconfig
import traceback
from collections.abc import Callable
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

from mamo.config import DataConfig
from mamo.errors import MamoError, PluginNotFound

SIZE_KEYS = ("train_size", "val_size", "test_size")
RESERVED = ("seed", "root", *SIZE_KEYS)
# Set on a module plugin once run: the sha256 of the source it ran, to tell when the file has changed since.
RAN_SOURCE = "__mamo_plugin_source_sha256__"


class _SourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles the plugin's source as it is now: Python's bytecode cache trusts a file of the same size and
    modification second, so a plugin rewritten within a second (a script, a notebook cell) ran its old code."""

    def get_code(self, fullname: str) -> CodeType:
        return self.source_to_code(self.get_data(self.path), self.path)


def _is_file_plugin(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def plugin_source(name: str) -> Path | None:
    """The source file of the plugin ``data.name`` names (None for a built-in dataset, or when there is none)."""
    target, colon, _ = name.rpartition(":")
    if not colon:
        return None
    if _is_file_plugin(target):
        return Path(target).expanduser()
    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def plugin_source_digest(name: str) -> str | None:
    """The sha256 of :func:`plugin_source`: the baseline cache's key includes it, so editing a plugin retrains
    the baselines instead of comparing against results of the old data. Files the plugin imports or reads are
    not covered."""
    path = plugin_source(name)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path else None
    except OSError:
        return None


def plugin_code_digest(name: str) -> str | None:
    """The sha256 of :func:`plugin_source`'s syntax tree, which comments, blank lines and line breaks leave alone
    (None when there is no source or it does not parse). A tune study compares it when the bytes differ: an edit
    of comments only returns the same data. Python versions may dump a tree differently; a mismatch refuses."""
    path = plugin_source(name)
    try:
        tree = ast.parse(path.read_bytes()) if path else None
    except (OSError, SyntaxError, ValueError):
        return None
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest() if tree else None


def plugin_edited_note(name: str, started: Path, starts_over: bool = False, baselines: bool = False) -> str | None:
    """A log line for a resumed run whose plugin was edited after ``started`` (the run's config.yaml) was written;
    ``starts_over``: the run has no checkpoint, so nothing it keeps saw the old data; ``baselines``: a search that
    trained STL and HPS on it."""
    path = plugin_source(name)
    try:
        if path is None or path.stat().st_mtime <= started.stat().st_mtime:
            return None
    except OSError:
        return None
    changed = f"note: the data plugin {path} changed after this run started; "
    if starts_over:
        return changed + "the run starts over on what it returns now."
    return changed + ("the resumed run trains and tests on what it returns now, while its epochs before the stop "
                      + ("and its baselines " if baselines else "") + "saw the old data.")


def raised_by_mamo(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside mamo's package (a helper a plugin calls), not by the plugin itself."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(Path(__file__).resolve().parent)


def raised_at(exc: BaseException) -> str:
    """`` at my_plugin.py:12 (in build)``: the line of the user's code that raised ``exc``, its traceback's
    deepest frame outside mamo, the standard library and installed packages (a sentence alone left a long
    plugin's author without the line); empty when no frame is the user's."""
    paths = sysconfig.get_paths()
    library = [Path(p).resolve() for p in (paths["stdlib"], paths["purelib"], paths["platlib"], Path(__file__).parent)]
    own = [frame for frame in traceback.extract_tb(exc.__traceback__) if not frame.filename.startswith("<")
           and not any(Path(frame.filename).resolve().is_relative_to(root) for root in library)]
    if not own:
        return ""
    frame = own[-1]
    shown = Path(frame.filename)
    with contextlib.suppress(ValueError):
        shown = shown.resolve().relative_to(Path.cwd())
    return f" at {shown}:{frame.lineno} (in {frame.name})"


def load_plugin(name: str) -> Callable[..., dict]:
    """The function named by ``data.name`` (``file.py:function`` or ``module:function``)."""
    target, _, func_name = name.rpartition(":")
    if _is_file_plugin(target):
        path = Path(target).expanduser()
        if path.is_dir():
            raise MamoError(f"data plugin '{target}' is a folder, not a .py file; name the file in data.name "
                            f"'{name}'.")
        if not path.is_file():
            where = "" if path.is_absolute() else f" (a relative path is read from the current folder, {Path.cwd()})"
            raise PluginNotFound(f"data plugin file '{target}' was not found{where}; fix the path in data.name "
                                 f"'{name}'.", target)
        # As with `python file.py`, the plugin's own folder is importable, so it can import its helper modules.
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.append(folder)  # last: it never shadows an installed package
        module_name = "mamo_data_plugin_" + re.sub(r"\W", "_", path.stem)
        spec = importlib.util.spec_from_file_location(module_name, path, loader=_SourceLoader(module_name, str(path)))
        if spec is None or spec.loader is None:
            raise MamoError(f"data plugin file '{target}' cannot be loaded as Python; give a .py file in data.name.")
        module = importlib.util.module_from_spec(spec)
        # Registered before running it, as importlib's recipe does, so dataclasses and pickling inside it work.
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except MamoError:
            sys.modules.pop(module_name, None)
            raise
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise MamoError(
                f"data plugin file '{target}' raised {type(exc).__name__} on import{raised_at(exc)}: {exc}; fix the "
                "plugin."
            ) from exc
    else:
        if not target or target.startswith("."):  # import_module raises ValueError or TypeError for these
            raise MamoError(f"data plugin '{name}' names no module before ':'; write module:function (e.g. "
                            "my_package.data:build) or path/to/file.py:function.")
        try:
            module = _current_module(target)
        except ImportError as exc:
            parts = target.split(".")
            beside = Path(*parts).with_suffix(".py")
            # The current folder is not on sys.path under `python cli.py`, so a module name for a file there fails;
            # a module that was found but failed to import one of its own (exc.name another) is not helped by that.
            not_found = isinstance(exc, ModuleNotFoundError) and exc.name in {
                ".".join(parts[:i]) for i in range(1, len(parts) + 1)}
            fix = (f"a file in the current folder is named by its path: data.name=./{beside}:{func_name}."
                   if not_found and beside.is_file() else "fix data.name or install the module.")
            raise MamoError(f"data plugin module '{target}' could not be imported ({exc}); {fix}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        functions = [key for key, value in vars(module).items() if callable(value) and not key.startswith("_")]
        near = difflib.get_close_matches(func_name, functions, n=1)
        hint = f" (did you mean '{target}:{near[0]}'?)" if near else ""
        raise MamoError(f"data plugin '{target}' has no function '{func_name}'{hint}; define it or fix data.name "
                        f"'{name}'.")
    return func


def _current_module(target: str) -> ModuleType:
    """The module ``target``, run again from its source when the file changed since mamo last ran it, or when it
    was imported before mamo saw it: importlib keeps a module's first version for the whole process (a notebook),
    while the baseline cache keys results by the source as it is now (old data's results filed as the new's)."""
    imported = target in sys.modules
    module = importlib.import_module(target)
    origin = getattr(module.__spec__, "origin", None)
    if not origin or not origin.endswith(".py"):  # an extension or namespace package: nothing to run again
        return module
    try:  # before running it: a file changed while it runs differs from the mark, and runs again next time
        digest = hashlib.sha256(Path(origin).read_bytes()).hexdigest()
    except OSError:
        return module
    if imported and getattr(module, RAN_SOURCE, None) != digest:
        try:
            _SourceLoader(target, origin).exec_module(module)
        except MamoError:
            raise
        except Exception as exc:
            raise MamoError(f"data plugin module '{target}' raised {type(exc).__name__} when run again after an "
                            f"edit{raised_at(exc)}: {exc}; fix the plugin.") from exc
    setattr(module, RAN_SOURCE, digest)
    return module


def _accepted(func: Callable[..., Any]) -> tuple[set[str], bool] | None:
    """Keyword names ``func`` accepts and whether it takes ``**kwargs``; None if it cannot be inspected."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def builder_arguments(func: Callable[..., Any], cfg: DataConfig, what: str, plugin: bool) -> dict[str, Any]:
    """The keyword arguments ``func`` is called with; ``what`` names it in errors. A plugin may leave out the
    split sizes (refused if the user sets one); a built-in takes them all."""
    sizes = {key: getattr(cfg, key) for key in SIZE_KEYS}
    for key, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MamoError(f"data.{key} must be a positive integer or null, got {value!r}; fix it.")
    for key in cfg.options:
        if not isinstance(key, str):  # YAML reads `1: 2` as an int key, which no keyword argument can be
            raise MamoError(f"data.options has the key {key!r}, which is no argument name; name each option with a "
                            "word, such as n_classes.")
        if key in RESERVED:
            raise MamoError(f"data.options.{key} is reserved for {what}; set data.{key} instead.")
    kwargs: dict[str, Any] = {"seed": cfg.seed, "root": cfg.root}
    accepted = _accepted(func)
    if accepted is None:
        return {**kwargs, **{k: v for k, v in sizes.items() if v is not None}, **cfg.options}
    names, var_keyword = accepted
    if plugin:
        if not var_keyword and not {"seed", "root"} <= names:
            raise MamoError(f"{what} must accept the keyword arguments seed and root; add them to its signature.")
        # Unset (None): the plugin's own default applies, as None passed would override it.
        untaken = [key for key, value in sizes.items() if value is not None and key not in names and not var_keyword]
        if untaken:  # all at once: a copied preset sets all three, which were refused one command at a time
            one = len(untaken) == 1
            shown = " and ".join(", ".join(f"data.{k}" for k in untaken).rsplit(", ", 1))
            arguments = " or ".join(", ".join(repr(k) for k in untaken).rsplit(", ", 1))
            unset = " ".join(f"--set data.{k}=null" for k in untaken)
            raise MamoError(f"{shown} {'is' if one else 'are'} set but {what} takes no {arguments} argument; "
                            f"unset {'it' if one else 'them'} "
                            f"({unset}, or remove the lines from the preset) or add the argument to the plugin.")
        kwargs.update({key: value for key, value in sizes.items() if value is not None})
    else:
        kwargs.update(sizes)
    if not var_keyword:
        valid = sorted(names - set(RESERVED))
        for key in cfg.options:
            if key not in names:
                raise MamoError(
                    f"unknown option '{key}' in data.options for {what}; valid options: {', '.join(valid) or 'none'}."
                )
    return {**kwargs, **cfg.options}
