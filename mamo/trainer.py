"""A short generic trainer: epochs of steps, validation, callbacks, and the settings it runs with (optimizers,
device, threads, the bounds of ``train.*``). Nothing here knows about descent methods, conflicts or TensorBoard.

In the manner of minGPT's trainer: the step (:class:`mamo.step.TrainStep`) owns the method, callbacks own
everything that watches training (conflict statistics, TensorBoard, best-checkpointing), and the trainer
only runs the loop, shows a progress bar and evaluates.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from mamo.config import FLOAT32_MAX, TrainConfig
from mamo.data import batches_per_epoch, evaluation_batch_size, iterate_batches
from mamo.dense import NoTargets
from mamo.directions import Tensioner
from mamo.errors import MamoError, TrainingDiverged
from mamo.model import MamoNet
from mamo.runs import format_duration
from mamo.scoring import MetricAccumulator
from mamo.step import StepResult, TrainStep, check_step_settings
from mamo.stops import STOP_REQUESTED

if TYPE_CHECKING:
    from mamo.search_phases import RoundRecord

Metrics = dict[str, dict[str, float]]

OPTIMIZERS: dict[str, Callable[[list, TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
}
# The train settings only some optimizers read (mamo.session notes them where another optimizer runs).
OPTIMIZER_SETTINGS: dict[str, tuple[str, ...]] = {"sgd": ("momentum",)}


MAX_THREADS = 1024  # train.threads and bench --threads
FLOAT32_OVERFLOW = "cannot be converted to type float without overflow"  # torch's words for a scalar too large

# train.KEY -> (is the value acceptable, what it must be); checked before any data loads or folder is made.
TRAIN_BOUNDS: dict[str, tuple[Callable[[float], bool], str]] = {
    "epochs": (lambda v: v >= 1, "an integer ≥ 1"),
    "batch_size": (lambda v: v >= 1, "an integer ≥ 1"),
    # The optimizers pass lr and weight decay through float32 on the way into the update: a larger one crashed.
    "lr": (lambda v: 0 < v <= FLOAT32_MAX, f"a number in (0, {FLOAT32_MAX:.4g}]"),
    "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: 0 <= v <= FLOAT32_MAX, f"a number in [0, {FLOAT32_MAX:.4g}]"),
    "checkpoint_seconds": (lambda v: math.isfinite(v) and v >= 0, "a finite number ≥ 0"),
    # torch's generators take 64-bit seeds, and seed + 1 seeds the direction's own generator.
    "seed": (lambda v: -(2**63) <= v < 2**63 - 1, "an integer in [-2**63, 2**63 - 1)"),
    # More threads than the system gives a process crashed in torch's pool ("can't start new thread").
    "threads": (lambda v: v is None or 1 <= v <= MAX_THREADS, f"an integer in [1, {MAX_THREADS}] or null (torch's "
                "default)"),
}


# The start of what torch's batch norm raises in training on one value per channel.
ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel when training"


def check_train_config(config: TrainConfig) -> None:
    """One sentence for a bad training setting before anything loads, instead of a traceback once training
    starts (or, for ``epochs=0``, silently no training)."""
    for key, (acceptable, wanted) in TRAIN_BOUNDS.items():
        value = getattr(config, key)
        if not acceptable(value):
            default = getattr(TrainConfig, key)
            raise MamoError(f"train.{key} must be {wanted}, got {value!r}; set e.g. train.{key}="
                            f"{'null' if default is None else default}.")
    check_step_settings(config.gradients, config.precision, config.gradient_path, config.gradient_layout)
    _check_optimizer_name(config.optimizer)


def _check_optimizer_name(name: str) -> None:
    if name not in OPTIMIZERS:
        raise MamoError(f"unknown optimizer '{name}' (train.optimizer); use one of {', '.join(OPTIMIZERS)}.")


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    _check_optimizer_name(config.optimizer)
    return OPTIMIZERS[config.optimizer](list(model.parameters()), config)


def add_new_parameters(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> int:
    """Put parameters the optimizer does not hold yet into a new group; old ones keep their state."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = [p for p in model.parameters() if id(p) not in held]
    if new:
        defaults = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.add_param_group({"params": new, **defaults})
    return len(new)


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads at ``count`` inside (``train.threads``; None leaves them), as they were after: results
    on a CPU depend slightly on the thread count, so a run that sets it repeats on any machine."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count is not None:
            torch.set_num_threads(before)


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; ``option`` is what errors name."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MamoError(f"unknown device '{name}' ({option}); use auto, cpu, cuda or cuda:N.") from exc
    if device.type not in ("cpu", "cuda"):  # torch names more (meta, mps, xla, ...); mamo trains on these two
        raise MamoError(f"{option} '{name}' is not a device mamo trains on; use auto, cpu, cuda or cuda:N.")
    if device.type == "cpu" and device.index not in (None, 0):  # torch takes cpu:1 and runs on the one CPU
        raise MamoError(f"{option} '{name}' names a CPU by number, but the CPU is one device; use cpu (and "
                        "train.threads for how many cores).")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MamoError(f"{option} is '{name}' but no CUDA device is visible; use auto or cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise MamoError(f"{option} is '{name}' but only {count} CUDA device(s) are visible; use cuda:0 to "
                        f"cuda:{count - 1}.")
    return device


