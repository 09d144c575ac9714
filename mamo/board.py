"""TensorBoard logging: the one callback that writes a run's events into its run folder.

The trainer and the search loop call back into :class:`TensorBoardLogger`; nothing in the training step
knows about TensorBoard. Per step it writes every scalar of that step as one event (read from the step's
host tensors, the direction's diagnostics as plain floats); per epoch the validation metrics and Δ against
STL; per detection round the conflict heatmaps, cosine histograms and the architecture. The pictures (which
``pictures=False`` leaves out) are rendered on a worker thread (on a busy CPU it saves nothing,
docs/tensorboard.md "Cost"); a round's are waited for, and the events flushed, before the search writes the
round's checkpoint. Each PNG is also saved under the run folder's plots/. Events go through
:class:`~mamo.event_file.EventFileWriter` (a tune trial's HPARAMS record: mamo/hparams.py). Tags and pictures
are described in docs/tensorboard.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary

from mamo import drawing, plots
from mamo import graph as g
from mamo.config import Config, config_text
from mamo.conflicts import HISTOGRAM_EDGES, ConflictStats
from mamo.directions.base import TensorInfo
from mamo.event_file import (
    EventFileWriter,
    histogram_summary,
    image_summary,
    multiline_layout_summary,
    png_bytes,
    scalar_summary,
    text_summary,
)
from mamo.report import delta
from mamo.runs import counted
from mamo.step import StepResult
from mamo.tasks import TaskSpec
from mamo.trainer import Callback, Metrics, Trainer
from mamo.writes import replace_atomically

if TYPE_CHECKING:
    import networkx as nx

    from mamo.model import MamoNet
    from mamo.search_phases import RoundRecord

# Where each entry of StepResult.info goes; other keys land under direction/<key>. "weights" repeats
# StepResult.weights, which is logged as direction/weight.
INFO_TAGS: dict[str, str | None] = {
    "weights": None,
    "base_weights": "direction/base_weight",
    "c": "tensioner/c",
    "delta": "tensioner/delta",
    "angle": "tensioner/angle_deg",
    "shrink": "tensioner/shrink",
    "active": "tensioner/active",
}

GRAMIAN_NORM_TAGS = {"parameters": "train/grad_norm", "representation": "train/grad_norm_representation"}

# TensorBoard's CUSTOM SCALARS tab: one chart per quantity with every task on it.
PER_TASK_CHARTS = {
    "train loss": "train/loss/",
    "validation loss": "val/loss/",
    "direction weights": "direction/weight/",
    "gradient norms": "train/grad_norm/",
    "gradient norms at the shared representation (ub)": "train/grad_norm_representation/",
    "tensioner c_t": "tensioner/c/",
    "tensioner delta_t": "tensioner/delta/",
    "angle to the update (degrees)": "tensioner/angle_deg/",
}


def grown_positions(graph: nx.DiGraph, new_modules: list[str]) -> list[list]:
    """The (pair, cell) positions where ``new_modules`` (a round's new branch modules) sit, as
    ``[[task_a, task_b], cell]`` entries, shallowest first: the conflict heatmap's boxes.

    Not the round's activated positions: a branch grows from its activated cell to the output (modules at the
    deeper cells too), and an activated position that an earlier branch already covers grows nothing."""
    positions = set()
    for node in new_modules:
        data = graph.nodes[node]
        # activated_by names the pair also for task-exclusive modules, whose group is a single task.
        positions.add((tuple(data["activated_by"][0]), int(data["cell"])))
    return [[list(pair), cell] for pair, cell in sorted(positions, key=lambda p: (p[1], p[0]))]


class TensorBoardLogger(Callback):
    """Writes a run's TensorBoard events into ``run_dir`` (``tensorboard --logdir runs`` shows them).

    ``stl_val`` (validation metrics of the STL baseline) adds Δ against STL per epoch. ``pictures=False``
    leaves out the round pictures (heatmaps, architecture; nearly all of the logging's cost, docs/tensorboard.md
    "Cost"); scalars, texts and histograms are still written. ``background=False`` renders them on the calling
    thread instead of a worker. ``start_over`` (a resumed run that had no checkpoint yet, so starts again) makes
    TensorBoard drop the events the stopped process wrote into ``run_dir``. Call :meth:`close` (or let
    ``on_run_end`` do it) to wait for pending pictures and flush the file.
    """

    def __init__(
        self,
        run_dir: Path,
        config: Config,
        tasks: dict[str, TaskSpec],
        stl_val: Metrics | None = None,
        *,
        pictures: bool = True,
        background: bool = True,
        start_over: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.pictures = pictures
        self.specs = dict(tasks)
        self.stl_val = stl_val
        # A resumed run's folder holds the stopped process's events, config text included (TensorBoard's Python
        # reader would list each copy at step 0), unless it starts over.
        continued = any(self.run_dir.glob("events.out.tfevents.*")) and not start_over
        self.events = EventFileWriter(self.run_dir)
        if not continued:
            # A session start at step 0 in the first file: TensorBoard's readers take the first START they see as
            # the run's beginning and only a later one as a restart, so a resume's marker (on_resume) purges only
            # after this one. A resumed run with no checkpoint starts over here, dropping all the stopped one wrote.
            self.events.add_event(Event(step=0, session_log=SessionLog(status=SessionLog.START)))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mamo-board") if background and pictures else None
        self._pending: list[Future] = []
        self._step = 0  # the last global step written, across trainers
        self._trainer_offsets: dict[int, int] = {}
        self._info_tags: dict[tuple, list[str]] = {}
        self._step_summaries: dict[tuple[str, ...], Summary] = {}
        self._drew_start = False
        self._resumed = False  # the next phase start is where a resumed process picked up, not a new phase
        self._closed = False
        if not continued:
            resolved = config_text(config)  # the same text as the run's config.yaml
            self.events.add_summary(text_summary("config", "    " + resolved.replace("\n", "\n    ")), 0)
            charts = {title: [f"^{prefix}"] for title, prefix in PER_TASK_CHARTS.items()}
            self.events.add_summary(multiline_layout_summary("mamo: per task", charts))

    # ----------------------------------------------------------------------------------------- steps
    def _global_step(self, trainer: Trainer) -> int:
        """The trainer's step, shifted for a second trainer (the train command's STL networks) so steps grow."""
        offset = self._trainer_offsets.setdefault(id(trainer), self._step if self._trainer_offsets else 0)
        return trainer.global_step + offset

    def on_resume(self, trainer: Trainer) -> None:
        # What the stopped process wrote after its checkpoint is written again; a SessionLog START at the first
        # repeated step makes TensorBoard drop the stale copies (as SummaryWriter's purge_step does).
        self._step = step = self._global_step(trainer)
        self.events.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))
        self._drew_start = True  # the stopped process drew the network before growth when it started
        self._resumed = True

    @staticmethod
    def _per_task(prefix: str, tasks: list[str], values: list[float]) -> dict[str, float]:
        return {f"{prefix}/{task}": value for task, value in zip(tasks, values, strict=True)}

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        self._step = step = self._global_step(trainer)
        tasks = list(trainer.model.tasks)  # an STL network has a subset of the run's tasks
        # StepResult's tensors are on the host: tolist copies nothing from a device.
        values = self._per_task("train/loss", tasks, result.losses.reshape(-1).tolist())
        if result.gramian is not None:
            norms = [math.sqrt(max(v, 0.0)) for v in result.gramian.diagonal().tolist()]
            # ub's norms (w.r.t. the representation) get their own tag: a search's detection rounds are exact.
            values |= self._per_task(GRAMIAN_NORM_TAGS[result.gramian_space], tasks, norms)
        if result.weights is not None:
            values |= self._per_task("direction/weight", tasks, result.weights.reshape(-1).tolist())
        info = result.info
        for key in info:
            prefix = INFO_TAGS.get(key, f"direction/{key}")
            if prefix is not None:  # None: logged under another tag already
                flat = info.flat(key) if isinstance(info, TensorInfo) else info[key].reshape(-1).tolist()
                values |= self._info_values(prefix, tasks, flat)
        self.events.add_summary(self._step_summary(values), step)

    def _step_summary(self, values: dict[str, float]) -> Summary:
        # Steps log the same tags over and over: refilling one Summary per tag list costs a third of building
        # one (measured); add_summary serialises it at once, so reusing it is safe.
        summary = self._step_summaries.get(tuple(values))
        if summary is None:
            summary = self._step_summaries[tuple(values)] = scalar_summary(values)
        else:
            for slot, value in zip(summary.value, values.values(), strict=True):
                slot.simple_value = value
        return summary

    def _info_values(self, prefix: str, tasks: list[str], flat: list[float]) -> dict[str, float]:
        """Tags of one info entry under ``prefix``: one scalar, or one per task; built once per prefix."""
        cache = (prefix, len(flat), *tasks)
        if cache not in self._info_tags:
            if len(flat) not in (1, len(tasks)):
                tags = []  # a shape that is not per task: not a scalar series
            elif len(flat) == 1 and len(tasks) > 1:
                tags = [prefix]
            else:
                tags = [f"{prefix}/{task}" for task in tasks]
            self._info_tags[cache] = tags
        return dict(zip(self._info_tags[cache], flat, strict=False))

    # ---------------------------------------------------------------------------------------- epochs
    def on_epoch_end(self, trainer: Trainer, metrics: Metrics) -> None:
        step = self._step = self._global_step(trainer)
        values = {f"val/{name}/{task}": value for task, row in metrics.items() for name, value in row.items()}
        if self.stl_val is not None and set(metrics) == set(self.specs):
            values["val/delta_vs_stl"] = delta(metrics, self.stl_val, self.specs)
        if trainer.history:
            last = trainer.history[-1]
            values |= {f"train/epoch_loss/{task}": loss for task, loss in last["train_loss"].items()}
            values["time/epoch_seconds"] = last["seconds"]
        values["time/epoch"] = trainer.epoch
        self.events.add_summary(scalar_summary(values), step)
        self.events.flush()

    def on_phase_start(self, phase: str, model: MamoNet) -> None:
        # Right after a resume the stopped process has already logged this phase's start (or stopped inside the
        # phase), so the text says where this process picked up, at the first step it writes: a start logged at
        # the checkpoint's step is before the restart marker and stays.
        resumed, self._resumed = self._resumed, False
        how, at = ("resumes from a checkpoint", self._step + 1) if resumed else ("starts", self._step)
        self.events.add_summary(text_summary("run/phases", f"{phase} {how} after step {self._step}"), at)
        self.events.add_summary(scalar_summary({"model/params": sum(p.numel() for p in model.parameters())}), at)
        if not self.pictures:
            return
        if len(model.tasks) < len(self.specs):
            # One of train.mode=stl's networks, each drawn as it starts (a resumed one was, by the stopped process).
            if not resumed:
                task = next(iter(model.tasks))
                index = list(self.specs).index(task)  # task names may hold '/' or spaces: not in a file name
                self._submit(self._draw_architecture, copy.deepcopy(model.graph),
                             drawing.node_parameters(model.graph, model), at, f"STL network of task '{task}'",
                             f"architecture-stl-task{index}.png")
        elif not self._drew_start:
            # The network before any growth, as round 0 of the architecture pictures (not when a resumed
            # search starts with a network that already grew).
            self._drew_start = True
            if g.branch_nodes(model.graph):
                return
            self._submit(self._draw_architecture, copy.deepcopy(model.graph),
                         drawing.node_parameters(model.graph, model), 0, "Architecture before growth",
                         "architecture-round0.png")

    # ---------------------------------------------------------------------------------------- rounds
    def on_round_end(self, record: RoundRecord) -> None:
        # At the global step of the round's end, not the round number: a resume's restart marker drops every tag
        # from one step on, so records of a round whose checkpoint the stopped process never wrote go with it.
        z, stats, activated, step = record.round, record.stats, record.activated, self._step
        values = {
            "search/gmk_modules": record.gmk_modules,
            "search/params": record.params,
            "search/new_modules": len(record.new_modules),
            "search/activated_positions": len(activated),
        }
        if record.val_delta is not None:
            values["search/val_delta_vs_stl"] = record.val_delta
        for a, b in stats.pairs:
            i, j = stats.tasks.index(a), stats.tasks.index(b)
            for cell in range(stats.num_cells):
                if stats.cell_params[cell] > 0:
                    values[f"conflicts/Q/{a}+{b}/cell{cell}"] = float(stats.counts[cell, i, j])
        self.events.add_summary(scalar_summary(values), step)
        described = ", ".join(f"{'+'.join(pair)}@cell{cell}" for pair, cell in activated) or "none"
        self.events.add_summary(text_summary("search/activated", f"round {z}: {described}; "
                                     f"{counted(len(record.new_modules), 'new module')}, "
                                     f"{record.gmk_modules} in all"), step)
        self._histograms(stats, step)
        if self.pictures:
            graph = copy.deepcopy(record.graph)  # copies: the next round resets the stats, grows the graph
            self._submit(self._draw_conflicts, copy.deepcopy(stats), grown_positions(graph, record.new_modules), z,
                         step)
            self._submit(self._draw_architecture, graph, drawing.node_parameters(graph, record.model), step,
                         f"Architecture after round {z}", f"architecture-round{z}.png")
        self._settle()  # the search checkpoints the round next, and a resume never ends it again

    def _settle(self) -> None:
        """Wait for the pictures submitted so far and flush the event file, so all of it is on disk."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        self.events.flush()

    def _histograms(self, stats: ConflictStats, step: int) -> None:
        if stats.steps == 0:
            return
        centres = (HISTOGRAM_EDGES[:-1] + HISTOGRAM_EDGES[1:]) / 2
        for p, (a, b) in enumerate(stats.pairs):
            i, j = stats.tasks.index(a), stats.tasks.index(b)
            for cell in range(stats.num_cells):
                counts = stats.histograms[cell, p]
                if stats.cell_params[cell] == 0 or counts.sum() == 0:
                    continue
                used = np.flatnonzero(counts)
                self.events.add_summary(histogram_summary(
                    f"conflicts/cosine/{a}+{b}/cell{cell}",
                    minimum=float(HISTOGRAM_EDGES[used[0]]), maximum=float(HISTOGRAM_EDGES[used[-1] + 1]),
                    count=int(counts.sum()), total=float(stats.cosine_sums[cell, i, j]),
                    total_squares=float(np.sum(counts * centres**2)),  # from bin centres: only the bins are kept
                    upper_edges=HISTOGRAM_EDGES[1:].tolist(), counts=counts.tolist()), step)

    def _draw_conflicts(self, stats: ConflictStats, grown: list, z: int, step: int) -> None:
        overview, cells = plots.overview_images(stats, grown, title=f"Where tasks fight, round {z}")
        encoded = png_bytes(overview)
        images: dict[str, np.ndarray | bytes] = {"conflicts/overview": encoded}
        shapes = {"conflicts/overview": overview.shape[:2]}
        for (kind, cell), pixels in cells.items():
            images[f"conflicts/{kind}/cell{cell}"], shapes[f"conflicts/{kind}/cell{cell}"] = pixels, pixels.shape[:2]
        if stats.pairs:
            histograms = plots.figure_to_array(plots.histogram_figure(stats))
            images["conflicts/histograms"], shapes["conflicts/histograms"] = histograms, histograms.shape[:2]
        self.events.add_summary(image_summary(images, shapes), step)
        self._export(f"conflicts-round{z}.png", encoded)

    def _draw_architecture(self, graph: nx.DiGraph, params: dict[str, int], step: int, title: str,
                           filename: str) -> None:
        pixels = plots.figure_to_array(drawing.draw_architecture(graph, params=params, title=title))
        encoded = png_bytes(pixels)
        self.events.add_summary(image_summary({"architecture": encoded}, {"architecture": pixels.shape[:2]}), step)
        self._export(filename, encoded)

    def _export(self, name: str, encoded: bytes) -> None:
        """The PNG that went into the event file, also as a file under the run folder's plots/."""
        # Through a temporary file: a full disk leaves no half picture, and its error names the file.
        replace_atomically(self.run_dir / "plots" / name, lambda tmp: tmp.write_bytes(encoded))

    def _submit(self, job: Callable[..., None], *args: object) -> None:
        self._raise_failures()
        if self._pool is None:
            job(*args)
        else:
            self._pending.append(self._pool.submit(job, *args))

    def _raise_failures(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()  # a drawing error surfaces in the training thread, not silently

    # ------------------------------------------------------------------------------------------- end
    def on_run_end(self, summary: dict) -> None:
        values = {f"test/{name}/{task}": value for task, row in summary.get("tasks", {}).items()
                  for name, value in row.items()}
        for key in ("delta", "win_rate", "params", "gmk_modules"):
            if summary.get(key) is not None:
                values[f"test/{key}"] = summary[key]
        self.events.add_summary(scalar_summary(values), self._step)
        self.close()

    def close(self) -> None:
        """Wait for pending pictures, then flush and close the event file (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._settle()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self.events.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
