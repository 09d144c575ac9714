"""A study's home: its folder, its record in the storage, and the trials an earlier command left unfinished.

A study folder belongs to one study (``study-id.json`` names it and its storage's uid), keeps ``study.yaml`` as
a copy of the configuration the storage records, and holds the ``trial-NNNN`` folders. The storage record is
made once, by the command that starts the study, before any worker asks for a trial.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mamo.cache import owner_gone, process_owner
from mamo.config import Config, config_from_dict, dump_config, load_config
from mamo.data_plugins import plugin_code_digest, plugin_source, plugin_source_digest
from mamo.errors import MamoError
from mamo.runs import one_at_a_time
from mamo.tune_space import OWN_OBJECTIVE, SPACE, objective_metrics
from mamo.tune_storage import RETRY_OF, queue_retry
from mamo.tune_summary import NO_RECORD, STOPPED_EARLY, fail_reason
from mamo.tune_workers import COMMAND, OWNER, STOPPED, Tickets, TrialLine
from mamo.writes import replace_atomically, write_text_atomically

KILLED = "its command was killed before it finished (retried by the next command on the study)"
KILLED_EARLY = "its command was killed before the trial drew its parameters"
# Why a trial did not run to its end: stopped, killed, or no reason recorded (a kill on a shared database, which
# its heartbeat fails); its retry, or a new trial where it drew nothing, runs in its place.
INTERRUPTED = (STOPPED, STOPPED_EARLY, KILLED, KILLED_EARLY, NO_RECORD)

STUDY_ID = "study-id.json"  # the study whose trials the folder holds: {"study": name, "uid": the study's uid}


def stored_study(store: optuna.storages.RDBStorage | None, name: str) -> dict | None:
    """The study's user attributes in the storage (its config, uid, STL reference); None if it is not there."""
    if store is None:
        return None
    try:
        return store.get_study_user_attrs(store.get_study_id_from_name(name))
    except KeyError:
        return None


def folder_study(directory: Path) -> dict | None:
    """The study the folder was claimed by ({"study", "uid"}), from study-id.json; None for an unclaimed folder."""
    path = directory / STUDY_ID
    if not path.is_file():
        return None
    try:
        mark = json.loads(path.read_text(encoding="utf-8"))
        return {"study": str(mark["study"]), "uid": str(mark["uid"])}
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise MamoError(f"{path} cannot be read as the name of the folder's study ({type(exc).__name__}); pass "
                        "another --run-dir, or delete that file if you know which study the folder holds.") from exc


def check_folder(directory: Path, name: str, attrs: dict | None) -> None:
    """Refuses a folder that holds another study: that study's trial folders have the numbers this one's trials
    get (from 0 in each study), and study.yaml would be taken from whichever joined last."""
    mark = folder_study(directory)
    if mark is not None and mark["study"] != name:
        raise MamoError(f"{directory} holds study '{mark['study']}', not '{name}'; pass a new --run-dir for study "
                        f"'{name}', or --study {mark['study']} to continue that one.")
    if mark is not None and (attrs is None or attrs.get("uid") != mark["uid"]):
        raise MamoError(f"{directory} holds a study '{name}' of another storage (or one since deleted from this "
                        "storage); pass a new --run-dir, or the --storage that study lives in.")
    if mark is None and attrs is None and any(directory.glob("trial-[0-9]*")):
        # A study folder from before study-id.json: a new study's trial-0000 would collide with its trials.
        raise MamoError(f"{directory} holds trial folders of another study; pass a new --run-dir for study "
                        f"'{name}'.")


def study_config(name: str, config: Config, overrides: list[str] | tuple[str, ...], directory: Path,
                 attrs: dict | None) -> Config:
    """A new study tunes ``config``; joining one uses the configuration stored in the study, plus ``--set``."""
    path = directory / "study.yaml"
    stored = (attrs or {}).get("config")
    if stored is None:
        # Not in the storage yet: a study.yaml here is left from a start that failed on bad input; replace it.
        replace_atomically(path, lambda partial: dump_config(config, partial))
        return config
    # The storage is the record: study.yaml is its copy, whatever an edit or an earlier command left there.
    recorded = config_from_dict(stored, f"study '{name}'")
    replace_atomically(path, lambda partial: dump_config(recorded, partial))
    joined = load_config(str(path), overrides)
    _check_same_space(name, recorded, joined)
    if "stl_val" in attrs:
        _check_same_data(name, recorded, joined)
        _check_same_plugin(name, attrs, joined)
    # A note, on stderr as the other notes: stdout is the summary, which `> file` keeps alone.
    print(f"joining study '{name}': using the configuration it was created with ({path}); --set still applies",
          file=sys.stderr, flush=True)
    return joined


def _shown_setting(value: Any) -> str:
    """A tune key's value as --set writes it: [a, b] or null."""
    return "null" if value is None else "[" + ", ".join(str(v) for v in value) + "]"


