"""The MAMO §4.4 ablations on MultiMNIST: w/o MO, w/o GMK, and the number of detection rounds Z = 0..5.

Every variant trains the same number of epochs as its STL/HPS baselines (``train.epochs``): pretraining and
each detection round take the preset's epochs and the final phase gets what is left, so more rounds never means
more training. The first row is the default search itself (the preset's Z). Each
seed's baselines are trained once and shared by its variants (the baseline cache). Rows are mean ± std over
seeds of the test metrics' relative change against STL, Δ and win rate (MAMO Table 4 layout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mamo.checkpoint import latest_checkpoint
from mamo.config import SearchConfig, config_from_dict, load_config, load_yaml
from mamo.errors import MamoError
from mamo.export import load_trained
from mamo.report import delta, win_rate
from mamo.search import run_search


def variants(search: SearchConfig, epochs: int, rounds: range) -> dict[str, list[str]]:
    """Variant name -> overrides. Pretraining and each detection round take the preset's epochs and the final
    phase gets the rest of ``epochs``, so every variant trains as long as its baselines."""
    table = {
        f"MAMO (Z={search.rounds})": [],
        "w/o MO (equal weighting)": ["direction.name=equal", "direction.tensioner.formulation=off"],
        "w/o GMK (task-exclusive modules)": ["search.modules=exclusive"],
    }
    table.update({f"MAMO Z={z}": [f"search.rounds={z}"] for z in rounds if z != search.rounds})
    out = {}
    for name, extra in table.items():
        final = epochs - search.pretrain_epochs - search.round_epochs * _rounds(extra, search.rounds)
        if final < 1:
            raise MamoError(f"the ablation '{name}' leaves {final} final epochs of train.epochs={epochs}; raise "
                            "train.epochs or lower search.pretrain_epochs / search.round_epochs.")
        out[name] = [*extra, f"search.final_epochs={final}"]
    return out


def _rounds(overrides: list[str], default: int) -> int:
    for item in overrides:
        if item.startswith("search.rounds="):
            return int(item.split("=", 1)[1])
    return default


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-size", type=int, default=None,
                        help="MultiMNIST training images per variant (default: the preset's 20,000)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="the --out folder of a stopped ablation: finished variants are read from it, a "
                             "variant stopped part-way resumes from its checkpoint, the rest train there")


def _variant(config, run_dir: Path, progress: bool) -> dict:
    """One variant's metrics: read when it finished before, resumed when it stopped after a checkpoint."""
    saved = run_dir / "config.yaml"  # what a finished or a resumed run trains with
    if saved.is_file() and config_from_dict(load_yaml(saved.read_text()), str(saved)).to_dict() != config.to_dict():
        raise MamoError(f"{run_dir} was trained with another configuration than this ablation asks for; resume "
                        "with the same options (--seeds, --train-size, --quick) or start a new --out.")
    if (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text())
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return run_search(config, run_dir, progress=progress, quiet=True, resume=True, loggers=False)
    if run_dir.exists():  # stopped before its first checkpoint: kept aside, never overwritten
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"))
    return run_search(config, run_dir, progress=progress, quiet=True, loggers=False)


def run(args: argparse.Namespace) -> dict:
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    quick = ["data.train_size=512", "data.val_size=128", "data.test_size=128", "train.epochs=5",
             "search.pretrain_epochs=2", "search.round_epochs=1"] if args.quick else []
    if args.train_size:
        quick.append(f"data.train_size={args.train_size}")
    base = load_config("multimnist", quick)
    rounds = range(0, 2) if args.quick else range(0, 6)
    table = variants(base.search, base.train.epochs, rounds)
    main = next(iter(table))
    folder = Path(args.out) if getattr(args, "out", None) else Path(tempfile.mkdtemp(prefix="mamo-ablation-"))
    runs_root = Path(args.resume) / "runs" if getattr(args, "resume", None) else folder / "runs"
    if getattr(args, "resume", None) and not runs_root.is_dir():
        raise MamoError(f"--resume {args.resume} holds no ablation runs (no runs/ folder); pass the --out folder "
                        "of the ablation to continue.")
    results: dict[str, list[dict]] = {name: [] for name in table}
    run_names: list[str] = []
    for seed in seeds:
        for name, overrides in table.items():
            config = load_config("multimnist", [*quick, f"train.seed={seed}", f"data.seed={seed}", *overrides])
            run_names.append(f"seed{seed}-{name.split(' (')[0].replace(' ', '_').replace('/', '')}")
            results[name].append(_variant(config, runs_root / run_names[-1], progress=not args.quick))
    first = next(iter(results.values()))[0]
    columns = [(task, metric) for task, values in first["tasks"].items() for metric in values if metric != "loss"]
    header = ["Method", *(f"{t} {m} (% vs STL)" for t, m in columns), "Δ %", "Win", "GMKs", "Params"]
    rows = []
    for name, runs in results.items():
        changes = []
        for task, metric in columns:
            per_seed = [100.0 * (r["tasks"][task][metric] - r["baselines"]["stl"]["tasks"][task][metric])
                        / r["baselines"]["stl"]["tasks"][task][metric] for r in runs]
            changes.append(_mean_std(per_seed))
        rows.append([name, *changes, _mean_std([r["delta"] for r in runs]),
                     f"{statistics.mean(r['win_rate'] for r in runs):.2f}",
                     f"{statistics.mean(r['gmk_modules'] for r in runs):.1f}",
                     f"{statistics.mean(r['params'] for r in runs):.0f}"])
    hps = [r["baselines"]["hps"] for r in results[main]]
    stl = [r["baselines"]["stl"] for r in results[main]]
    tasks = load_trained(runs_root / run_names[0]).tasks
    pairs = list(zip(hps, stl, strict=True))
    rows.insert(0, [
        "HPS (equal)",
        *(_mean_std([100.0 * (h["tasks"][t][m] - s["tasks"][t][m]) / s["tasks"][t][m] for h, s in pairs])
          for t, m in columns),
        _mean_std([delta(h["tasks"], s["tasks"], tasks) for h, s in pairs]),
        f"{statistics.mean(win_rate(h['tasks'], s['tasks'], tasks) for h, s in pairs):.2f}",
        "0",
        str(hps[0]["params"]),
    ])
    return {
        "title": f"MAMO ablations on MultiMNIST (seeds {seeds}; every variant trains {base.train.epochs} epochs)",
        "columns": header,
        "rows": rows,
        "notes": ["STL test metrics per seed: " + "; ".join(
                      f"seed {seed}: " + ", ".join(f"{t} {m} {s['tasks'][t][m]:.4f}" for t, m in columns)
                      for seed, s in zip(seeds, stl, strict=True)),
                  f"run folders under {runs_root}"],
    }
