"""What a study reports at the end: the best trials' table, trials.csv, best.yaml and the Pareto scatter."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mamo.config import Config, dump_config, load_config
from mamo.errors import MamoError
from mamo.runs import cli, counted, table_lines
from mamo.tune_space import OWN_OBJECTIVE, SPACE, apply_params
from mamo.tune_storage import RETRY_OF
from mamo.writes import replace_atomically, write_csv_atomically, write_text_atomically

BEST_SHOWN = 5


def short_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(value: Any, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed and isinstance(value, float) else short_value(value)


def _count(value: Any) -> str:
    """A parameter count as report.md and show write it (thousands separators)."""
    return f"{value:,}" if isinstance(value, int) else _cell(value)


def _percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{fraction:.0%}"  # as report.md writes a win rate


def run_folder(trial: FrozenTrial, directory: Path) -> Path | None:
    """The trial's run folder: its ``trial-NNNN`` in the study folder ``directory`` when it is there, else the
    path the storage recorded (another machine's), or None where it has none. The recorded path is absolute, so
    it goes stale when a study folder is copied or moved: best.yaml was then read from the old folder, or another
    study's at that path."""
    stored = trial.user_attrs.get("run_dir")
    if stored is None:
        return None
    here = directory / Path(stored).name
    if here.is_dir():
        return here
    if trial.user_attrs.get("host") in (None, socket.gethostname()) and not Path(stored).exists():
        return None  # never made: killed between drawing its parameters and making it (its retry had its own)
    return Path(stored)


def _where(trial: FrozenTrial, directory: Path) -> str:
    """The trial's run folder, relative when it lies below here, prefixed by its host when it ran elsewhere."""
    path = run_folder(trial, directory) or Path("?")
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())
    host = trial.user_attrs.get("host")
    return str(path) if host in (None, socket.gethostname()) else f"{host}:{path}"


STOPPED_EARLY = "stopped before its objective started (it drew nothing)"

# A trial that began and recorded nothing: on a shared database, a worker killed on another machine, which the
# heartbeat failed (Optuna forbids writing to a finished trial, so its retry cannot add the reason); or an
# error outside the caught ones, which stopped the study with its message.
NO_RECORD = ("no reason recorded: its worker was killed (on a shared database the heartbeat then failed it and "
             "queued a retry, which has retry_of) or an error stopped the study (see the command's output)")


def fail_reason(trial: FrozenTrial) -> str:
    """Why a failed trial failed. :class:`mamo.tune_workers.Recorded` records the host first thing and a reason
    on every failure (:data:`STOPPED_EARLY` for a stop that came while Optuna made the trial); only a second
    stop before that, or a kill, leaves none."""
    if "fail_reason" in trial.user_attrs:
        return trial.user_attrs["fail_reason"]
    if "host" not in trial.user_attrs:
        return STOPPED_EARLY
    return NO_RECORD


def _values_text(study: optuna.Study, trial: FrozenTrial) -> str:
    names = study.metric_names or [f"objective {i}" for i in range(len(trial.values))]
    return "complete: " + ", ".join(f"{name} {value:.4g}" for name, value in zip(names, trial.values, strict=True))


def _pruned_text(study: optuna.Study, trial: FrozenTrial) -> str:
    step = max(trial.intermediate_values, default=None)
    return "pruned" if step is None else f"pruned after round {step} at {trial.intermediate_values[step]:.4g}"


OUTCOMES: dict[TrialState, Callable[[optuna.Study, FrozenTrial], str]] = {
    TrialState.COMPLETE: _values_text,
    TrialState.PRUNED: _pruned_text,
    TrialState.FAIL: lambda study, trial: f"failed: {fail_reason(trial)}",
}


def outcome_text(study: optuna.Study, trial: FrozenTrial) -> str:
    """How a finished trial ended, as its line in tune.log says: its values, the round it was pruned after, or
    why it failed."""
    return OUTCOMES[trial.state](study, trial)


def best_trials(study: optuna.Study, multi: bool) -> list[FrozenTrial]:
    """The Pareto front (multi-objective) or the best few complete trials, best first."""
    if multi:
        return sorted(study.best_trials, key=lambda t: t.number)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: t.value, reverse=True)[:BEST_SHOWN]


def chosen_trial(study: optuna.Study, multi: bool) -> FrozenTrial | None:
    """The trial that becomes best.yaml: the best value; on a Pareto front, the one with the best val Δ."""
    trials = best_trials(study, multi)
    if not trials:
        return None
    return max(trials, key=lambda t: t.user_attrs.get("val_delta", -math.inf)) if multi else trials[0]


def sampled_names(trials: list[FrozenTrial]) -> list[str]:
    """Every parameter the trials drew: mamo's tuned settings in their order, then a caller's objective's own."""
    drawn = {name for t in trials for name in t.params}
    return [name for name in SPACE if name in drawn] + sorted(drawn - SPACE.keys())