class Callback:
    """Hooks the trainer, the search and the ``train`` command call; override what you need.

    ``on_step`` and ``on_epoch_end`` come from :class:`Trainer`; ``on_phase_start`` and ``on_round_end`` from
    the search's phases (:func:`mamo.search_phases.run_phases`; ``on_phase_start`` also from
    :func:`mamo.session.train_network`); ``on_resume``, ``on_rounds_restored`` and ``on_run_end`` from
    :func:`mamo.search.run_search` and the ``train`` command. One protocol for both, so that one logger
    watches any run.
    """

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, metrics: Metrics) -> None:
        pass

    def on_resume(self, trainer: Trainer) -> None:
        """``trainer`` was restored from a checkpoint: the steps after ``trainer.global_step`` run again."""

    def on_phase_start(self, phase: str, model: MamoNet) -> None:
        """A training phase begins: ``pretrain``, ``round1``.., ``final`` (search), ``train``, or ``stl <task>``
        for each network of ``train.mode=stl``."""

    def on_round_end(self, record: RoundRecord) -> None:
        """A detection round ended with ``record``. Called before the round's checkpoint, which a resume starts
        after: keep what the round needs recorded before returning."""

    def on_rounds_restored(self, rounds: list[dict]) -> None:
        """A resumed search's rounds before its checkpoint (metrics.json's ``rounds`` records, with ``val``),
        which will not end again: a callback that decides on them (a pruner) sees them here."""

    def on_run_end(self, summary: dict) -> None:
        """The run finished; ``summary`` is what metrics.json holds."""


def selection_score(metrics: Metrics, reference: Metrics) -> float:
    """Mean over tasks of validation loss relative to ``reference`` (lower is better); scale-free across tasks."""
    ratios = [metrics[t]["loss"] / max(reference[t]["loss"], 1e-12) for t in metrics]
    return sum(ratios) / len(ratios)


