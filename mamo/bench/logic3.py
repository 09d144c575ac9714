"""Three logic gates through two shared neurons: the logic benchmark with a third task, for every direction.

The thesis' logic benchmark (:mod:`mamo.bench.logic`) has two tasks, and for m = 2 with a base on the simplex
(mgda, central) the `thesis` tensioner's two unit pulls are opposite, so its pull is |c_1 − c_2| ≤ α long.
From m = 3 on they no longer cancel (docs/directions.md, "Which tensioner formulation should be the default").
This benchmark is the m = 3 evidence the m = 2 tables cannot give, with no thesis numbers to compare:

* tasks XOR, AND and OR of the four points of {0, 1}², the XOR targets times c (c = 1 and c = 10); two shared
  sigmoid neurons can carry all three (OR and AND, from which XOR is a difference);
* the logic benchmark's network (Linear(2, 2) + sigmoid shared, one Linear(2, 1) head per task, MSE), SGD with
  momentum 0.9, mini-batches of two, the same stopping rules (``--criterion``) and counting;
* every direction of mamo's table with the tensioner off, ``thesis`` and ``relative`` (T = 10, α = 0.3 unless
  ``--T`` / ``--alpha``), each run through mamo's own :class:`~mamo.directions.Direction` objects (one per run,
  so each keeps its own tensioner history), and the three single-task rows;
* ``--init seeded`` (default): each seed draws its own initial weights (torch's default initialisation after
  seeding torch with the seed: the shared layer, then the heads in task order); ``fixed``: seed 136's draw for
  every seed, so that the seeds vary only the data order, as the thesis' logic tables do.

Each cell is the learning rate of ``--lrs`` that converged most often, then fastest (as in the logic
benchmark). The networks train in lockstep as numpy arrays; the direction objects are called once per run and
step, which is what the run time goes to (about 50 µs per call).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from mamo.bench import Interrupted, learning_rates, positive_int, progress_lines
from mamo.bench.logic import (
    CRITERIA,
    EPOCHS,
    THRESHOLD,
    best_rate,
    fmt,
    layer_arrays,
    shuffles,
    stack_seeds,
    train_lockstep,
)
from mamo.bench.logic_numpy import MOMENTUM, VectorMLP
from mamo.errors import MamoError, NonFiniteGradients
from mamo.runs import stderr_on_terminal

TASKS = ("xor", "and", "or")
TARGETS = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # (point, task)
SCALES = (1.0, 10.0)
FORMULATIONS = ("off", "thesis", "relative")
FIXED_SEED = 136  # --init fixed: the logic benchmark's reference seed
SHARED_OPTIONS = ("quick", "seeds")  # numpy and Python floats on the CPU: no --device


def _bases() -> list[str]:
    from mamo.directions import DIRECTIONS

    return list(DIRECTIONS)


def initial_parameters(seeds: list[int], fixed: bool) -> dict[str, np.ndarray]:
    """W (2, 2, S), b (2, S), V (3, 2, S), a (3, S): torch's default initialisation of the shared layer, then
    the heads in :data:`TASKS` order, after seeding torch with each seed (``fixed``: with 136 for all)."""
    import torch

    draws = []
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.manual_seed(FIXED_SEED if fixed else seed)
            shared = torch.nn.Linear(2, 2)
            heads = {task: torch.nn.Linear(2, 1) for task in TASKS}
            draws.append(layer_arrays(shared, heads, TASKS))
    return stack_seeds(draws)


class ObjectDirections:
    """Weights (m, R) from Gramians (m, m, R) and losses (m, R) by one mamo Direction object per run; a run
    whose gradients are no longer finite gets NaN weights (it diverged and will not converge)."""

    def __init__(self, make: Callable[[int], object], runs: int):
        self.directions = [make(r) for r in range(runs)]

    def __call__(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        rows, values = np.moveaxis(gramian, -1, 0).tolist(), losses.T.tolist()
        weights = np.full((gramian.shape[0], len(rows)), np.nan)
        for r, direction in enumerate(self.directions):
            try:
                weights[:, r] = direction.weights_of(rows[r], values[r]).weights.numpy()
            except NonFiniteGradients:
                pass
        return weights

    def select(self, keep: np.ndarray) -> None:
        self.directions = [d for d, k in zip(self.directions, keep, strict=True) if k]


class FixedWeights:
    """A single-task row: weight 1 on ``task``, 0 on the others."""

    def __init__(self, task: int, m: int):
        self.weights = np.eye(m)[:, task : task + 1]

    def __call__(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        return np.repeat(self.weights, gramian.shape[-1], axis=1)

    def select(self, keep: np.ndarray) -> None:
        pass


def direction_maker(base: str, formulation: str, T: int, alpha: float, seeds: np.ndarray) -> Callable[[int], object]:
    """Run r's Direction (a method that draws, pcgrad, gets a generator seeded by run r's seed)."""
    import torch

    from mamo.config import DirectionConfig, TensionerConfig
    from mamo.directions import create_direction

    config = DirectionConfig(name=base, tensioner=TensionerConfig(formulation=formulation, T=T, alpha=alpha))
    return lambda r: create_direction(config, torch.Generator().manual_seed(int(seeds[r])))


def train_row(base: str, formulation: str, lrs: list[float], seeds: list[int], init: dict[str, np.ndarray],
              orders: np.ndarray, criterion: str, T: int, alpha: float) -> tuple[np.ndarray, ...]:
    """(c, lr, epochs) of every run of one row, over every c, learning rate and seed (seeds last); epochs 0:
    not converged within the budget."""
    c, lr, seed = (a.ravel() for a in np.meshgrid(SCALES, lrs, np.arange(len(seeds)), indexing="ij"))
    grid = {"c": c, "lr": lr, "seed": seed}
    net = VectorMLP({k: v[..., seed] for k, v in init.items()}, lr)
    m = len(TASKS)
    if base.startswith("single:"):
        task = TASKS.index(base.split(":")[1])
        direction, counted = FixedWeights(task, m), np.arange(m) == task
    else:
        direction = ObjectDirections(direction_maker(base, formulation, T, alpha, np.asarray(seeds)[seed]), len(lr))
        counted = np.ones(m, bool)
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging run's NaNs: it never converges
        epochs = train_lockstep(net, direction, grid, orders, CRITERIA[criterion], TARGETS, counted)
    return c, lr, epochs


def run_row(*args: object, **kwargs: object) -> dict[float, tuple[float, float, float, float]]:
    """{c: (rate %, mean, std, lr)} of one row (the arguments of :func:`train_row`)."""
    c, lr, epochs = train_row(*args, **kwargs)
    return {ci: best_rate(epochs[c == ci], lr[c == ci]) for ci in SCALES}


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help=f"epoch budget (default {EPOCHS}; --quick 400)")
    parser.add_argument("--lrs", type=learning_rates, default=[0.05],
                        help="learning rates, comma-separated; each cell takes the one that converged most often, "
                             "then fastest (default 0.05, the logic benchmark's sweep rate)")
    parser.add_argument("--criterion", choices=list(CRITERIA), default="reference",
                        help="convergence rule, as in bench logic")
    parser.add_argument("--init", choices=("seeded", "fixed"), default="seeded",
                        help="one initialisation per seed (default), or seed 136's for every seed")
    parser.add_argument("--T", type=positive_int, default=10, help="tensioner window T (default 10)")
    parser.add_argument("--alpha", type=float, default=0.3, help="tensioner strength α (default 0.3)")
    parser.add_argument("--directions", default=None,
                        help="comma-separated bases to run (default: every direction; --quick: equal, mgda, central)")


def _chosen_bases(text: str | None, quick: bool) -> list[str]:
    known = _bases()
    if text is None:
        return ["equal", "mgda", "central"] if quick else known
    chosen = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))  # each once
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        what = f"unknown direction {', '.join(map(repr, unknown))}" if unknown else "no direction"
        raise MamoError(f"--directions names {what}; pass a comma-separated list of {', '.join(known)}.")
    return chosen


def _row_name(base: str) -> str:
    """A row's name in the tables: ``Single XOR`` for ``single:xor``, a direction's own name otherwise."""
    return f"Single {base.split(':')[1].upper()}" if base.startswith("single:") else base


def run(args: argparse.Namespace) -> dict:
    if not (math.isfinite(args.alpha) and args.alpha >= 0.0):
        raise MamoError(f"--alpha must be a finite number ≥ 0, got {args.alpha}; pass e.g. 0.3.")
    seeds = list(range(args.seeds or (3 if args.quick else 20)))
    epochs = args.epochs or (400 if args.quick else EPOCHS)
    bases = _chosen_bases(args.directions, args.quick)
    init = initial_parameters(seeds, fixed=args.init == "fixed")
    orders = shuffles(seeds, epochs)
    rows = [(f"single:{task}", "off") for task in TASKS] + [(b, f) for b in bases for f in FORMULATIONS]
    start = time.perf_counter()
    results, say, stopped = {}, progress_lines(start), False
    try:
        for k, (base, formulation) in enumerate(tqdm(rows, desc="logic3", unit="row", leave=False,
                                                     disable=not stderr_on_terminal()), 1):
            results[base, formulation] = run_row(base, formulation, args.lrs, seeds, init, orders, args.criterion,
                                                 args.T, args.alpha)
            cells = ", ".join(f"c={c:g} {fmt(*results[base, formulation][c][:3])}" for c in SCALES)
            say(f"{_row_name(base)} ({formulation}): {cells} ({k} of {len(rows)})")
    except KeyboardInterrupt:  # minutes of rows: the finished ones are saved, the rest shown as not run
        if not results:
            raise
        stopped = True
    wall = time.perf_counter() - start
    several = len(args.lrs) > 1

    def cell(base: str, formulation: str, c: float) -> str:
        if (base, formulation) not in results:
            return "not run (stopped)"
        rate, mean, std, lr = results[base, formulation][c]
        return fmt(rate, mean, std) + (f" @{lr:g}" if several else "")

    tables = []
    for c in SCALES:
        table_rows = [[_row_name(f"single:{task}"), cell(f"single:{task}", "off", c), "", ""] for task in TASKS]
        table_rows += [[base, *(cell(base, f, c) for f in FORMULATIONS)] for base in bases]
        tables.append({"title": f"Three gates (XOR ×{c:g}, AND, OR), {len(seeds)} seeds: epochs to convergence "
                                f"(rate), tensioner T = {args.T}, α = {args.alpha:g}",
                       "columns": ["Direction", "tensioner off", "thesis", "relative"], "rows": table_rows})
    notes = [
        f"{len(seeds)} seeds, initialisation '{args.init}', learning rates {args.lrs}, {epochs} epochs, mini-batches "
        f"of 2, momentum {MOMENTUM}, convergence rule '{args.criterion}', threshold {THRESHOLD}; wall time "
        f"{wall:.0f} s (one process, CPU).",
        "Cells: mean ± population std of the converged runs' epochs, counted from 0 (convergence rate %); "
        + ("each at the learning rate that converged most often, then fastest." if several else
           f"all at lr {args.lrs[0]:g}."),
        "Every run goes through mamo's Direction objects (one per run), as a training step calls them.",
    ]
    raw = {f"{base}|{form}|c={c}": value for (base, form), res in results.items() for c, value in res.items()}
    result = {"tables": tables, "notes": notes, "raw": raw, "logic3_wall_seconds": round(wall, 1)}
    if stopped:
        notes.insert(0, f"Stopped after {len(results)} of {len(rows)} rows (Ctrl-C or a stop signal): the other "
                        "cells say 'not run (stopped)'.")
        raise Interrupted(result)
    return result
