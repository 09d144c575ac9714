"""The parts every training in a command shares: the :class:`Session` (config, data, device, log, baseline
cache), the checks before a run folder is made, the network and its trainer, training one network end to end
with its checkpoints, and saving the trained model. ``train``, ``search``, ``tune``, the baselines and the
benchmarks build on them."""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mamo.cache import BaselineCache
from mamo.checkpoint import EpochCheckpoint, load_checkpoint, restore_trainer
from mamo.config import Config, DirectionConfig, ModelConfig, TensionerConfig, TrainConfig
from mamo.data import LoadData, MultiTaskData, load_data, unused_data_note
from mamo.directions import METHOD_SETTINGS, THESIS_BASES, create_direction
from mamo.errors import EndedOnPurpose, MamoError, PluginNotFound, StopExplained, TrainingDiverged
from mamo.graph import build_hps_graph, graph_to_json
from mamo.model import MamoNet, compile_model, count_parameters
from mamo.model_checks import check_batch_of_one, check_precision
from mamo.runs import (
    RUNS_ROOT,
    RunLog,
    available_cores,
    counted,
    free_run_dir,
    new_run_dir,
    write_run_config,
)
from mamo.samples import unreachable_target_notes, untrained_target_notes
from mamo.spaces import SPACES, check_model_config, create_space, memory_failure
from mamo.step import TrainStep
from mamo.stops import output_reader_left
from mamo.trainer import (
    OPTIMIZER_SETTINGS,
    Callback,
    EpochLines,
    KeepBest,
    Trainer,
    check_train_config,
    make_optimizer,
    resolve_device,
)
from mamo.writes import replace_atomically, write_text_atomically

EQUAL = DirectionConfig(name="equal", tensioner=TensionerConfig(formulation="off"))
MODES = ("mtl", "stl")  # train.mode: what mamo.train.TRAIN_MODES trains


@dataclass
class Session:
    """What every training in one command shares: config, data, device, log and the baseline cache."""

    config: Config
    data: MultiTaskData
    device: torch.device
    log: RunLog
    cache: BaselineCache
    progress: bool = True


@dataclass
class Trained:
    model: MamoNet
    trainer: Trainer
    test: dict
    val: dict
    extra: dict = field(default_factory=dict)

    def result(self) -> dict:
        return {"tasks": self.test, "val": self.val, "params": count_parameters(self.model),
                "seconds_per_epoch": self.trainer.seconds_per_epoch}


def check_train_settings(config: Config) -> torch.device:
    """The train and model sections, checked before anything loads (train.mode, the numbers and names, the
    backbone's name and widths, the device); returns the device. The direction is checked by the callers
    that train with it (the baselines do not)."""
    if config.train.mode not in MODES:
        raise MamoError(f"unknown train.mode '{config.train.mode}'; use one of {', '.join(MODES)}.")
    check_train_config(config.train)
    check_model_config(config.model)
    return resolve_device(config.train.device)


def setting_notes(config: Config) -> list[str]:
    """What the run's log notes about its settings before it trains: unused ones, more threads than cores, a
    tensioner on a base the thesis does not tension."""
    cores = available_cores()
    threads = config.train.threads
    crowded = (f"note: train.threads = {threads} is more than the {counted(cores, 'core')} this process may use, so "
               f"torch's threads wait on each other (64 on 2 cores made an epoch 23 times slower, measured); set at "
               f"most {cores}." if threads is not None and threads > cores else None)
    tensioner = config.direction.tensioner
    # Eq 4.11's c_t = α·σ(·) + 1 − α is built for α in [0, 1] (the thesis sweeps that range).
    wide = (f"note: direction.tensioner.alpha = {tensioner.alpha:g} is above the thesis' range [0, 1]: under "
            f"'thesis' c_t is clipped at 0 unless σ > 1 − 1/α, so the pull mostly vanishes (α = 100 trained exactly "
            f"as α = 0, measured); under 'relative' a task's pull can reach past its own gradient."
            if tensioner.formulation != "off" and tensioner.alpha > 1 else None)
    base = config.direction.name
    # Set by a preset and kept through --set direction.name=..., the tensioner is easy to miss, and off the
    # min-norm bases it is a different method (bench logic3: `thesis` stalled equal, pcgrad and cagrad).
    wrapped = (f"note: direction '{base}' runs inside the '{tensioner.formulation}' tensioner (direction.tensioner), "
               f"which the thesis applies to {' and '.join(THESIS_BASES)}; on other bases it changes the method "
               f"(docs/directions.md, logic3); --set direction.tensioner.formulation=off runs {base} alone."
               if tensioner.formulation != "off" and base not in THESIS_BASES else None)
    return [*unused_settings_notes(config), *(note for note in (crowded, wide, wrapped) if note)]


