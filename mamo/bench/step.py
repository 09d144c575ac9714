"""``mamo bench step``: the time and memory of one training step per method, side by side in one process.

Per setup (LeNet m = 2 on 28×28; timm ResNet-18 m = 3 and m = 5 on 64×64; batch 32, on CUDA also 128), built
with mamo's own search space, graph and model and synthetic classification tasks on random inputs, every
method below runs complete steps (forward, backward passes, optimizer update) on the same model and batch.
Each method is timed in a session of its own beside the two references, equal and the floor: per round one
step of each of the three in a shuffled order, so load drifts hit them alike; a ratio is the median over
rounds of the method's time over the reference's in the same round (see :func:`measure` for why sessions).

Rows: ``equal`` (linear scalarisation, one backward), the floor ``forward + m backward`` (and the optimizer update,
which every row pays; ``optimizer update alone`` times it, so the floor target can leave it out), ``mgda`` (exact,
by the loop and by the batched gradient path; the other rows take what ``auto`` picks), ``mgda + tensioner`` (and
by the other gradient layout), ``central + tensioner``, ``pcgrad``, ``cagrad``, ``upgrad``, ``imtl-g``,
``aligned-mtl``, ``mgda-ub``, ``conflict
statistics`` (an equal-weight step that also computes the per-cell Gram blocks and updates the conflict counts),
``equal`` and ``mgda + tensioner`` with ``cuda_graphs`` on (CUDA only),
and the peers torchjd (``mtl_backward`` + ``jac_to_grad`` with its MGDA, by its default vmap path and with
``parallel_chunk_size=1``) and LibMTL (its ``MGDA`` weighting on our model) when installed, with their versions.
Memory: the peak added by a method's first step (which allocates its buffers) on top of what was resident before it
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process' resident-set high-water mark, reset through
/proc/self/clear_refs, after returning freed heap to the system). For a ``CUDA graphs`` row that first step is an
eager warm-up step on a side stream (the graph is recorded at the third), so its memory holds no graph.
The tables, targets and notes are made from the rounds in :mod:`mamo.bench.step_tables`. A line on stderr names each
setup as it starts and each method as its session ends, never inside a timed step; a stopped run saves the tables
of the setups it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from mamo import step as step_module
from mamo import task_gradients
from mamo.bench import Interrupted, positive_int, progress_lines, thread_count
from mamo.bench.peers import Step, Unavailable, libmtl_step, torchjd_step
from mamo.bench.resources import CLOCKS, memory_mark, memory_peak, sync
from mamo.bench.solver import solver_table
from mamo.bench.step_tables import EQUAL, FLOOR, UPDATE, step_notes, step_table, targets
from mamo.config import DirectionConfig, ModelConfig, TensionerConfig
from mamo.conflicts import ConflictStats
from mamo.directions import create_direction
from mamo.graph import build_hps_graph
from mamo.losses import LossFunction
from mamo.model import compile_model
from mamo.runs import stderr_on_terminal
from mamo.session import make_current
from mamo.spaces import create_space, memory_failures_named
from mamo.step import TrainStep
from mamo.task_gradients import LAYOUTS, ParameterPartition, resolve_layout
from mamo.tasks import bind_loss, parse_tasks
from mamo.trainer import intra_op_threads, resolve_device

SHARED_OPTIONS = ("quick", "device")  # timing, not training: no seeds
QUICK = "LeNet m = 2 and timm's test_resnet m = 3 at batch 4, 2 timed rounds: ratios of no meaning"

# key -> (label, backbone, input shape, number of tasks). --quick is a smoke run of seconds: LeNet and timm's
# tiny test ResNet (convolution, batch-norm, pooling like ResNet-18, 0.4 M parameters) at batch 4.
SETUPS = {
    "lenet-m2": ("LeNet m=2", "lenet", (1, 28, 28), 2),
    "resnet18-m3": ("ResNet-18 m=3", "timm:resnet18", (3, 64, 64), 3),
    "resnet18-m5": ("ResNet-18 m=5", "timm:resnet18", (3, 64, 64), 5),
}
# Not run by default; they place the crossing of the two gradient paths on a GPU (BATCHED_PATH).
MORE_SETUPS = {
    "lenet-m3": ("LeNet m=3", "lenet", (1, 28, 28), 3),
    "lenet-m5": ("LeNet m=5", "lenet", (1, 28, 28), 5),
    "resnet18-m2": ("ResNet-18 m=2", "timm:resnet18", (3, 64, 64), 2),
}
QUICK_SETUPS = {
    "lenet-m2": ("LeNet m=2", "lenet", (1, 28, 28), 2),
    "test_resnet-m3": ("timm test_resnet m=3 (smoke)", "timm:test_resnet", (3, 32, 32), 3),
}
BATCHES = {"cpu": [32], "cuda": [32, 128]}


@dataclass
class Setup:
    model: torch.nn.Module
    x: torch.Tensor
    targets: dict[str, torch.Tensor]
    part: ParameterPartition
    precision: str
    loss_functions: list[LossFunction] = field(init=False)

    def __post_init__(self) -> None:
        # Bound once, as TrainStep binds them: the floor must not pay for binding at every step.
        self.loss_functions = [bind_loss(self.model.tasks[t], self.x.device) for t in self.part.tasks]

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)

    def autocast(self) -> contextlib.AbstractContextManager:
        return step_module.PRECISIONS[self.precision](self.x.device)

    def losses(self, predictions: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [loss(predictions[t].float(), self.targets[t])
                for t, loss in zip(self.part.tasks, self.loss_functions, strict=True)]



def _mamo(name: str, formulation: str = "off", **kwargs) -> Callable[[Setup], Step]:
    def factory(setup: Setup) -> Step:
        config = DirectionConfig(name=name, tensioner=TensionerConfig(formulation=formulation, T=1))
        step = TrainStep(setup.model, create_direction(config), setup.optimizer(), precision=setup.precision,
                         **kwargs)
        return lambda: step(setup.x, setup.targets)

    return factory


def _floor(setup: Setup) -> Step:
    """Forward, m backward passes (each task's gradients of its inputs set as ``.grad``) and the optimizer's
    update: what an exact per-task-gradient step does before it combines anything. Like mamo's exact step it
    sets gradients instead of accumulating them, so it has no zero_grad either."""
    optimizer, part = setup.optimizer(), setup.part
    m = len(part.tasks)

    def step() -> None:
        with setup.autocast():
            predictions = setup.model(setup.x)
        for t, loss in enumerate(setup.losses(predictions)):
            for param, grad in zip(part.inputs[t], torch.autograd.grad(loss, part.inputs[t], retain_graph=t < m - 1),
                                   strict=True):
                param.grad = grad
        optimizer.step()

    return step


def _update(setup: Setup) -> Step:
    """The optimizer's update alone, on gradients of every trainable parameter: every row pays it once."""
    optimizer = setup.optimizer()
    params = [p for p in setup.model.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for p in params]  # zeros: the same arithmetic, and the model does not drift

    def step() -> None:
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        optimizer.step()

    return step


def _graphed(name: str, formulation: str = "off") -> Callable[[Setup], Step]:
    """A mamo step with ``cuda_graphs`` on: its device half replayed from a CUDA graph (on a CUDA device only)."""

    def factory(setup: Setup) -> Step:
        if setup.x.device.type != "cuda":
            raise Unavailable("CUDA graphs need a CUDA device (bench step --device cuda)")
        return _mamo(name, formulation, cuda_graphs=True)(setup)

    return factory


def _conflicts(setup: Setup) -> Step:
    step = _mamo("equal", collect_gramians=True)(setup)
    stats = ConflictStats.for_graph(setup.model.graph)
    return lambda: stats.update(step().node_gramians)


def _other_layout(formulation: str) -> Callable[[Setup], Step]:
    """MGDA + tensioner with the gradient layout that ``auto`` does not pick for this setup."""

    def factory(setup: Setup) -> Step:
        auto = resolve_layout("auto", setup.x.device, setup.part.size, len(setup.part.tasks))
        other = next(layout for layout in LAYOUTS if layout != auto)
        return _mamo("mgda", formulation, gradient_layout=other)(setup)

    return factory


def methods() -> dict[str, Callable[[Setup], Step]]:
    """Row name -> factory of a step closure; ``equal`` first, the reference of every ratio."""
    tensioner = TensionerConfig().formulation
    return {
        EQUAL: _mamo("equal"),
        FLOOR: _floor,
        UPDATE: _update,
        "mgda (loop path)": _mamo("mgda", gradient_path="loop"),
        "mgda (batched path)": _mamo("mgda", gradient_path="batched"),
        "mgda + tensioner": _mamo("mgda", tensioner),
        "mgda + tensioner (other layout)": _other_layout(tensioner),
        "central + tensioner": _mamo("central", tensioner),
        "pcgrad": _mamo("pcgrad"),
        "cagrad": _mamo("cagrad"),
        "upgrad": _mamo("upgrad"),
        "imtl-g": _mamo("imtl-g"),
        "aligned-mtl": _mamo("aligned-mtl"),
        "mgda-ub": _mamo("mgda", gradients="ub"),
        "conflict statistics": _conflicts,
        "equal (CUDA graphs)": _graphed("equal"),
        "mgda + tensioner (CUDA graphs)": _graphed("mgda", tensioner),
        "torchjd mgda": torchjd_step(None),
        "torchjd mgda (chunk 1)": torchjd_step(1),
        "libmtl mgda": libmtl_step,
    }


# ----------------------------------------------------------------------------------------------- measuring
def build_setup(backbone: str, shape: tuple, m: int, batch: int, device: torch.device, precision: str) -> Setup:
    tasks = parse_tasks({f"task{t}": {"type": "classification", "classes": 10} for t in range(m)}, "bench step")
    space = create_space(ModelConfig(backbone=backbone), shape)
    model = compile_model(build_hps_graph(space, tasks), seed=0, device=device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    targets = {t: torch.randint(0, 10, (batch,), generator=gen).to(device) for t in tasks}
    return Setup(model, x, targets, ParameterPartition(model), precision)


def _first_call(step: Step, setup: Setup, device: torch.device) -> dict:
    """Run a step once (it allocates its persistent buffers then): its peak added memory, or why it failed."""
    setup.model.zero_grad(set_to_none=True)
    base = memory_mark(device)
    try:
        step()
        sync(device)
    except (RuntimeError, TimeoutError) as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    return {"memory": memory_peak(device, base), "times": [], EQUAL: [], FLOOR: []}


def measure(setup: Setup, device: torch.device, warmup: int, rounds: int | None,
            clock: str, label: str = "step", say: Callable[[str], None] = lambda text: None
            ) -> tuple[dict[str, dict], int]:
    """Per method: ``times`` (seconds), paired ratios to equal and the floor, ``memory`` (MiB), or ``error``.

    Each method runs in its own session of rounds, one step each of equal, the floor and the method in a
    shuffled order, and is released afterwards: in one process, a peer's large transient allocations (vmap,
    per-task gradient lists) otherwise slow whichever step follows it (measured: exact MGDA read 1.09× the
    floor interleaved with torchjd, LibMTL and the batched path, 1.00× in a session of its own), and a
    training run never mixes methods. ``rounds`` None: as many as fit 2 s of equal steps, 10 to 200. ``say``
    gets a line per method as its session ends, between sessions, where no step is timed.
    """
    factories = methods()
    warm = factories[EQUAL](setup)
    for _ in range(2):  # process-wide first-call costs (kernels, caches) belong to no method
        warm()
    del warm
    base = {name: factories.pop(name)(setup) for name in (EQUAL, FLOOR)}
    out = {name: _first_call(step, setup, device) for name, step in base.items()}
    sync(device)
    start = time.perf_counter()
    base[EQUAL]()
    sync(device)
    rounds = rounds or min(200, max(10, int(2.0 / max(time.perf_counter() - start, 1e-6))))
    tick, order = CLOCKS[clock], random.Random(0)
    # A bar on a terminal, one step per method (a ResNet-18 setup is minutes): drawn between the timed sessions.
    for k, (name, factory) in enumerate(tqdm(factories.items(), desc=label, unit="method", leave=False,
                                             disable=not stderr_on_terminal()), 1):
        def done(text: str, name: str = name, k: int = k) -> None:
            say(f"{label}: {name}: {text} ({k} of {len(factories)})")

        try:
            step = factory(setup)
        except Unavailable as exc:
            out[name] = {"error": str(exc)}
            done(f"not run: {exc}")
            continue
        out[name] = _first_call(step, setup, device)
        if "error" in out[name]:
            done(f"not run: {out[name]['error']}")
            continue
        session = {**base, name: step}
        for _ in range(warmup):
            for run in session.values():
                run()
        for _ in range(rounds):
            names = list(session)
            order.shuffle(names)
            times = {}
            for key in names:
                sync(device)
                begin = tick()
                session[key]()
                sync(device)
                times[key] = tick() - begin
            for key, elapsed in times.items():
                out[key]["times"].append(elapsed)
                out[key][EQUAL].append(elapsed / times[EQUAL])
                out[key][FLOOR].append(elapsed / times[FLOOR])
        del session, step
        gc.collect()
        done(f"{statistics.median(out[name]['times']) * 1e3:.2f} ms, {statistics.median(out[name][EQUAL]):.2f}× equal")
    return out, rounds


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=list(step_module.PRECISIONS), default="fp32",
                        help="forward precision of every row (bf16: autocast; gradients stay float32)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or this process' CPU time (CPU only: steadier on a shared machine; "
                             "use it with --threads 1)")
    parser.add_argument("--threads", type=thread_count, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="timed rounds per setup (default: 2 s of equal steps, 10 to 200; --quick 2)")
    parser.add_argument("--setups", nargs="+", default=None, choices=list({**SETUPS, **MORE_SETUPS, **QUICK_SETUPS}),
                        help=f"setups to run (default: {', '.join(SETUPS)}; --quick: {', '.join(QUICK_SETUPS)})")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=None,
                        help="batch sizes (default 32 on CPU, 32 and 128 on CUDA; --quick 4)")