def _check_same_space(name: str, recorded: Config, joined: Config) -> None:
    """Refuse a --set that changes what a joined study samples: Optuna cannot draw a categorical parameter from
    other choices than its earlier trials did (each retry recorded one more failed trial), and trials drawn
    from different ranges are not one study's to compare."""
    for key in SPACE:
        before, after = getattr(recorded.tune, key), getattr(joined.tune, key)
        if before != after:
            raise MamoError(f"--set tune.{key}={_shown_setting(after)} would change what study '{name}' samples "
                            f"(tune.{key} is {_shown_setting(before)} there); leave it out to continue the study, "
                            "or pass a new --run-dir (or --study) for a study of the new space.")


def _check_same_data(name: str, recorded: Config, joined: Config) -> None:
    """Refuse a --set that changes the data of a study whose objective compares with its stored STL reference:
    those metrics were measured on the study's validation split, so a trial validated on another split (another
    ``data.seed`` or ``data.val_size``, say) would be ranked by a meaningless Δ. ``data.root`` only says where the
    same files are."""
    before, after = dataclasses.asdict(recorded.data), dataclasses.asdict(joined.data)
    changed = sorted(key for key in before if key != "root" and before[key] != after[key])
    if changed:
        key = changed[0]
        raise MamoError(f"--set data.{key}={after[key]!r} would change the data of study '{name}' (data.{key} is "
                        f"{before[key]!r} there), whose trials are compared with an STL reference validated on "
                        "its data; leave it out to continue the study, or pass a new --run-dir (or --study) for a "
                        "study of the new data.")


def _check_same_plugin(name: str, attrs: dict, joined: Config) -> None:
    """Refuse to continue a study whose data plugin's source changed since it began: its STL reference was
    trained and validated on what the old source returned, so the trials would be ranked against another data's
    reference (a joining command retrained the STL on the new data, but the objective reads the stored one). Any
    edit of the code counts; one of comments or layout alone passes where the study recorded its code's digest
    (since 2026-11-26); studies recorded before any digest was kept pass."""
    recorded, current = attrs.get("plugin_source"), plugin_source_digest(joined.data.name)
    if recorded is None or current is None or recorded == current:
        return
    code = attrs.get("plugin_code")
    if code is not None and code == plugin_code_digest(joined.data.name):
        return
    raise MamoError(f"the data plugin {plugin_source(joined.data.name)} changed since study '{name}' began, whose "
                    "trials are compared with an STL reference trained and validated on what it returned then; undo "
                    "the edit to continue the study, or pass a new --run-dir (or --study) for a study of the new "
                    "data.")


def claim_folder(directory: Path, name: str, uid: str) -> None:
    """Marks the folder as the study's, once the study exists, so that another study is refused here; a start
    that failed on bad input marks nothing and leaves the folder to the corrected retry."""
    mark = {"study": name, "uid": uid}
    if folder_study(directory) != mark:
        write_text_atomically(directory / STUDY_ID, json.dumps(mark) + "\n")


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def check_objective(store: optuna.storages.RDBStorage, name: str, multi: bool, folder: Path | None,
                    fresh: str) -> None:
    """Refuses to join a stored study with the other kind of objective (one objective, or the Pareto front of
    ``--multi-objective``), which Optuna fixes when the study is made; checked before the reference trains, since
    :func:`open_study` could tell only after it (minutes of STL and HPS for a join with another --workers count).
    ``folder`` is the local study's folder, named in the sentence; ``fresh`` what makes a new study instead."""
    study = optuna.load_study(study_name=name, storage=store)
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    single = names in (["val_delta"], [OWN_OBJECTIVE]) or study.metric_names is None and len(names) == 1
    if single == (not multi):
        return
    where = f"'{name}'" + (f" in {folder}" if folder else "")
    if single:
        raise MamoError(f"study {where} optimises one objective, {names[0]} (it was started without "
                        f"--multi-objective); leave --multi-objective out to continue it, or pass {fresh} for a "
                        "multi-objective study.")
    raise MamoError(f"study {where} optimises the Pareto front of {_listed(names)} (it was started with "
                    f"--multi-objective); add --multi-objective to continue it, or pass {fresh} for a study of one "
                    "objective.")