def trials_table(study: optuna.Study, trials: list[FrozenTrial], multi: bool, directory: Path) -> list[str]:
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    tuned = sampled_names(trials)
    if names == [OWN_OBJECTIVE]:  # a caller's objective: no search, so none of a search's columns
        return table_lines(["trial", *names, *tuned],
                           [[str(t.number), short_value(t.value), *(_cell(t.params.get(n)) for n in tuned)]
                            for t in trials])
    header = ["trial", *names, *(["val Δ"] if multi else []), "test Δ", "win", *tuned, "GMKs", "parameters",
              "run folder"]
    body = []
    for t in trials:
        attrs = t.user_attrs
        body.append([str(t.number), *(_cell(v, signed=not multi) for v in t.values),
                     *([_cell(attrs.get("val_delta"), True)] if multi else []), _cell(attrs.get("delta"), True),
                     _percent(attrs.get("win_rate")), *(_cell(t.params.get(n)) for n in tuned),
                     _cell(attrs.get("gmk_modules")), _count(attrs.get("params")), _where(t, directory)])
    return table_lines(header, body)


CSV_ATTRS = ("val_delta", "delta", "win_rate", "gmk_modules", "params", "seconds", "host",
             "run_dir", "fail_reason", "pruned_at_round", "pruned_val_delta")


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """One row per trial; ``run_dir`` as :func:`run_folder` finds it from the study folder holding ``path``."""
    trials = study.get_trials(deepcopy=False)
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    tuned = sampled_names(trials)
    attrs = [name for name in CSV_ATTRS if name not in names]  # the objective val_delta is a column already
    table = [["trial", "state", *names, *tuned, *attrs]]
    for t in trials:
        # Optuna stores a pruned trial's last report as its value: a round's Δ, not the objective, so its own columns.
        values = t.values if t.state == TrialState.COMPLETE and t.values else [None] * len(names)
        recorded = {**t.user_attrs, "fail_reason": fail_reason(t)} if t.state == TrialState.FAIL else t.user_attrs
        if t.state == TrialState.PRUNED and t.intermediate_values:
            last = max(t.intermediate_values)
            recorded = {**recorded, "pruned_at_round": last, "pruned_val_delta": t.intermediate_values[last]}
        folder = run_folder(t, path.parent)
        recorded = {**recorded, "run_dir": None if folder is None else str(folder.resolve())}
        table.append([t.number, t.state.name.lower(), *values, *(t.params.get(n) for n in tuned),
                      *(recorded.get(a) for a in attrs)])
    write_csv_atomically(path, table)


def plot_pareto(study: optuna.Study, path: Path) -> None:
    """Every complete trial in objective space (2 or 3 axes), the Pareto front highlighted and numbered."""
    from matplotlib.figure import Figure

    from mamo.plots import save_figure

    names = study.metric_names
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials}
    figure = Figure(figsize=(6, 5))
    axes = figure.add_subplot(projection="3d" if len(names) == 3 else None)
    for label, color, group in (("trial", "0.65", [t for t in complete if t.number not in front]),
                                ("Pareto front", "C3", [t for t in complete if t.number in front])):
        if group:
            axes.scatter(*zip(*(t.values for t in group), strict=True), c=color, label=label)
    # Trials at the same point share one label ("1, 2"): drawn one over the other, their numbers were unreadable.
    labels: dict[tuple[float, ...], list[str]] = {}
    for t in complete:
        if t.number in front:
            labels.setdefault(tuple(t.values), []).append(str(t.number))
    for point, numbers in labels.items():
        axes.text(*point, f" {', '.join(numbers)}", fontsize=8)
    for setter, name, direction in zip((axes.set_xlabel, axes.set_ylabel, getattr(axes, "set_zlabel", None)),
                                       names, study.directions, strict=False):
        setter(f"{name} ({'higher' if direction.name == 'MAXIMIZE' else 'lower'} is better)")
    axes.legend()
    axes.set_title(f"study '{study.study_name}': validation metrics of each trial")
    figure.tight_layout()
    save_figure(figure, path, dpi=120)


def _trial_config(trial: FrozenTrial, base: Config, directory: Path) -> Config | None:
    """The configuration ``trial`` ran with: its run folder's config.yaml (a later command's --set must not leak
    into best.yaml), or, where that folder is not readable here (another machine), ``base`` with its params;
    None for a caller's objective that drew parameters which are not mamo settings (no configuration holds them).
    Baselines as in ``base``: trials that tune the learning rate skip their own, a rerun of best.yaml wants them."""
    if trial.params.keys() - SPACE.keys():
        return None
    folder = run_folder(trial, directory)
    saved = folder / "config.yaml" if folder else None
    try:
        config = load_config(str(saved)) if saved and saved.is_file() else apply_params(base, trial.params)
    except MamoError:
        config = apply_params(base, trial.params)
    config.search.baselines = base.search.baselines
    return config


