"""What a ``--resume`` may change, and the checks that the resumed run continues what its checkpoints computed:
the saved config read back with the allowed ``--set`` settings, and edits of config.yaml refused."""

from __future__ import annotations

import contextlib
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mamo.config import Config, load_config, split_override, yaml_text
from mamo.errors import MamoError
from mamo.runs import FolderLock, cli, never_started, run_command, utf8_path
from mamo.writes import written_by_another_live_process

# What --set (or an edit of config.yaml) may change when a run resumes: where it runs (its device, CPU threads and
# CUDA graphs, which move the numbers only as far as another machine would), where its files lie (the same data
# and initial weights on another machine), how often it saves and what a finished search keeps, never what it
# computes.
RESUME_SETTINGS = ("train.device", "train.threads", "train.cuda_graphs", "data.root", "model.weights",
                   "train.checkpoint_seconds", "search.keep_checkpoints")


def resume_settings_text(command: str = "search") -> str:
    """The settings --set may change when a ``command`` run resumes, for help texts and errors: "a, b and c" (a
    ``train`` run reads no search settings, so its texts leave them out)."""
    shown = [key for key in RESUME_SETTINGS if command == "search" or not key.startswith("search.")]
    return f"{', '.join(shown[:-1])} and {shown[-1]}"


def read_run_config(
    run_dir: str | Path | None, command: str, settings: Sequence[str] = (), held: contextlib.ExitStack | None = None
) -> tuple[Config, Path]:
    """The config a stopped ``command`` run saved in ``run_dir``, for ``--resume``, with ``settings``
    (``--set`` overrides of :data:`RESUME_SETTINGS` only) applied (:func:`mamo.session.keep_resume_settings` writes
    them back once the run has checked them); the folder's :class:`FolderLock` goes into ``held``, to last while the
    resumed run works there."""
    for text in settings:
        key = ".".join(split_override(text)[0])
        if key not in RESUME_SETTINGS:
            raise MamoError(f"--set {key} cannot change when a run resumes (the rest would not match what it "
                            f"computed so far); only {resume_settings_text(command)} can, so start a new run.")
    if run_dir is not None:  # before anything reads the folder or writes into its log.txt
        utf8_path(run_dir, "--resume")
    if run_dir is not None and never_started(Path(run_dir)):
        raise MamoError(f"{run_dir} holds no config.yaml: the {command} that made it stopped before it started, so "
                        f"there is nothing to resume; run the {command} again with "
                        f"--run-dir {shlex.quote(str(run_dir))}.")
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        raise MamoError(f"--resume needs an existing {command} run folder with config.yaml, got '{run_dir}'; "
                        f"pass the folder a stopped {command} wrote.")
    directory = Path(run_dir)
    if not (directory / "config.yaml").read_text(encoding="utf-8", errors="replace").strip():
        # Read as a preset, an empty file is the built-in defaults: the resumed run would compute something else.
        raise MamoError(f"{directory / 'config.yaml'} is empty (its command was killed while writing it), so the "
                        "run's settings are lost; start a new run.")
    other = run_command(directory)
    if other not in (None, command):
        if (directory / "metrics.json").exists():
            raise MamoError(f"{directory} is a finished {other} run folder, not a {command} one; there is nothing "
                            "to resume.")
        raise MamoError(f"{directory} is a {other} run folder, not a {command} one; continue it with "
                        f"{cli(other, '--resume', directory)}.")
    checkpoints = directory / "checkpoints"
    if checkpoints.exists() and not checkpoints.is_dir():  # its checkpoints were reported "corrupt"
        raise MamoError(f"{checkpoints} is a file where the run keeps its checkpoints folder; move the file away "
                        "(or put the folder back), then resume again.")
    if (directory / "metrics.json").exists():  # refused before anything is removed: an export may be writing there
        raise MamoError(f"the {'search' if command == 'search' else 'train run'} in {directory} has finished "
                        "(metrics.json is there); nothing to resume.")
    if held is not None:  # before the temporary files go: they may be a running process's
        held.enter_context(FolderLock(directory))
    for partial in [*directory.glob("*.tmp"), *checkpoints.glob("*.tmp")]:
        if written_by_another_live_process(partial):  # an export beside the stopped run, say: not a leftover
            continue
        if partial.is_dir() and not partial.is_symlink():  # an export's staging folder (replace_from_folder)
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)  # a file a killed process was writing; the resumed run writes its own
    return load_config(str(directory / "config.yaml"), list(settings), kind="the run's config"), directory


def flat_settings(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config's dict (or a setting's value under ``prefix``) as dotted keys (``data.options.d``), so that the
    one edited key can be named."""
    if isinstance(value, dict) and value:
        return {key: leaf for name, inner in value.items()
                for key, leaf in flat_settings(inner, f"{prefix}.{name}" if prefix else str(name)).items()}
    return {prefix: value}


_UNSET = object()  # a key one of two configs does not have (a data.options entry)


def _shown(value: Any) -> str:
    """A setting's value as config.yaml writes it (``null``, ``true``, quoted strings)."""
    return "nothing" if value is _UNSET else yaml_text(value)


def check_resumed_config(config: Config, state: dict | None, directory: Path) -> None:
    """Refuse to continue a run whose config.yaml was edited after ``state`` (its newest checkpoint) was saved:
    the rest of the run would not continue what the checkpoints computed. Only :data:`RESUME_SETTINGS` may differ;
    a checkpoint without a recorded config (written before checkpoints recorded it) is not checked."""
    if state is None or "config" not in state:
        return
    changes = computed_changes(state["config"], config.to_dict())
    if changes:
        key, before, after = changes[0]
        raise MamoError(f"{directory / 'config.yaml'} sets {key} to {_shown(after)} but the run's checkpoints "
                        f"were computed with {_shown(before)}; undo the edit, or start a new run for the new "
                        "value.")


def _label_or_tuning(key: str) -> bool:
    """The run's name and the tune section (read by ``tune`` alone, which writes each trial's resolved values into
    the other sections): nothing a train or search run computes with."""
    return key == "name" or key.startswith("tune.")


def computed_changes(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """``(key, saved value, new value)`` of every setting outside :data:`RESUME_SETTINGS` in which two resolved
    configs (``Config.to_dict()``) differ: what a continued run would compute differently."""
    # A key newer than ``saved`` is missing from it; that run computed with the key's default.
    defaults, before_flat, now_flat = flat_settings(Config().to_dict()), flat_settings(saved), flat_settings(now)
    changes = []
    for key in [*now_flat, *(key for key in before_flat if key not in now_flat)]:
        before, after = before_flat.get(key, defaults.get(key, _UNSET)), now_flat.get(key, _UNSET)
        if key not in RESUME_SETTINGS and not _label_or_tuning(key) and before != after:
            changes.append((key, before, after))
    return changes
