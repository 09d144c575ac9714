"""The thesis' logic benchmark (§5.2, Tables 1–4): XOR and AND learnt through two shared sigmoid neurons.

Protocol (thesis §5.2; where the text is silent, its reference code tiemink/MTL_TaskTensioner, whose details
reproduce the thesis' single-task and central rows to within a few epochs):

* network: Linear(2, 2) + sigmoid shared, one Linear(2, 1) head per task; MSE loss per task; the XOR targets
  are multiplied by c (c = 1 and c = 10);
* initialisation (``--init``): ``reference`` (default) is the reference code's, the same for every seed
  (torch seed 136: the shared layer, then the AND head, then the XOR head), so the 50 seeds vary only the
  order of the data, which is why the thesis' standard deviations are a few epochs; ``seeded`` draws each
  seed's weights as mamo does (:func:`mamo.model.compile_model` on the ``logic`` preset), a harder test;
* SGD with momentum 0.9 over the thesis' learning-rate grid; per epoch the four points are shuffled and fed
  as two mini-batches of two; each method reports the learning rate that converged most often, then fastest
  ("the models that best separated the input data");
* stop at 3,000 epochs or when the error is below 1e-3: ``--criterion reference`` (default) is the reference
  code's rule, a per-task latch on the epoch's summed batch losses divided by batches × tasks × batch size;
  ``mean`` asks every task's mean batch loss over one epoch to be below 1e-3 in the same epoch;
* tensioners: T = 10, α = 0.3 (Tables 3–4) and the T × α sweep of the central direction (Tables 1–2), for
  both formulations (DESIGN §5).

Two rows are variants of mamo's directions, to show where the differences come from: uniform weighting as the
mean of the gradients (mamo's ``equal`` is the sum, twice the step; the thesis' Eq 4.1 writes the sum, but its
tables match the mean), and the min-norm solver the reference code ships (Sener & Koltun's), which is exact
inside the segment but answers 0.999 / 0.001 where the min-norm point is a vertex (mamo's ``mgda`` is exact).

Epochs are counted as the reference code counts them: the 0-based index of the epoch whose losses first met
the rule, one less than the epochs trained (the thesis' single-XOR row at c = 10, 2979.0, is such an index:
at learning rate 0.001 those runs meet the rule at epochs 2978–2981, just inside the 3,000-epoch budget).

Every run of one method (all seeds, learning rates, c and α) trains in lockstep as numpy arrays with the runs
on the last axis (:mod:`mamo.bench.logic_numpy`); runs that converged leave the arrays, so the cost follows the
slowest runs.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from mamo.bench import positive_int, progress_lines
from mamo.bench.logic_numpy import MOMENTUM, VectorDirection, VectorMLP
from mamo.bench.thesis_tables import THESIS_METHODS, THESIS_SWEEP
from mamo.errors import MamoError
from mamo.runs import stderr_on_terminal

if TYPE_CHECKING:
    import torch

TASKS = ("xor", "and")  # the logic dataset's task order
POINTS = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
TARGETS = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # (point, task): XOR, AND
LEARNING_RATES = (5e-5, 1e-4, 5e-3, 1e-3, 5e-2, 1e-2)  # thesis §5.2
SCALES = (1.0, 10.0)
PERIODS = (5, 10, 15)
ALPHAS = tuple(round(0.1 * k, 1) for k in range(11))
THRESHOLD, EPOCHS, BATCH = 1e-3, 3000, 2
REFERENCE_SEED = 136  # the reference code's torch seed for every run's initial weights
SHARED_OPTIONS = ("quick", "seeds")  # numpy on the CPU: no --device
SWEEP_LR = 5e-2  # the reference code's rate; the thesis' sweep reports rates below 100%, so one rate for all cells

# --------------------------------------------------------------------------- rows, initial weights, the network


@dataclass(frozen=True)
class Method:
    """One row: a base direction (a key of :data:`mamo.bench.logic_numpy.BASES`), a tensioner formulation, and
    the thesis row it compares to."""

    label: str
    base: str
    formulation: str = "off"
    thesis: str = ""

    @property
    def reference(self) -> str:
        return self.thesis or self.label


def stack_seeds(per_seed: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each seed's parameter arrays stacked on a last, seed axis (the runs' axis of :class:`VectorMLP`)."""
    return {key: np.stack([p[key] for p in per_seed], axis=-1) for key in per_seed[0]}