def open_study(store: optuna.storages.RDBStorage, name: str, multi: bool, tasks: dict, config: Config,
               stl_val: dict | None, search: bool = True) -> optuna.Study:
    """Creates the study, or opens the stored one of that name, once before any worker starts; an existing study
    must have the same objectives (a caller's own single objective is named ``objective``, not ``val_delta``).
    (Named apart from optuna.create_study, which it calls.)"""
    targets = objective_metrics(tasks) if multi else [("val_delta" if search else OWN_OBJECTIVE, "", True)]
    names = [f"{task}.{metric}" if metric else task for task, metric, _ in targets]
    directions = ["maximize" if higher else "minimize" for *_, higher in targets]
    study = optuna.create_study(storage=store, study_name=name, directions=directions, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions or study.metric_names not in (None, names):
        raise MamoError(f"study '{name}' optimises {study.metric_names or len(study.directions)}, not {names}; pass "
                        "another --study, or the same objective (with or without --multi-objective) as before.")
    if study.metric_names is None:
        study.set_metric_names(names)
    if "config" not in study.user_attrs:
        study.set_user_attr("config", config.to_dict())
        if search and (digest := plugin_source_digest(config.data.name)) is not None:
            study.set_user_attr("plugin_source", digest)  # what the STL reference saw: see _check_same_plugin
            if (code := plugin_code_digest(config.data.name)) is not None:
                study.set_user_attr("plugin_code", code)
    if "uid" not in study.user_attrs:  # tells this study's folders from those of another one with its name
        study.set_user_attr("uid", uuid.uuid4().hex)
    if stl_val is not None and "stl_val" not in study.user_attrs:
        study.set_user_attr("stl_val", stl_val)
    return study


ORPHAN_SECONDS = 60.0  # a RUNNING trial without an owner this old was left by a command killed as it made it


def left_running(trial: FrozenTrial) -> bool:
    """Whether a RUNNING trial's command was killed: its owner (the process that runs it) is this process, whose
    earlier command has ended, or one that has exited on this machine. A trial whose owner lives, or runs on
    another machine sharing the folder (whose stopped heartbeat fails it after five minutes), is running;
    one without an owner (made a moment ago, before its objective started) only after a minute."""
    owner = trial.user_attrs.get(OWNER)
    if owner is None:
        started = trial.datetime_start
        return started is None or trial_age_seconds(started) > ORPHAN_SECONDS
    return owner == process_owner() or owner_gone(owner)


def trial_age_seconds(started: datetime.datetime, now: datetime.datetime | None = None) -> float:
    """Seconds since ``started``, a naive local time as Optuna records it, to ``now`` (an aware time; default:
    this moment), in real seconds across a change of the clocks: a trial made just before they go forward is
    not an hour older after it, and a local time they go back over (it happens twice) is read as the later
    instant, so a live trial is never taken for an orphan (an orphan made in that hour waits up to an hour)."""
    now = now or datetime.datetime.now(datetime.UTC)
    instant = max(started.replace(fold=fold).astimezone(datetime.UTC) for fold in (0, 1))
    return (now - instant).total_seconds()


def retry_interrupted(study: optuna.Study, log: TrialLine) -> None:
    """Queue a retry of every trial an earlier command left unfinished: RUNNING (its command was killed, see
    :func:`left_running`; not the trials of another command running on the study) or failed by Ctrl-C. The
    retry takes the same parameters and continues the trial's folder from its newest checkpoint. A trial killed
    before it drew its parameters computed nothing and is not retried; if it was itself a retry, the parameters
    queued for it are queued again. Only for a study in its own folder's
    SQLite: a shared database's running trials are left to the heartbeat (the command that stops a trial queues
    its retry itself, on any storage; one already retried is skipped here). Commands on the study folder take
    turns here (a lock on the folder): two that read the trials before either queued its retry retried a trial
    twice, and the later one crashed failing a trial the other had failed."""
    with one_at_a_time(log.log_path.parent):
        _retry_interrupted(study, log)


def _retry_interrupted(study: optuna.Study, log: TrialLine) -> None:
    trials = study.get_trials(deepcopy=False)
    killed = {t.number for t in trials if t.state == TrialState.RUNNING and left_running(t)}
    # A retry killed before it drew the parameters queued for it has none of its own and retries nothing: its
    # original's parameters are queued again, or they would never finish.
    empty = {t.number for t in trials if t.number in killed and not t.params}
    retried = {t.user_attrs.get(RETRY_OF) for t in trials if t.number not in empty}
    for trial in trials:
        number = trial.user_attrs.get(RETRY_OF)
        if trial.number in empty and number is not None and number not in retried and trials[number].params:
            queue_retry(study, number, trials[number].params)
            retried.add(number)
        stopped = trial.state == TrialState.FAIL and trial.user_attrs.get("fail_reason") == STOPPED
        # Queued before the kill is recorded: a command killed in between leaves a RUNNING trial to retry again.
        if (trial.number in killed or stopped) and trial.params and trial.number not in retried:
            queue_retry(study, trial.number, trial.params)
        if trial.number in killed:
            reason = KILLED if trial.params else KILLED_EARLY
            optuna.Trial(study, trial._trial_id).set_user_attr("fail_reason", reason)
            study.tell(trial.number, state=TrialState.FAIL)
            log.write(trial.number, f"failed: {reason}", trial.params, None)


def owed_trials(study: optuna.Study, tickets: Tickets) -> int:
    """How many of the trials a stopped command (a Ctrl-C, or a killed worker) was asked for it still owes: all of
    them, less those its workers ran to an end (complete, pruned, or failed by an error of their own). A trial
    stopped, killed or left running is owed (its retry runs first), and so is a ticket that a worker killed before
    it made a trial took. The command's trials are those carrying its mark, not those numbered from where it
    began: a retry that an earlier command queued is numbered before that, and another command on the study
    numbers trials among its own (a continuation stopped in such a retry owed one trial too few, a double Ctrl-C
    that SIGKILLed the workers two too few, and a killed worker's command counted the other's running trials)."""
    ended = sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get(COMMAND) == tickets.mark and (
        t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or t.state == TrialState.FAIL and fail_reason(t) not in INTERRUPTED))
    return max(0, tickets.asked - ended)