def start_notes(config: Config, data: MultiTaskData, device: torch.device) -> list[str]:
    """What a run's log notes before it trains: :func:`setting_notes`, CUDA graphs asked for off CUDA, the data's
    targets no task trains and those its heads cannot reach (:mod:`mamo.samples`)."""
    graphs = (f"note: train.cuda_graphs is on, but the run trains on {device}, which has no CUDA graphs; the "
              "setting changes nothing here." if config.train.cuda_graphs and device.type != "cuda" else None)
    return [*setting_notes(config), *([graphs] if graphs else []), *untrained_target_notes(data),
            *unreachable_target_notes(data)]


def unused_settings_notes(config: Config) -> list[str]:
    """Notes naming settings the run's parts do not read: the data's (:func:`mamo.data.unused_data_note`), and
    model, train and direction settings changed from their defaults that only another backbone family, optimizer or
    direction reads.

    Changed, not given: once the config is built a default cannot be told from a user's value, and a value equal
    to the default changes nothing. Notes, not refusals: one preset serves several backbones and optimizers
    (``--set model.backbone=lenet`` on a preset written for the mlp)."""
    model, train, direction = config.model, config.train, config.direction
    family = model.backbone.partition(":")[0]
    notes = [
        unused_data_note(config.data),
        _unused_note(f"backbone '{model.backbone}'", "model", model, ModelConfig(), _other_families_reads(family)),
        _unused_note(f"optimizer '{train.optimizer}'", "train", train, TrainConfig(),
                     {owner: keys for owner, keys in OPTIMIZER_SETTINGS.items() if owner != train.optimizer}),
        _unused_note(f"direction '{direction.name}'", "direction", direction, DirectionConfig(),
                     {owner: keys for owner, keys in METHOD_SETTINGS.items() if owner != direction.name}),
    ]
    return [note for note in notes if note]


def _other_families_reads(family: str) -> dict[str, tuple[str, ...]]:
    """The model settings that only other backbone families read, under their names ("mlp or cnn" for settings
    read alike): the mlp and the cnn both read hidden and activation, so each was told the other's were unused."""
    own = set(SPACES[family].reads) if family in SPACES else set()
    owners: dict[tuple[str, ...], list[str]] = {}
    for owner, space in SPACES.items():
        keys = tuple(key for key in space.reads if key not in own)
        if owner != family and keys:
            owners.setdefault(keys, []).append(owner)
    return {" or ".join(names): keys for keys, names in owners.items()}


def _unused_note(subject: str, section: str, values: object, defaults: object,
                 others: dict[str, tuple[str, ...]]) -> str | None:
    changed = {owner: [f"{section}.{key}" for key in keys if getattr(values, key) != getattr(defaults, key)]
               for owner, keys in others.items()}
    if not any(changed.values()):
        return None
    unused = " or ".join(f"{' or '.join(keys)} ({owner} only)" for owner, keys in changed.items() if keys)
    effect = "it has" if sum(map(len, changed.values())) == 1 else "they have"
    return f"note: {subject} does not use {unused}, so {effect} no effect."


def make_current(device: torch.device) -> None:
    """Make a numbered GPU the current one: pinned host memory and new CUDA contexts go to the current device,
    so without this ``cuda:1`` would also set up GPU 0."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def open_session(
    config: Config, run_dir: Path | None, progress: bool = True, quiet: bool = False, cache_root: Path | None = None,
    loader: LoadData | None = None,
) -> Session:
    """Check the train settings, load the data (with ``loader``, default :func:`~mamo.data.load_data`; a
    :class:`~mamo.data.DataMemo` reuses it) and pick the device once; baselines are cached under ``cache_root``
    (default runs/.baselines beside the run folder)."""
    device = check_train_settings(config)
    make_current(device)
    log = RunLog(run_dir / "log.txt" if run_dir else None, quiet=quiet)
    try:
        data = (loader or load_data)(config.data, progress)
    except PluginNotFound as exc:
        if run_dir is None:
            raise
        # A resume cannot change data.name (its checkpoints were computed with it), so "fix the path" misled.
        where = "" if Path(exc.target).is_absolute() else f" from {Path.cwd()}"
        raise MamoError(f"data plugin file '{exc.target}' of {run_dir} was not found{where}; run --resume from the "
                        "folder the run started in, or put the plugin back where data.name says.") from exc
    if run_dir is not None:  # otherwise open_run notes them once it has a folder
        for note in start_notes(config, data, device):
            log(note)
    if cache_root is None:
        cache_root = (run_dir.parent if run_dir else RUNS_ROOT) / ".baselines"
    return Session(config, data, device, log, BaselineCache(Path(cache_root)), progress)


def keep_resume_settings(session: Session, directory: Path, command: str, settings: Sequence[str],
                         starts_over: bool) -> None:
    """Write a resumed run's ``--set`` settings into its config.yaml (for the next resume and the printed
    continue line, which name no --set) once they are known to work: the session opened with them (device,
    threads, data.root), and a run that starts over without a checkpoint reads ``model.weights``, so its
    network is built first, as a new run's is. A refused setting written there failed every later resume."""
    if not settings:
        return
    if starts_over:
        build_network(session)
    write_run_config(directory, command, session.config)