def _rerun_notes(tuned: Config, base: Config, trial: FrozenTrial, reference: bool) -> list[str]:
    """What a search of best.yaml computes differently from the trial it repeats, or keeps so as not to;
    ``reference``: the study trained an STL reference (a caller's objective's study has none to differ from)."""
    notes = []
    if tuned.train.threads is not None and base.train.threads is None:
        notes.append(f"It keeps train.threads={tuned.train.threads}, the thread count its trial's worker ran "
                     "with, so that a CPU repeats the trial; set it to null to use every core (the numbers then "
                     "move slightly).")
    if "lr" in trial.params and reference:
        notes.append(f"Its train.lr is the trial's, not the {base.train.lr:g} the study's STL reference trained "
                     "with: its search trains STL and HPS at the tuned rate, so its Δ is against those and not "
                     "the objective's; its validation metrics are the trial's.")
    return notes


def _reference_notes(trial: FrozenTrial, directory: Path) -> list[str]:
    """A note when the trial's run measured its Δ against STL baselines of its own that are not the study's
    reference (a continuation's ``--set train.batch_size=64``, say): its report, its test Δ and win in the table and
    a search of best.yaml use those, so that search does not repeat the objective."""
    folder = run_folder(trial, directory)
    try:
        own = json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("val_delta") if folder else None
    except (OSError, ValueError):  # another machine's folder, or one not finished
        return []
    objective = trial.user_attrs.get("val_delta")
    if own is None or objective is None or math.isclose(own, objective, rel_tol=1e-9, abs_tol=1e-12):
        return []
    return [f"Its run trained STL baselines of its own, with settings other than those of the study's STL reference "
            f"(its config.yaml has them): its test Δ and win above, its report and a search of best.yaml are against "
            f"that STL, and its validation Δ is {own:+.2f} there, not the objective's {objective:+.2f}."]


def summarize(study: optuna.Study, directory: Path, base: Config, multi: bool, shown: str) -> dict:
    """summary.md, trials.csv, best.yaml (and pareto.png) in the study folder; returns what they say."""
    trials = study.get_trials(deepcopy=False)
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    chosen = chosen_trial(study, multi)
    counts = ", ".join(f"{n} {s}" for s, n in states.items() if n)
    lines = [f"# mamo tune: study '{study.study_name}'", "", f"Storage: {shown}. Study folder: {directory}.", "",
             counted(len(trials), "trial") + (f": {counts}" if counts else "") + ".", ""]
    best_path = None
    if chosen is not None:
        own = study.metric_names == [OWN_OBJECTIVE]
        title = ("Pareto front (validation metrics)" if multi else "Best trials (your objective, higher is better)"
                 if own else "Best trials (objective: validation Δ vs STL, %)")
        lines += [f"## {title}", "", *trials_table(study, best_trials(study, multi), multi, directory), ""]
        tuned = _trial_config(chosen, base, directory)
        if tuned is None:
            foreign = ", ".join(sorted(chosen.params.keys() - SPACE.keys()))
            lines += [f"No best.yaml: trial {chosen.number} drew {foreign}, which no mamo setting holds; its "
                      "parameters are in the table above and in trials.csv.", ""]
        else:
            best_path = directory / "best.yaml"
            tuned.name = f"{base.name}-tuned"
            replace_atomically(best_path, lambda partial: dump_config(tuned, partial))
            # A caller's objective makes no run folder: "run folder ?" read as one lost.
            where = f", run folder {_where(chosen, directory)}" if run_folder(chosen, directory) else ""
            lines += [f"Best configuration: {best_path} (trial {chosen.number}{where}); run it with "
                      f"`{cli('search', best_path)}`.",
                      *_rerun_notes(tuned, base, chosen, "stl_val" in study.user_attrs),
                      *_reference_notes(chosen, directory), ""]
        if multi and 2 <= len(study.directions) <= 3:
            plot_pareto(study, directory / "pareto.png")
            lines += [f"Pareto scatter: {directory / 'pareto.png'}.", ""]
    else:
        lines += ["No trial completed yet; best.yaml is written once one does.", ""]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        lines += ["## Failed trials", ""]
        retries = {t.user_attrs[RETRY_OF]: t for t in trials if RETRY_OF in t.user_attrs}
        lines += [f"- trial {t.number}: {fail_reason(t)}" + (f"; its retry is trial {retries[t.number].number} "
                  f"({retries[t.number].state.name.lower()})" if t.number in retries else "") for t in failed]
        lines.append("")
    text = "\n".join(lines)
    write_text_atomically(directory / "summary.md", text)
    write_trials_csv(study, directory / "trials.csv")
    return {"study_dir": directory, "study": study.study_name, "states": states, "text": text,
            "best": None if chosen is None else chosen.number, "best_config": best_path}