class KeepBest(Callback):
    """Keeps the weights of the epoch with the best :func:`selection_score` on the validation split."""

    def __init__(self):
        self.reference: Metrics | None = None
        self.best_score = float("inf")
        self.best_state: dict | None = None
        self.best_epoch = -1

    def on_epoch_end(self, trainer: Trainer, metrics: Metrics) -> None:
        # A NaN validation loss is never the best, and never the reference: every later ratio would be NaN too.
        if self.reference is None and all(math.isfinite(m["loss"]) for m in metrics.values()):
            self.reference = metrics
        if self.reference is None:
            return
        score = selection_score(metrics, self.reference)
        if math.isfinite(score) and score <= self.best_score:
            self.best_score, self.best_epoch = score, trainer.epoch
            self.best_state = copy.deepcopy(trainer.model.state_dict())

    def restore(self, model: torch.nn.Module) -> None:
        if self.best_state is not None and set(self.best_state) == set(model.state_dict()):
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {"reference": self.reference, "best_score": self.best_score, "best_state": self.best_state,
                "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.reference, self.best_score = state["reference"], state["best_score"]
        self.best_state, self.best_epoch = state["best_state"], state["best_epoch"]


def epoch_line(trainer: Trainer, metrics: Metrics) -> str:
    """The epoch just finished as one line: phase, epoch of the phase, each task's validation loss and main
    metric, the epoch's wall time and, from the mean so far, the time the phase has left."""
    done, total = trainer.phase_epochs
    first_epoch, started = trainer.fit_start
    this_fit = trainer.epoch - first_epoch
    ran = done + this_fit
    # Wall time, not the history's training seconds: what is left includes validation and checkpoints too.
    per_epoch = (time.perf_counter() - started) / max(this_fit, 1)
    scores = []
    for task, values in metrics.items():
        main = trainer.model.tasks[task].metrics[0].name  # the spec's first chosen metric, or its type's first
        shown = [("loss", values["loss"]), (main, values[main])]
        scores.append(f"{task} " + " ".join(f"{name} {value:.4g}" for name, value in shown))
    line = f"{trainer.description} epoch {ran}/{total}: val {', '.join(scores)}; {format_duration(per_epoch)}/epoch"
    if ran < total:
        line += f", about {format_duration(per_epoch * (total - ran))} left in this phase"
    return line


class EpochLines(Callback):
    """Writes :func:`epoch_line` after every epoch through ``write`` (the run's log: the only sign of life of a
    run without progress bars, and a record of how it went)."""

    def __init__(self, write: Callable[[str], None]):
        self.write = write

    def on_epoch_end(self, trainer: Trainer, metrics: Metrics) -> None:
        self.write(epoch_line(trainer, metrics))


class Trainer:
    """Runs epochs of ``step`` over ``train_set``, validates on ``val_set`` after each, calls callbacks."""

    def __init__(
        self,
        model: MamoNet,
        step: TrainStep,
        train_set: Dataset,
        val_set: Dataset,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator,
        callbacks: list[Callback] | None = None,
        progress: bool = True,
        description: str = "train",
    ):
        self.model, self.step = model, step
        self.train_set, self.val_set = train_set, val_set
        self.batch_size, self.device, self.generator = batch_size, device, generator
        self.callbacks = list(callbacks or [])
        self.progress, self.description = progress, description
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        # Set by fit: (epochs of the phase done before it, the phase's epochs), (first epoch, start time).
        self.phase_epochs = (0, 0)
        self.fit_start = (0, time.perf_counter())

    def _to_device(self, x: torch.Tensor, targets: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._move(x), {t: self._move(y) for t, y in targets.items()}

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        # Only a CPU tensor can be pinned (a plugin may hand out tensors already on the GPU), and a pinned one
        # need not be copied again.
        if self.device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _step(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> StepResult:
        try:
            return self.step(*self._to_device(x, targets))
        except FloatingPointError as exc:
            raise self._diverged(self.global_step + 1, str(getattr(exc, "problem", exc))) from exc
        except RuntimeError as exc:
            if FLOAT32_OVERFLOW not in str(exc):
                raise
            # E.g. Adam's first step divides lr by 1 - β1 = 0.1: an lr within float32's range can still overflow.
            raise self._diverged(self.global_step + 1, "the optimizer's update overflowed float32") from exc
        except ValueError as exc:
            if not str(exc).startswith(ONE_VALUE_PER_CHANNEL):
                raise
            # Only a batch of one sample gets here: iterate_batches drops a lone last one after full batches.
            raise MamoError(
                f"training '{self.description}' got a batch of {len(x)} sample at step {self.global_step + 1}, and "
                f"a batch-norm layer of the backbone whose feature map is 1 × 1 cannot train on one value per "
                f"channel; set train.batch_size to 2 or more (now {self.batch_size}) and give the train split at "
                "least 2 samples."
            ) from exc

    def _diverged(self, step: int, problem: str) -> TrainingDiverged:
        group = self.step.optimizer.param_groups[0]
        # Besides the learning rate, what else can blow the update up when set high (named only when it is).
        others = [f"train.weight_decay (now {group['weight_decay']:g})"] if group.get("weight_decay", 0) > 1 else []
        # A tensioner's α > 1 pulls beyond the thesis' range (CAGrad's c is also called alpha: not this one).
        alpha = self.step.direction.alpha if isinstance(self.step.direction, Tensioner) else 0.0
        others += [f"direction.tensioner.alpha (now {alpha:g})"] if alpha > 1 else []
        lower = " or ".join([f"train.lr (now {group['lr']:g})", *others])
        return TrainingDiverged(
            f"training '{self.description}' diverged at step {step} (epoch {self.epoch + 1} of the run): {problem}; "
            f"lower {lower}, or check the data for NaN or infinite values."
        )

    def fit(self, epochs: int, done: int = 0) -> list[dict]:
        """Run ``epochs`` more epochs of a phase that has ``done`` behind it (a resumed one), which only the
        epoch lines' count (``phase_epochs``) shows."""
        self.phase_epochs = (done, done + epochs)
        self.fit_start = (self.epoch, time.perf_counter())
        for index in range(epochs):
            start = time.perf_counter()
            batches = iterate_batches(self.train_set, self.batch_size, shuffle=True, generator=self.generator,
                                      drop_single=True)
            total = batches_per_epoch(len(self.train_set), self.batch_size, drop_single=True)
            # The epoch of the phase, as the epoch lines count it (the trainer's own count runs across phases).
            bar = tqdm(batches, total=total, desc=f"{self.description} epoch {done + index + 1}/{done + epochs}",
                       disable=not self.progress, leave=False, dynamic_ncols=True)
            train_loss = torch.zeros(len(self.model.tasks))
            for x, targets in bar:
                if STOP_REQUESTED.is_set():  # a stop signal whose KeyboardInterrupt Python dropped
                    raise KeyboardInterrupt
                result = self._step(x, targets)
                train_loss += result.losses.float().cpu()
                self.global_step += 1
                for callback in self.callbacks:
                    callback.on_step(self, result)
                if self.progress:  # refresh=False: shown at the bar's next timed redraw, not redrawn every step
                    bar.set_postfix(loss=f"{result.losses.sum().item():.4g}", refresh=False)
            seconds = time.perf_counter() - start
            metrics = self.evaluate(self.val_set)
            # A step's NaN loss is caught by the next step; after the epoch's last step there is none, and a model
            # that scores NaN would otherwise be kept and reported as a result.
            broken = [task for task, values in metrics.items() if not math.isfinite(values["loss"])]
            if broken:
                names = ", ".join(map(repr, broken))
                raise self._diverged(self.global_step, f"the validation loss of task {names} is NaN or infinite "
                                                       "after the epoch's last step")
            self.epoch += 1
            self.history.append({
                "epoch": self.epoch,
                "phase": self.description,
                "seconds": seconds,
                "train_loss": dict(zip(self.model.tasks, (train_loss / max(total, 1)).tolist(), strict=True)),
                "val": metrics,
            })
            for callback in self.callbacks:
                callback.on_epoch_end(self, metrics)
        return self.history

    @torch.no_grad()
    def evaluate(self, dataset: Dataset, split: str = "val") -> Metrics:
        """The metrics of the model on ``dataset``, the ``split`` messages name."""
        self.model.eval()
        accumulator = MetricAccumulator(self.model.tasks)
        size = evaluation_batch_size(self.batch_size, self.model.space.input_shape)
        # A bar too: NYUv2's test split is minutes of evaluation on a CPU.
        batches = tqdm(iterate_batches(dataset, size, shuffle=False, generator=None),
                       total=batches_per_epoch(len(dataset), size), desc=f"{self.description} {split}",
                       disable=not self.progress, leave=False, dynamic_ncols=True)
        for x, targets in batches:
            x, targets = self._to_device(x, targets)
            accumulator.update(self.model(x), targets)
        try:
            return accumulator.compute()
        except NoTargets as exc:
            raise exc.of_split(split) from None

    @property
    def seconds_per_epoch(self) -> float:
        """Mean training seconds per epoch (validation excluded) over the whole history."""
        return mean_epoch_seconds(self.history)


def mean_epoch_seconds(history: list[dict], phase: str | None = None) -> float:
    """Mean training seconds of the epochs in ``history`` (of ``phase`` only, when given; 0 when there are none)."""
    times = [h["seconds"] for h in history if phase is None or h.get("phase") == phase]
    return sum(times) / len(times) if times else 0.0