def build_network(session: Session, task_names: list[str] | None = None, initial_weights: bool = True) -> MamoNet:
    """The HPS network of the configured backbone for ``task_names`` (default: every task). Without
    ``initial_weights``, ``model.weights`` is not read: a network about to take a checkpoint's weights does not
    need the file (a run resumed on a machine where it is gone)."""
    tasks = session.data.tasks
    chosen = {name: tasks[name] for name in (task_names or list(tasks))}
    model_config = session.config.model if initial_weights else dataclasses.replace(session.config.model, weights=None)
    space = create_space(model_config, session.data.input_shape)
    return compile_model(build_hps_graph(space, chosen), seed=session.config.train.seed, device=session.device)


def make_trainer(
    session: Session,
    model: MamoNet,
    direction: DirectionConfig,
    callbacks: list[Callback] | None = None,
    description: str = "train",
) -> Trainer:
    """A trainer of ``model`` on the session's data with ``direction`` and the config's optimizer and step
    settings, its batch order and the direction's randomness seeded from ``train.seed``."""
    train = session.config.train
    generator = torch.Generator().manual_seed(train.seed)
    step = TrainStep(
        model,
        create_direction(direction, generator=torch.Generator().manual_seed(train.seed + 1)),
        make_optimizer(model, train),
        gradients=train.gradients,
        precision=train.precision,
        gradient_path=train.gradient_path,
        gradient_layout=train.gradient_layout,
        cuda_graphs=train.cuda_graphs,
    )
    # Without progress bars the epoch lines are what the terminal shows; with them, only the log file keeps them.
    lines = EpochLines(session.log.record if session.progress else session.log)
    return Trainer(model, step, session.data.train, session.data.val, train.batch_size, session.device,
                   generator, [lines, *(callbacks or [])], progress=session.progress, description=description)


def train_network(
    session: Session,
    epochs: int,
    direction: DirectionConfig,
    task_names: list[str] | None = None,
    description: str = "train",
    callbacks: list[Callback] | None = None,
    checkpoint: Path | None = None,
    discard_damaged: bool = False,
    state: dict | None = None,
    run_config: dict | None = None,
) -> Trained:
    """Train one network for ``epochs``, keep its best-by-validation weights, test it. With ``checkpoint``,
    the training is saved there after an epoch at most every ``train.checkpoint_seconds`` and, when the file
    exists already, continued from it (a damaged one is an error, or with ``discard_damaged`` ignored);
    ``state`` is that file's content when the caller has read it already, ``run_config`` the run's config the
    checkpoints record."""
    if state is None and checkpoint is not None:
        state = _read_checkpoint(session, checkpoint, discard_damaged)
    model = build_network(session, task_names, initial_weights=state is None)
    best = KeepBest()
    watchers = list(callbacks or [])
    every = session.config.train.checkpoint_seconds
    saver = [EpochCheckpoint(checkpoint, best, every, run_config)] if checkpoint is not None else []
    # The saver last, as in a search: what the watchers record of an epoch (TensorBoard's scalars) is written
    # before the checkpoint a resume starts after.
    trainer = make_trainer(session, model, direction, [best, *watchers, *saver], description)
    if state is not None:
        restore_trainer(trainer, state, session.device)
        best.load_state_dict(state["best"])
        session.log(f"resumed after epoch {trainer.epoch} of {epochs} from {checkpoint}")
        for callback in watchers:
            callback.on_resume(trainer)
    for callback in watchers:
        callback.on_phase_start(description, model)
    trainer.fit(epochs - trainer.epoch, done=trainer.epoch)
    best.restore(model)
    return Trained(model, trainer, trainer.evaluate(session.data.test, "test"), trainer.evaluate(session.data.val),
                   {"best_epoch": best.best_epoch})


def _read_checkpoint(session: Session, path: Path, discard_damaged: bool) -> dict | None:
    try:
        return load_checkpoint(path)
    except FileNotFoundError:  # none, or one a process sharing the baseline cache removed after an exists()
        return None
    except MamoError:
        if not discard_damaged:
            raise
        session.log(f"{path} is damaged; training from the start")
        return None