def layer_arrays(shared: torch.nn.Module, heads: dict[str, torch.nn.Module],
                 tasks: Sequence[str] = TASKS) -> dict[str, np.ndarray]:
    """W (out, in), b, V (task, hidden), a (task) from torch layers, tasks in ``tasks`` order."""
    weight, bias = (p.detach().double().numpy() for p in shared.parameters())
    head = {t: [p.detach().double().numpy() for p in heads[t].parameters()] for t in tasks}
    return {"W": weight, "b": bias, "V": np.concatenate([head[t][0] for t in tasks]),
            "a": np.concatenate([head[t][1] for t in tasks])}


def initial_parameters(seeds: list[int], method: Method | None = None) -> dict[str, np.ndarray]:
    """Each seed's initial weights of the ``logic`` preset's MamoNet (``--init seeded``), seeds last."""
    from mamo import graph as g
    from mamo.config import load_config
    from mamo.data import load_data
    from mamo.model import compile_model
    from mamo.spaces import create_space

    config = load_config("logic")
    data = load_data(config.data)
    graph = g.build_hps_graph(create_space(config.model, data.input_shape), data.tasks)
    models = [compile_model(graph, seed=seed) for seed in seeds]
    return stack_seeds([layer_arrays(m.blocks[g.cell_id(0)], {t: m.blocks[g.head_id(t)] for t in TASKS})
                        for m in models])


def reference_parameters(seeds: list[int], method: Method | None = None) -> dict[str, np.ndarray]:
    """The reference code's initial weights (``--init reference``), the same for every seed: torch's default
    initialisation after seeding 136, drawn for the shared layer, then the AND head, then the XOR head (a
    single-task XOR model has only its own head, drawn first)."""
    import torch

    order = ("xor", "and") if method is not None and method.base == "single:xor" else ("and", "xor")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(REFERENCE_SEED)
        shared = torch.nn.Linear(2, 2)
        heads = {task: torch.nn.Linear(2, 1) for task in order}
    return stack_seeds([layer_arrays(shared, heads)] * len(seeds))


INITS: dict[str, Callable[[list[int], Method | None], dict[str, np.ndarray]]] = {
    "reference": reference_parameters,
    "seeded": initial_parameters,
}


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Criterion:
    """When a run has converged: the summed batch losses of an epoch divided by ``divisor(batches, tasks,
    batch size)`` below the threshold; ``latch``: a task that met it once stays met (the reference code)."""

    divisor: Callable[[int, int, int], int]
    latch: bool


CRITERIA = {"mean": Criterion(lambda n, m, b: n, False), "reference": Criterion(lambda n, m, b: n * m * b, True)}


def shuffles(seeds: list[int], epochs: int) -> np.ndarray:
    """Each seed's order of the four points in every epoch (S, epochs, 4); shared by every method and rate."""
    return np.array([np.random.default_rng(seed).random((epochs, 4)).argsort(axis=1) for seed in seeds])


def train_runs(method: Method, grid: dict[str, np.ndarray], init: dict[str, np.ndarray], orders: np.ndarray,
               criterion: Criterion, T: int = 10, batch: int = BATCH) -> np.ndarray:
    """Epochs to convergence (0: not within the budget) of every run in ``grid`` (arrays c, lr, alpha, seed:
    index into ``init`` and ``orders``)."""
    runs = len(grid["lr"])
    net = VectorMLP({k: v[..., grid["seed"]] for k, v in init.items()}, grid["lr"])
    direction = VectorDirection(method.base, method.formulation, T, grid["alpha"], runs)
    counted = np.array([method.base != "single:and", method.base != "single:xor"])
    return train_lockstep(net, direction, grid, orders, criterion, TARGETS, counted, batch)


