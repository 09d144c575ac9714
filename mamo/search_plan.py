"""What a search will do before it runs: its phases and their epochs, its name in reports, and the checks and
notes on its settings (a budget that differs from the baselines', a tensioner window longer than the final
phase). Shared by ``search`` and ``tune``, which checks the ends of its ranges with them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mamo import graph as g
from mamo.config import Config, SearchConfig
from mamo.conflicts import parse_threshold
from mamo.data import MultiTaskData, batches_per_epoch
from mamo.directions import direction_label
from mamo.errors import MamoError
from mamo.runs import cli, counted
from mamo.samples import no_task_spec, targets_without_a_task


@dataclass(frozen=True)
class Phase:
    """One phase of a search's plan: the ``index``-th, named ``pretrain``, ``round<z>`` or ``final``."""

    index: int
    name: str
    kind: str  # a key of PHASE_KINDS and of the runners' table (mamo.search_phases.PHASE_RUNNERS)
    epochs: int
    round: int = 0  # z, for a detection round


# Each kind of phase: how its phases are named (``z`` is the round) and how many epochs each trains.
PHASE_KINDS: dict[str, tuple[str, Callable[[Config], int]]] = {
    "pretrain": ("pretrain", lambda config: config.search.pretrain_epochs),
    "round": ("round{z}", lambda config: config.search.round_epochs),
    "final": ("final", lambda config: final_epochs(config)),
}


def _kinds(rounds: int) -> list[tuple[str, int]]:
    return [("pretrain", 0), *(("round", z) for z in range(1, rounds + 1)), ("final", 0)]


def phase_names(rounds: int) -> list[str]:
    """The phases' names of a search with ``rounds`` detection rounds, in order."""
    return [PHASE_KINDS[kind][0].format(z=z) for kind, z in _kinds(rounds)]


def search_phases(config: Config) -> list[Phase]:
    """The search's plan: pretrain, ``search.rounds`` detection rounds, final."""
    return [Phase(index, PHASE_KINDS[kind][0].format(z=z), kind, PHASE_KINDS[kind][1](config), z)
            for index, (kind, z) in enumerate(_kinds(config.search.rounds))]


def label_phases(history: list[dict], config: Config) -> None:
    """Name the phase of history entries (one per epoch) that checkpoints written before 2026-11-25 restored
    without it, from the plan, so that a search resumed across that version has every epoch in its time table."""
    if all("phase" in entry for entry in history):
        return
    plan = [phase.name for phase in search_phases(config) for _ in range(phase.epochs)]
    for entry, name in zip(history, plan, strict=False):
        entry.setdefault("phase", name)


def check_resumed_phase(config: Config, state: dict | None, directory: Path) -> None:
    """Refuse a config.yaml whose phases (``search.rounds``) no longer put the checkpoint's phase where it was
    saved; also caught for checkpoints that predate the recorded config (not compared then)."""
    if state is None:
        return
    names = phase_names(config.search.rounds)
    index = state["phase_index"]
    if index >= len(names) or names[index] != state["phase"]:
        raise MamoError(f"{directory / 'config.yaml'} sets search.rounds to {config.search.rounds}, but the run's "
                        f"newest checkpoint was saved in phase '{state['phase']}' of another plan; undo the edit, "
                        "or start a new run for the new value.")


def method_name(config: Config) -> str:
    base = direction_label(config.direction, config.train.gradients)
    return f"MAMO ({base})" if config.search.modules == "gmk" else f"MAMO w/o GMK ({base})"


def check_search_config(config: Config, rounds_setting: str = "search.rounds") -> None:
    """The search section's own settings; fails before any folder is made. ``rounds_setting`` names what sets
    the number of rounds (tune checks its range's ends)."""
    if config.train.mode != "mtl":  # a search ran the shared network anyway, with config.yaml saying otherwise
        raise MamoError(f"train.mode '{config.train.mode}' is for the train command; a search always trains the "
                        "shared network (and its STL baselines through search.baselines), so leave train.mode at "
                        "mtl.")
    if config.search.modules not in g.MODULE_NAMES:
        raise MamoError(f"unknown search.modules '{config.search.modules}'; use one of {', '.join(g.MODULE_NAMES)}.")
    parse_threshold(config.search.threshold)
    for key in ("rounds", "pretrain_epochs", "round_epochs", "final_epochs"):
        value = getattr(config.search, key)
        if value is not None and value < 0:
            raise MamoError(f"search.{key} must be a non-negative integer, got {value}; fix it.")
    if config.search.round_epochs < 1 and config.search.rounds > 0:
        raise MamoError(f"search.round_epochs must be ≥ 1 when search.rounds > 0 (a round counts conflicts while it "
                        f"trains), got {config.search.round_epochs}; fix it.")
    search = config.search
    if search.final_epochs == 0 and search.rounds > 0:  # as below for null: the grown modules would stay untrained
        raise MamoError(f"search.final_epochs = 0 leaves the modules the last round grows untrained; give the final "
                        f"phase at least 1 epoch (null: the rest of train.epochs) or set {rounds_setting} to 0.")
    before_final = epochs_before_final(search)
    # With rounds, the final phase must get an epoch: it is what trains the modules the last round grew.
    if search.final_epochs is None and before_final >= config.train.epochs + (search.rounds == 0):
        raise MamoError(f"search.pretrain_epochs + search.rounds × search.round_epochs = {search.pretrain_epochs} + "
                        f"{search.rounds} × {search.round_epochs} = {before_final} epochs leave no epoch of the "
                        f"budget train.epochs = {config.train.epochs} for the final phase; raise train.epochs, "
                        f"lower {rounds_setting} or set search.final_epochs.")
    if before_final + final_epochs(config) < 1:
        raise MamoError("search.pretrain_epochs, search.rounds × search.round_epochs and search.final_epochs are all "
                        "0, so the search would train nothing; leave search.final_epochs unset (null) to train "
                        "train.epochs, or give a phase epochs.")