def save_model(run_dir: Path, model: MamoNet) -> None:
    """The architecture (node-link JSON) and its weights (safetensors), which together rebuild the model, and
    the architecture as GraphML and DOT for graph tools."""
    from safetensors.torch import save

    from mamo.export import write_dot, write_graphml

    write_text_atomically(run_dir / "architecture.json", graph_to_json(model.graph))
    write_graphml(model, run_dir / "architecture.graphml")
    write_dot(model, run_dir / "architecture.dot")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # As bytes through Python's own file: safetensors' save_file creates the file readable by its owner only
    # (0600), unlike every other file of the run folder.
    replace_atomically(run_dir / "weights.safetensors", lambda tmp: tmp.write_bytes(save(state)), durable=True)


def open_run(
    config: Config, run_dir: str | Path | None, command: str, progress: bool = True, quiet: bool = False,
    cache_root: Path | None = None, check_data: Callable[[MultiTaskData], None] | None = None,
    held: contextlib.ExitStack | None = None, loader: LoadData | None = None,
) -> tuple[Session, Path]:
    """Check every input (data and what ``check_data`` asks of it, backbone, direction, optimizer) first, then
    create the run folder, so bad input never leaves a folder behind that would block the corrected retry; its
    lock goes into ``held`` (:func:`mamo.runs.new_run_dir`)."""
    path = free_run_dir(run_dir, config, command)
    session = open_session(config, None, progress, quiet, cache_root or path.parent / ".baselines", loader)
    if check_data is not None:
        check_data(session.data)
    model = build_network(session)
    check_precision(model, config.train.precision, session.device)
    check_batch_of_one(model, config.train.batch_size, len(session.data.train), session.device)
    create_direction(config.direction)
    make_optimizer(model, config.train)
    directory = new_run_dir(run_dir, config, command, path, held)
    session.log.path = directory / "log.txt"
    session.log(f"run folder: {directory}")
    for note in start_notes(config, session.data, session.device):
        session.log(note)
    return session, directory


@contextlib.contextmanager
def logging_stops(session: Session, how_to_continue: str) -> Iterator[None]:
    """Inside: a Ctrl-C logs how to continue, and a MamoError (a diverged loss, a full disk) goes into the run's
    log.txt before it propagates, so the folder keeps the reason; so does an OSError or an allocation failure,
    and any other exception with its traceback (a bug: the folder then holds what a bug report needs)."""
    try:
        yield
    except KeyboardInterrupt:
        every = session.config.train.checkpoint_seconds
        # What a resume starts from, so that a stop after unsaved epochs does not look like losing nothing.
        kept = "every finished epoch is checkpointed" if every == 0 else (
            f"checkpoints are at most {every:g} s apart (train.checkpoint_seconds), so up to that much of the "
            "newest epochs is trained again")
        session.log(f"stopped ({kept}); continue with: {how_to_continue}")
        raise StopExplained from None
    except MamoError as exc:
        if not (session.log.quiet or isinstance(exc, TrainingDiverged) or "--resume" in str(exc)):
            # Found mid-run (a bad label file read lazily): the folder keeps what finished, and the terminal
            # must say so, as a stop's line does; a diverged run would diverge again from its checkpoint, and a
            # quiet run (a tune trial, an ablation's variant) is continued by the command that runs it.
            exc.args = (f"{str(exc).rstrip('.')}, then continue with: {how_to_continue}.",)
        session.log.record(f"error: {exc}")
        raise
    except EndedOnPurpose as exc:
        session.log.record(str(exc))
        raise
    except BrokenPipeError as exc:
        if not output_reader_left():  # a plugin's socket, say: recorded as any other OSError below
            _record_failure(session, exc, how_to_continue)
            raise
        # The reader of its output left (`| head`): after the run finished (its report printed last) nothing is
        # left to resume, which the line said all the same.
        finished = session.log.path is not None and (session.log.path.parent / "metrics.json").is_file()
        session.log.record("its output's reader left (BrokenPipeError: a pipe such as | head closed)" + (
            " after it had finished" if finished else f"; its checkpoints are kept for: {how_to_continue}"))
        raise
    except Exception as exc:
        _record_failure(session, exc, how_to_continue)
        raise


def _record_failure(session: Session, exc: Exception, how_to_continue: str) -> None:
    """Into log.txt: why the run stopped, and for a bug its traceback (called while ``exc`` is handled)."""
    if isinstance(exc, OSError) or memory_failure(exc):  # the machine's limits (a full disk, memory): no bug
        session.log.record(f"stopped by {type(exc).__name__}: {exc}; its checkpoints are kept for: "
                           f"{how_to_continue}")
    else:
        session.log.record(f"crashed with {type(exc).__name__}, a bug in mamo (please report it with this "
                           f"log.txt); its checkpoints are kept for: {how_to_continue}\n"
                           f"{traceback.format_exc().rstrip()}")
