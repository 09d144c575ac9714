"""The thesis' Table 5 on our real digits: classify the top-left digit, reconstruct the bottom-right one.

Protocol (thesis §5.3), as far as this machine allows; what differs is said in the notes of every result:

* data: the ``multimnist_recon`` preset (real MNIST digits composed as in Sener & Koltun's MultiMNIST, the
  ``right`` task reconstructs the bottom-right digit alone); model: the preset's LeNet with a 50-wide shared
  representation and one head per task; losses: cross-entropy (the thesis' NLL on log-softmax) and MSE;
* optimizer: the thesis uses SGD with momentum 0.9 over the grid {1e-3, 5e-3, 1e-2, 5e-2, 1e-1}
  (``--optimizer sgd --lrs 0.001,0.005,0.01,0.05,0.1``); the default is the preset's Adam at 1e-3, because
  with SGD the sigmoid decoder needs far more epochs than a CPU run affords (measured on 4,096 images, 3
  epochs: reconstruction MSE 0.225 with SGD at 0.1, 0.038 with Adam). With several rates, each method reports
  the one whose model is best on validation (mean over tasks of validation loss relative to STL's); STL picks
  per task by its own validation loss;
* the thesis trains until ten epochs bring no validation gain; here every model trains ``--epochs`` epochs and
  keeps its best validation epoch (:func:`mamo.session.train_network`);
* the thesis uses ten seeds; here ``--seeds`` (default 3) training seeds on one fixed data draw;
* tensioners: T = 10, α = 0.3 (the thesis' choice), both formulations;
* the Uniform row is mamo's ``equal``, the sum of the gradients, where the logic benchmark finds the thesis'
  uniform rows matching their mean: the same direction at twice the step, which Adam's per-parameter scaling
  all but cancels and SGD does not (compare SGD rows at twice the rate).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

from mamo.bench import learning_rates, positive_int, progress_lines
from mamo.config import DirectionConfig, TensionerConfig, load_config, split_override
from mamo.errors import MamoError
from mamo.resume import flat_settings
from mamo.session import EQUAL, open_session, train_network
from mamo.trainer import OPTIMIZERS, selection_score

PRESET = "multimnist_recon"
# Table 5: method -> (accuracy mean, std, reconstruction MSE mean, std).
THESIS = {
    "STL": (0.9639, 0.0024, 0.0181, 0.0017),
    "Uniform": (0.9714, 0.0018, 0.0418, 0.0021),
    "Min-norm": (0.7393, 0.0213, 0.0552, 0.0042),
    "Central": (0.8473, 0.0107, 0.0350, 0.0010),
    "Min-norm + tensioner": (0.9627, 0.0015, 0.0181, 0.0005),
    "Central + tensioner": (0.9649, 0.0015, 0.0185, 0.0003),
}
METHODS = [("Uniform", "equal", "off"), ("Min-norm", "mgda", "off"), ("Central", "central", "off"),
           *((f"{label} + tensioner", base, formulation) for formulation in ("thesis", "relative")
             for label, base in (("Min-norm", "mgda"), ("Central", "central")))]
QUICK_DATA = ["data.train_size=128", "data.val_size=64", "data.test_size=64"]


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=positive_int, default=None, help="epochs per model (default 10; --quick 1)")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None,
                        help="optimizer (default: the preset's, adam; the thesis used sgd with momentum 0.9)")
    parser.add_argument("--lrs", type=learning_rates, default=None,
                        help="comma-separated learning rates, the best on validation is kept (default: the "
                             "preset's; the thesis' SGD grid is 0.001,0.005,0.01,0.05,0.1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the preset, e.g. --set data.train_size=5000 (repeatable)")


def _mean_std(values: list[float], digits: int = 4) -> str:
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def _best(candidates: list[tuple[float, dict]]) -> tuple[float, dict]:
    """The (lr, result) with the lowest validation score."""
    return min(candidates, key=lambda item: item[1]["score"])


# What the benchmark sets itself, and what sets it instead: a --set of these was recorded in results.json and
# not used.
OWN_SETTINGS = {"train.epochs": "use --epochs", "train.seed": "use --seeds (seeds 0 to N-1)",
                "direction": "the benchmark trains each row's direction itself"}


def _set_keys(text: str) -> list[str]:
    """The dotted keys an override sets: ``train={epochs: 5}`` sets ``train.epochs``."""
    path, value = split_override(text)
    return list(flat_settings(value, ".".join(path)))


def _check_overrides(overrides: list[str], options: dict[str, str]) -> None:
    """Refuse a --set of what the benchmark sets itself, or of what one of its ``options`` (setting -> flag,
    for the flags given) sets; either --set was recorded in results.json and not used."""
    for text in overrides:
        for key in _set_keys(text):
            for own, instead in OWN_SETTINGS.items():
                if key == own or key.startswith(own + "."):
                    raise MamoError(f"--set {key} is set by the multimnist_recon benchmark itself; {instead}.")
            if key in options:
                raise MamoError(f"--set {key} and {options[key]} both set it; keep one of them.")


def run(args: argparse.Namespace) -> dict:
    flags = {"train.lr": ("--lrs", args.lrs), "train.optimizer": ("--optimizer", args.optimizer)}
    _check_overrides(args.overrides, {key: flag for key, (flag, given) in flags.items() if given is not None})
    quick = args.quick
    seeds = list(range(args.seeds or (1 if quick else 3)))
    epochs = args.epochs or (1 if quick else 10)
    optimizer = [f"train.optimizer={args.optimizer}"] if args.optimizer else []
    overrides = [*(QUICK_DATA if quick else []), *optimizer, f"train.device={args.device}", *args.overrides]
    base = load_config(PRESET, overrides)
    lrs = args.lrs or [base.train.lr]
    session = open_session(base, None, progress=False, quiet=True, cache_root=Path(args.out) / ".cache")
    tasks = list(session.data.tasks)
    if [session.data.tasks[t].type for t in tasks] != ["classification", "reconstruction"]:
        raise MamoError(f"the multimnist_recon benchmark needs a classification then a reconstruction task, "
                        f"got {tasks}; do not override data.name.")
    start = time.perf_counter()
    say = progress_lines(start)  # a full run takes long on a CPU

    def train(seed: int, lr: float, direction: DirectionConfig, task_names: list[str] | None = None) -> dict:
        session.config = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=seed, lr=lr))
        trained = train_network(session, epochs, direction, task_names)
        what = f"STL {task_names[0]}" if task_names else f"{direction.name} + {direction.tensioner.formulation}"
        say(f"seed {seed} lr {lr:g} {what}: test {trained.test}")
        return {"test": trained.test, "val": trained.val, "best_epoch": trained.extra["best_epoch"]}

    per_seed: dict[str, list[dict]] = {label: [] for label in ["STL", *(m[0] + "|" + m[2] for m in METHODS)]}
    for seed in seeds:
        stl: dict = {"test": {}, "val": {}, "lr": {}}
        for task in tasks:  # each task alone, at its own best rate
            runs = [(lr, train(seed, lr, EQUAL, [task])) for lr in lrs]
            lr, best = min(runs, key=lambda item: item[1]["val"][task]["loss"])
            stl["test"][task], stl["val"][task], stl["lr"][task] = best["test"][task], best["val"][task], lr
        per_seed["STL"].append(stl)
        for label, name, formulation in METHODS:
            direction = DirectionConfig(name=name, tensioner=TensionerConfig(formulation=formulation, T=10, alpha=0.3))
            runs = []
            for lr in lrs:
                result = train(seed, lr, direction)
                result["score"] = selection_score(result["val"], stl["val"])
                runs.append((lr, result))
            lr, best = _best(runs)
            per_seed[label + "|" + formulation].append({**best, "lr": lr})
    wall = time.perf_counter() - start

    accuracy, mse = (tasks[0], "accuracy"), (tasks[1], "mse")
    rows = []
    for key, results in per_seed.items():
        label, _, formulation = key.partition("|")
        ref = THESIS[label]
        lr_text = ", ".join(f"{r['lr']:g}" if not isinstance(r["lr"], dict) else
                            "/".join(f"{v:g}" for v in r["lr"].values()) for r in results)
        rows.append([label, formulation or "-", lr_text,
                     _mean_std([r["test"][accuracy[0]][accuracy[1]] for r in results]),
                     _mean_std([r["test"][mse[0]][mse[1]] for r in results]),
                     f"{ref[0]:.4f} ± {ref[1]:.4f}", f"{ref[2]:.4f} ± {ref[3]:.4f}"])
    data = base.data
    notes = [
        f"{len(seeds)} training seed(s) (thesis: 10), data seed {data.seed}: {data.train_size} train / "
        f"{data.val_size} val / {data.test_size} test images (thesis: 50,000 / 10,000 / 10,000).",
        f"{base.train.optimizer} (momentum {base.train.momentum} for sgd), batch {base.train.batch_size}, learning "
        f"rates {lrs} (best on validation per method and seed; STL per task; thesis: SGD over 1e-3..1e-1), "
        f"{epochs} epoch(s) per model keeping the best validation epoch (thesis: early stopping, patience 10).",
        f"Backbone: the preset's LeNet ({base.model.backbone}, latent {base.model.latent}, head hidden "
        f"{base.model.head_hidden}); the thesis' decoder differs (its Figure 19). Wall time {wall:.0f} s on "
        f"{session.device}.",
        "Tensioner rows: T = 10, α = 0.3; the thesis' numbers are for its own formulation.",
        "Uniform is mamo's equal, the gradients' sum (the thesis' logic tables match their mean): twice the step "
        "under SGD, about the same under Adam.",
    ]
    return {
        "title": f"Thesis Table 5: top-left digit accuracy ↑ and bottom-right reconstruction MSE ↓ (test, "
                 f"mean ± population std over {len(seeds)} seed(s), as the logic tables)",
        "columns": ["Method", "Tensioner", "lr per seed", f"ours: {tasks[0]} accuracy", f"ours: {tasks[1]} MSE",
                    "thesis: accuracy", "thesis: MSE"],
        "rows": rows,
        "notes": notes,
        "per_seed": per_seed,
        "recon_wall_seconds": round(wall, 1),
    }