def _chosen(keys: list[str] | None, quick: bool) -> list[tuple]:
    table = {**SETUPS, **MORE_SETUPS, **QUICK_SETUPS}
    return [table[key] for key in keys] if keys else list((QUICK_SETUPS if quick else SETUPS).values())


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    make_current(device)
    clock = "wall" if device.type == "cuda" else args.clock  # CPU time says nothing about a GPU's work
    quick = args.quick
    rounds = args.rounds or (2 if quick else None)
    batches = args.batch_sizes or ([4] if quick else BATCHES.get(device.type, [32]))
    chosen = [(*setup, batch) for setup in _chosen(args.setups, quick) for batch in batches]
    tables, target_rows, raw = [], [], {}
    say = progress_lines()
    with intra_op_threads(args.threads):
        threads = torch.get_num_threads()
        try:
            for k, (label, backbone, shape, m, batch) in enumerate(chosen, 1):
                say(f"{label}, batch {batch} (setup {k} of {len(chosen)})")
                with memory_failures_named(f"{label} at batch {batch}", "pass smaller --batch-sizes"):
                    setup = build_setup(backbone, shape, m, batch, device, args.precision)
                    results, done = measure(setup, device, warmup=1 if quick else 3, rounds=rounds, clock=clock,
                                            label=f"{label}, batch {batch}", say=say)
                layout = resolve_layout("auto", device, setup.part.size, m)
                path = task_gradients.resolve_gradient_path("auto", device, setup.part.size, m, args.precision)
                title = (f"{label}, {'×'.join(map(str, shape[1:]))}, batch {batch} ({setup.part.size / 1e6:.3g} M "
                         f"shared parameters, '{layout}' gradient layout, '{path}' gradient path; {done} rounds "
                         "per method)")
                tables.append(step_table(title, results))
                target_rows += targets(label, results, device, args.precision, batch)
                raw[f"{label} batch {batch}"] = results
                del setup
            say("the exact min-norm solver")
            solver, at_ten = solver_table(quick)
        except KeyboardInterrupt:
            if not raw:
                raise
            stopped = (f"Stopped after {len(raw)} of {len(chosen)} setups (Ctrl-C or a stop signal): the tables hold "
                       "the finished ones, without the min-norm solver's.")
            raise Interrupted(_result(tables, target_rows, raw, [stopped, *step_notes(
                device, threads, args.precision, clock, rounds, raw)])) from None
    target_rows.append(["min-norm", "exact solve at m = 10 (µs, median)", "≤ 50", at_ten])
    return _result([*tables, solver], target_rows, raw, step_notes(device, threads, args.precision, clock, rounds, raw))


def _result(tables: list[dict], target_rows: list[list], raw: dict[str, dict], notes: list[str]) -> dict:
    """The benchmark's result: the setups' (and the solver's) tables, then the targets."""
    targets_table = {"title": "Targets (issue 3; the ≤ 1.6 row is issue 7's H100 target)",
                     "columns": ["setup", "quantity", "target", "measured"], "rows": target_rows}
    # Per method its step times and its per-round ratios to equal and the floor: the × columns are their medians.
    raw_times = {k: {n: {key: r[key] for key in ("times", EQUAL, FLOOR)} for n, r in v.items() if "error" not in r}
                 for k, v in raw.items()}
    return {"title": "Step time per method", "tables": [*tables, targets_table], "notes": notes,
            "raw_times": raw_times}