def check_search_tasks(data: MultiTaskData) -> None:
    """A search grows modules between pairs of tasks: one task has no pair."""
    if len(data.tasks) < 2:
        extra = targets_without_a_task(data)
        unspecified = f" (its {no_task_spec(extra)})" if extra else ""
        raise MamoError(f"the data has {len(data.tasks)} task ({', '.join(data.tasks)}){unspecified}, and a search "
                        f"grows modules between pairs of tasks; give the data two or more tasks, or use "
                        f"`{cli('train')}` for one.")


def epochs_before_final(search: SearchConfig, rounds: int | None = None) -> int:
    """Pretraining plus ``rounds`` detection rounds (default ``search.rounds``), in epochs."""
    return search.pretrain_epochs + (search.rounds if rounds is None else rounds) * search.round_epochs


def final_epochs(config: Config) -> int:
    """The final phase's epochs: ``search.final_epochs``, or (None) what pretraining and the rounds leave of
    ``train.epochs``, so that the search trains as long as each baseline whatever the number of rounds."""
    search = config.search
    if search.final_epochs is not None:
        return search.final_epochs
    return config.train.epochs - epochs_before_final(search)


def plan_line(config: Config, tasks: int) -> str:
    """The search's phases and their epochs, said when it starts (what the epoch lines then count through)."""
    search = config.search
    rounds = (f"{counted(search.rounds, 'detection round')} of {counted(search.round_epochs, 'epoch')}" if search.rounds
              else "no detection round")
    baselines = (f"; first the baselines (STL: {counted(tasks, 'network')}, HPS: one), "
                 f"{counted(config.train.epochs, 'epoch')} each unless cached") if search.baselines else ""
    return (f"plan: pretrain {counted(search.pretrain_epochs, 'epoch')}, {rounds}, final "
            f"{counted(final_epochs(config), 'epoch')}{baselines}")


def budget_note(config: Config) -> str | None:
    """A log line when the search's epochs differ from the baselines' budget (an explicit final_epochs)."""
    total = epochs_before_final(config.search) + final_epochs(config)
    if not config.search.baselines or total == config.train.epochs:
        return None
    return (f"note: the search trains {counted(total, 'epoch')} and the STL/HPS baselines train.epochs = "
            f"{config.train.epochs}, so the report compares different budgets; leave search.final_epochs unset "
            "(null) to match them.")


def tensioner_window_note(config: Config, train_size: int, T: int | None = None, setting: str = "direction.tensioner.T"
                          ) -> str | None:
    """A log line when the tensioner (window ``T``, default the config's) could not act in the final phase after
    a growth (or, under ``train.gradients=ub``, after any round), which resets its window to T + 1 steps; None
    when it can. ``setting`` names what to lower."""
    T = config.direction.tensioner.T if T is None else T
    per_epoch = batches_per_epoch(train_size, config.train.batch_size, drop_single=True)
    final = final_epochs(config)
    steps = per_epoch * final
    if config.direction.tensioner.formulation == "off" or config.search.rounds == 0 or T + 1 <= steps:
        return None
    # Under ub the final phase always starts a new window: the rounds measured exact gradients.
    when = ("under train.gradients=ub that phase always starts a new window, so" if config.train.gradients == "ub"
            else "if the last round grows,")
    return (f"note: after the network grows, the tensioner needs T + 1 = {T + 1} steps before it acts, and the "
            f"final phase has {steps} ({counted(final, 'epoch')} of {counted(per_epoch, 'step')}); {when} it will "
            f"not act there. Lower {setting} or raise search.final_epochs (or train.epochs).")