def train_lockstep(net: VectorMLP, direction: Any, grid: dict[str, np.ndarray], orders: np.ndarray,
                   criterion: Criterion, targets: np.ndarray, counted: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """Epochs to convergence (0: not within the budget) of the runs of ``net``, trained in lockstep on the four
    points with ``targets`` (point, task), the first task's scaled by ``grid["c"]``; ``direction(G, losses)``
    gives the weights (m, R) and, like the network, drops the runs that converged through ``select``. Only the
    tasks marked in ``counted`` have to converge (a single-task row)."""
    runs, m = len(grid["lr"]), targets.shape[1]
    divisor = criterion.divisor(4 // batch, int(counted.sum()), batch)
    scale = np.ones((m, runs))
    scale[0] = grid["c"]  # (m, R): the first task's targets (XOR's) times c
    alive, seeds = np.arange(runs), grid["seed"]
    met = np.zeros((m, runs), bool)
    converged = np.zeros(runs, int)
    for epoch in range(orders.shape[1]):
        order = orders[seeds, epoch].T  # (4, R)
        total = np.zeros((m, len(alive)))
        for start in range(0, 4, batch):
            idx = order[start : start + batch]
            x = POINTS[idx].transpose(0, 2, 1)  # (B, 2, R)
            y = targets[idx].transpose(0, 2, 1) * scale  # (B, m, R)
            total += net.step(x, y, direction)
        below = total / divisor < THRESHOLD
        met = (met | below) if criterion.latch else below
        done = (met | ~counted[:, None]).all(axis=0)
        converged[alive[done]] = epoch + 1
        if done.any():
            keep = ~done
            net.select(keep)
            direction.select(keep)
            alive, seeds, scale, met = alive[keep], seeds[keep], scale[:, keep], met[:, keep]
            if not len(alive):
                break
    return converged


def best_rate(epochs: np.ndarray, lr: np.ndarray) -> tuple[float, float, float, float]:
    """(rate %, mean, std, lr) of the learning rate that converged most often, then fastest, from ``epochs``
    trained until convergence (0: never); the mean and population std, over converged runs, are of the
    converging epoch's 0-based index, as the reference code reports it."""
    best = None
    for rate_lr in np.unique(lr):
        done = epochs[(lr == rate_lr) & (epochs > 0)] - 1  # epochs trained -> the reference's 0-based index
        rate = 100.0 * len(done) / int((lr == rate_lr).sum())
        mean = float(done.mean()) if len(done) else math.inf
        key = (-rate, mean)
        if best is None or key < best[0]:
            best = (key, (rate, mean, float(done.std()) if len(done) else math.nan, float(rate_lr)))
    return best[1]


def fmt(rate: float, mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f} ({rate:.0f}%)" if math.isfinite(mean) else f"– ({rate:.0f}%)"


def run_method(method: Method, cs: Sequence[float], lrs: Sequence[float], alphas: Sequence[float], seeds: list[int],
               init: Callable[[list[int], Method | None], dict[str, np.ndarray]], orders: np.ndarray,
               criterion: Criterion, T: int) -> dict:
    """{(c, α): (rate, mean, std, lr)} of one method over the grid; ``init(seeds, method)`` gives the weights."""
    c, lr, alpha, seed = (a.ravel() for a in np.meshgrid(cs, lrs, alphas, np.arange(len(seeds)), indexing="ij"))
    grid = {"c": c, "lr": lr, "alpha": alpha, "seed": seed}
    epochs = train_runs(method, grid, init(seeds, method), orders, criterion, T)
    return {(ci, ai): best_rate(epochs[(c == ci) & (alpha == ai)], lr[(c == ci) & (alpha == ai)])
            for ci in cs for ai in alphas}


def _tensioned(formulation: str) -> list[Method]:
    return [Method("Min-norm + tensioner", "mgda", formulation),
            Method("Min-norm (reference solver) + tensioner", "mgda-reference", formulation,
                   "Min-norm + tensioner"),
            Method("Central + tensioner", "central", formulation)]


MAIN = [Method("Single AND", "single:and"), Method("Single XOR", "single:xor"),
        Method("Uniform (sum: mamo equal)", "equal", thesis="Uniform"),
        Method("Uniform (mean: thesis)", "mean", thesis="Uniform"),
        Method("Min-norm (exact: mamo mgda)", "mgda", thesis="Min-norm"),
        Method("Min-norm (reference solver)", "mgda-reference", thesis="Min-norm"),
        Method("Central", "central"), *_tensioned("thesis"), *_tensioned("relative")]


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help=f"epoch budget (default {EPOCHS}; --quick 400)")
    parser.add_argument("--criterion", choices=list(CRITERIA), default="reference",
                        help="convergence rule (see the module docstring)")
    parser.add_argument("--init", choices=list(INITS), default="reference",
                        help="initial weights: the reference code's for every seed, or one draw per seed")
    parser.add_argument("--sweep-lr", type=float, default=SWEEP_LR,
                        help=f"the one learning rate of the T × α sweep (default {SWEEP_LR}, the reference code's)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the T × α sweep (Tables 1–2)")


def _method_tables(results: dict, seeds: list[int]) -> list[dict]:
    tables = []
    for c, number in zip(SCALES, (3, 4), strict=True):
        rows = []
        for method in MAIN:
            rate, mean, std, lr = results[method.label, method.formulation][c, 0.3]
            rows.append([method.label, method.formulation, f"{lr:g}", fmt(rate, mean, std),
                         fmt(*THESIS_METHODS[c][method.reference])])
        tables.append({"title": f"Thesis Table {number}: XOR and AND, c = {c:g} ({len(seeds)} seeds, "
                                "tensioner T = 10, α = 0.3)",
                       "columns": ["Method", "Tensioner", "lr", "ours: epochs (rate)", "thesis: epochs (rate)"],
                       "rows": rows})
    return tables


def _sweep_tables(sweep: dict, periods: Sequence[int], alphas: Sequence[float], lr: float) -> list[dict]:
    tables = []
    for formulation in dict.fromkeys(form for form, _ in sweep):
        for c, number in zip(SCALES, (1, 2), strict=True):
            rows = []
            for alpha in alphas:
                row = [f"{alpha:.1f}"]
                for T in periods:
                    rate, mean, std, lr = sweep[formulation, T][c, alpha]
                    ref = THESIS_SWEEP[c][T][ALPHAS.index(alpha)]
                    row += [fmt(rate, mean, std), fmt(ref[2], ref[0], ref[1])]
                rows.append(row)
            tables.append({"title": f"Thesis Table {number}: central + tensioner ({formulation}), c = {c:g}, "
                                    f"T × α (ours at lr {lr:g}; thesis)",
                           "columns": ["α", *(f"{who} T={T}" for T in periods for who in ("ours", "thesis"))],
                           "rows": rows})
    return tables


def run(args: argparse.Namespace) -> dict:
    quick = args.quick
    seeds = list(range(args.seeds or (3 if quick else 50)))
    epochs = args.epochs or (400 if quick else EPOCHS)
    lrs = (5e-2,) if quick else LEARNING_RATES
    periods, alphas = ((10,), (0.0, 0.3, 1.0)) if quick else (PERIODS, ALPHAS)
    start = time.perf_counter()
    if not 0.0 < args.sweep_lr < math.inf:
        raise MamoError(f"--sweep-lr must be a finite positive learning rate, got {args.sweep_lr}; pass e.g. 0.05.")
    common = dict(cs=SCALES, seeds=seeds, init=INITS[args.init], orders=shuffles(seeds, epochs),
                  criterion=CRITERIA[args.criterion])
    runs = [((m.label, m.formulation), m, lrs, (0.3,), 10) for m in MAIN]
    if not args.no_sweep:
        runs += [((form, T), Method("Central + tensioner", "central", form), (args.sweep_lr,), alphas, T)
                 for form in ("thesis", "relative") for T in periods]
    done, say = {}, progress_lines(start)
    # A bar on a terminal and a line per method (a full run is about a CPU-minute of silence otherwise).
    for k, (key, method, rates, strengths, T) in enumerate(tqdm(runs, desc="logic", unit="method", leave=False,
                                                                disable=not stderr_on_terminal()), 1):
        done[key] = run_method(method, lrs=rates, alphas=strengths, T=T, **common)
        if k <= len(MAIN):
            cells = ", ".join(f"c={c:g} {fmt(*done[key][c, 0.3][:3])}" for c in SCALES)
            say(f"{method.label} ({method.formulation}): {cells} ({k} of {len(runs)})")
        else:
            say(f"T × α sweep, central + tensioner ({key[0]}), T={T} ({k} of {len(runs)})")
    results = {key: done[key] for key, *_ in runs[:len(MAIN)]}
    sweep = {key: done[key] for key, *_ in runs[len(MAIN):]}
    wall = time.perf_counter() - start
    notes = [
        f"{len(seeds)} seeds, initialisation '{args.init}', learning rates {list(lrs)} (sweep: {args.sweep_lr:g}), "
        f"{epochs} epochs, "
        f"mini-batches of {BATCH}, momentum {MOMENTUM}, convergence rule '{args.criterion}', threshold "
        f"{THRESHOLD}; wall time {wall:.0f} s (numpy, one process, CPU).",
        "Cells: mean ± population std of the converged runs' epochs, counted from 0 as the reference code "
        "does (convergence rate %); Tables 3–4 at "
        "the learning rate that converged most often, then fastest; thesis values typed from its Tables 1–4.",
        "Uniform (mean) and Min-norm (reference solver) are not mamo directions: the gradients' mean (what the "
        "thesis' uniform row matches) and the reference code's solver (0.999 / 0.001 in place of a vertex); "
        "mamo's are the sum and the exact min-norm.",
        "The thesis' tensioner rows are for its own formulation; they stand beside both of ours for comparison.",
    ]
    raw = {f"{label}|{form}|c={c}|alpha={a}": value for (label, form), res in results.items()
           for (c, a), value in res.items()}
    raw.update({f"sweep|{form}|T={T}|c={c}|alpha={a}": value for (form, T), res in sweep.items()
                for (c, a), value in res.items()})
    tables = _method_tables(results, seeds) + _sweep_tables(sweep, periods, alphas, args.sweep_lr)
    return {"tables": tables, "notes": notes, "raw": raw, "logic_wall_seconds": round(wall, 1)}
