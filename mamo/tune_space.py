"""The tuning search space: which config settings a study may sample, how, and how their ranges are checked.

Each entry of :data:`SPACE` names a ``tune.<name>`` preset key, the config path a sampled value is written to,
the Optuna ``suggest_*`` call and a check that fails before the study starts on a range no trial could use;
:func:`check_space_ends` runs a search's own checks on the space's two ends, and :func:`inert_keys_note` names
tuned keys no trial reads. :class:`TrialSeededTPE` is the sampler every worker draws with.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from mamo.config import FLOAT32_MAX, MAX_WINDOW, Config, TuneConfig, config_from_dict
from mamo.conflicts import parse_threshold
from mamo.errors import MamoError
from mamo.graph import MODULE_NAMES
from mamo.tasks import TaskSpec
from mamo.tune_storage import RETRY_OF


@dataclass(frozen=True)
class Param:
    """One tunable setting: where it lives in the config, how Optuna samples it, how its range is checked."""

    path: tuple[str, ...]
    suggest: Callable[[optuna.Trial, str, list], Any]
    check: Callable[[str, list], None]


def _range(minimum: float = 0, positive: bool = False, maximum: float = math.inf) -> Callable[[str, list], None]:
    """[low, high] of finite numbers with ``minimum`` ≤ low ≤ high ≤ ``maximum`` (0 < low when ``positive``). An
    infinite end (YAML's .inf) would pass the order checks and fail later naming the setting it lands on, not
    tune.<name>."""
    def check(name: str, value: list) -> None:
        if (len(value) != 2 or not all(math.isfinite(v) for v in value) or value[0] > value[1]
                or not (value[0] > 0 if positive else value[0] >= minimum) or value[1] > maximum):
            need = "0 < low ≤ high" if positive else f"{minimum} ≤ low ≤ high"
            need += "" if not math.isfinite(maximum) else f" ≤ {maximum:,}" if maximum < 1e15 else f" ≤ {maximum:.4g}"
            raise MamoError(f"tune.{name} must be a range [low, high] of finite numbers with {need}, got {value}; "
                            "fix it in the preset or --set.")
    return check


def _choices(valid: Callable[[str], bool], hint: str) -> Callable[[str, list], None]:
    def check(name: str, value: list) -> None:
        bad = [v for v in value if not valid(v)]
        if not value or bad:
            raise MamoError(f"tune.{name} must be a non-empty list of {hint}, got {value}; "
                            "fix it in the preset or --set.")
    return check


def _is_threshold(text: str) -> bool:
    try:
        parse_threshold(text)
    except MamoError:
        return False
    return True


def _member_of(table: str, what: str) -> Callable[[str, list], None]:
    """Every choice must be a key of ``mamo.directions.<table>`` (imported when checked: it imports torch), the
    valid keys named in the error, so the hint never lags the table."""
    def check(name: str, value: list) -> None:
        keys = list(getattr(importlib.import_module("mamo.directions"), table))
        _choices(lambda choice: choice in keys, f"{what} ({', '.join(keys)})")(name, value)
    return check


SPACE: dict[str, Param] = {
    "T": Param(("direction", "tensioner", "T"), lambda t, n, r: t.suggest_int(n, r[0], r[1]),
               _range(minimum=1, maximum=MAX_WINDOW)),
    "alpha": Param(("direction", "tensioner", "alpha"), lambda t, n, r: t.suggest_float(n, r[0], r[1]), _range()),
    "rounds": Param(("search", "rounds"), lambda t, n, r: t.suggest_int(n, r[0], r[1]), _range()),
    "lr": Param(("train", "lr"), lambda t, n, r: t.suggest_float(n, r[0], r[1], log=True),
                _range(positive=True, maximum=FLOAT32_MAX)),
    "threshold": Param(("search", "threshold"), lambda t, n, c: t.suggest_categorical(n, list(c)),
                       _choices(_is_threshold, "thresholds (global, layer, topk:K)")),
    "direction": Param(("direction", "name"), lambda t, n, c: t.suggest_categorical(n, list(c)),
                       _member_of("DIRECTIONS", "direction names")),
    "formulation": Param(("direction", "tensioner", "formulation"), lambda t, n, c: t.suggest_categorical(n, list(c)),
                         _member_of("TENSIONER_FORMULATIONS", "tensioner formulations")),
    "normalization": Param(("direction", "normalization"), lambda t, n, c: t.suggest_categorical(n, list(c)),
                           _member_of("NORMALIZERS", "mgda normalisations")),
    "modules": Param(("search", "modules"), lambda t, n, c: t.suggest_categorical(n, list(c)),
                     _choices(MODULE_NAMES.__contains__, f"module kinds ({', '.join(MODULE_NAMES)})")),
}

PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3),
    # Prunes below the 25th percentile of finished trials: Optuna keeps the given top percentile, so 75.
    "percentile": lambda: optuna.pruners.PercentilePruner(75.0, n_startup_trials=3),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
    "none": optuna.pruners.NopPruner,
}


def check_space(tune: TuneConfig) -> None:
    """Fail before the study starts on a range or choice no trial could use."""
    for name, param in SPACE.items():
        if getattr(tune, name) is not None:
            param.check(name, getattr(tune, name))
    if tune.pruner not in PRUNERS:
        raise MamoError(f"unknown tune.pruner '{tune.pruner}'; use one of {', '.join(PRUNERS)}.")


def apply_params(config: Config, params: dict[str, Any]) -> Config:
    """``config`` with each sampled parameter written where :data:`SPACE` says it lives."""
    raw = config.to_dict()
    for name, value in params.items():
        *parents, key = SPACE[name].path
        section = raw
        for part in parents:
            section = section[part]
        section[key] = value
    return config_from_dict(raw, "the tuned parameters")


def suggest_config(trial: optuna.Trial, config: Config) -> Config:
    tune = config.tune
    params = {name: p.suggest(trial, name, getattr(tune, name)) for name, p in SPACE.items()
              if getattr(tune, name) is not None}
    return apply_params(config, params)


OWN_OBJECTIVE = "objective"  # the metric name of a single-objective study whose trials run a caller's objective


def objective_metrics(tasks: dict[str, TaskSpec]) -> list[tuple[str, str, bool]]:
    """The multi-objective targets: each task's main (first) metric and whether higher is better."""
    return [(name, spec.metrics[0].name, spec.metrics[0].higher_is_better) for name, spec in tasks.items()]


def trial_folder(number: int) -> str:
    return f"trial-{number:04d}"


def check_space_ends(config: Config) -> None:
    """What a search checks before it makes its folder, on two trials' settings: every tuned key at its low end
    (first choice), then every one at its high end (last choice). A setting that fails there fails a share of
    the trials, so it is one sentence now rather than a study of failed trials."""
    from mamo.directions import create_direction
    from mamo.search_plan import check_search_config
    from mamo.session import check_train_settings

    tuned = {name: getattr(config.tune, name) for name in SPACE if getattr(config.tune, name) is not None}
    for end in (0, -1):
        probe = apply_params(config, {name: values[end] for name, values in tuned.items()})
        check_search_config(probe, rounds_setting="tune.rounds' upper end" if config.tune.rounds else "search.rounds")
        check_train_settings(probe)
        create_direction(probe.direction)


def inert_keys_note(config: Config) -> str | None:
    """A note when the study tunes what no trial uses: the tensioner's T or α while every trial runs without it,
    MGDA's gradient normalisation while no trial runs MGDA. Those draws change nothing, and trials that differ
    only in them repeat one search."""
    tune, direction = config.tune, config.direction
    notes = []
    inert = [key for key, value in (("tune.T", tune.T), ("tune.alpha", tune.alpha)) if value]
    if inert and direction.tensioner.formulation == "off" and not any(
            formulation != "off" for formulation in tune.formulation or []):
        notes.append(f"note: direction.tensioner.formulation is off and not tuned, so {' and '.join(inert)} change "
                     f"nothing in the trials; set {' and '.join(f'{key}=null' for key in inert)}, or tune a "
                     "formulation (e.g. --set 'tune.formulation=[off, thesis]').")
    if tune.normalization and "mgda" not in (tune.direction or [direction.name]):
        notes.append(f"note: no trial runs mgda (direction.name is {direction.name}"
                     f"{', and tune.direction leaves it out' if tune.direction else ''}), so tune.normalization "
                     "changes nothing in the trials; set tune.normalization=null, or tune mgda among the directions.")
    return "\n".join(notes) or None


def draw_index(study: optuna.Study, trial: FrozenTrial) -> int:
    """How many of the study's earlier trials drew parameters or are about to: retries and trials killed before
    they drew are not counted, so a stop leaves later draws as an uninterrupted study's; trials still running
    are, so two commands' trials never share an index."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.number < trial.number and RETRY_OF not in t.user_attrs
               and not (t.state == TrialState.FAIL and not t.params))


class TrialSeededTPE(optuna.samplers.TPESampler):
    """TPE whose draws for a trial follow from ``seed`` and the trial's :func:`draw_index` alone, not from the
    draws one process made before: one command reproduces a local study, while commands and workers sharing it
    draw apart (with one sampler seed per process they drew the same parameters twice). ``seed=None``: unseeded."""

    def __init__(self, seed: int | None):
        super().__init__(seed=seed)
        self._study_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        super().before_trial(study, trial)
        if self._study_seed is not None:
            # Mixed, not added: MT19937's first draws for nearby seeds can be close (seeds 0 and 3: 0.549, 0.551).
            seed = int(np.random.SeedSequence([self._study_seed, draw_index(study, trial)]).generate_state(1)[0])
            # The two generators TPESampler.reseed_rng reseeds (from the OS's entropy; here from the seed).
            self._rng.rng.seed(seed)
            self._random_sampler._rng.rng.seed(seed)
