"""The MAMO §4.4 ablations on MultiMNIST: w/o MO, w/o GMK, and the number of detection rounds Z = 0..5.

``--preset`` runs them on another preset (``multimnist_sum``: three tasks, where a GMK's pair is not every
task) and ``--rounds-sweep`` picks the Z rows (none: only MAMO, w/o MO and w/o GMK).

Every variant trains the same number of epochs as its STL/HPS baselines (``train.epochs``): pretraining and
each detection round take the preset's epochs and the final phase gets what is left, so more rounds never means
more training. The first row is the default search itself (the preset's Z). Each
seed's baselines are trained once and shared by its variants (the baseline cache). Rows are mean ± sample std over
seeds of the test metrics' relative change against STL, Δ and win rate (MAMO Table 4 layout).

``--equal-params`` adds two rows at MAMO's parameter count, to tell growth from size: HPS and w/o GMK with the
LeNet's shared representation (``model.latent``) set so that the network has about the parameters of MAMO's
fully grown one (a branch from cell 0). HPS trains as the HPS baseline does; w/o GMK searches without its own
baselines. Every row's Δ is against the same per-seed STL, the one at the preset's width.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import networkx as nx

from mamo import graph as g
from mamo.baselines import cached_baseline
from mamo.bench import positive_int, progress_lines
from mamo.config import Config, SearchConfig, config_from_dict, load_config
from mamo.data import FIXED_SPLITS, load_data
from mamo.errors import MamoError
from mamo.export import load_trained
from mamo.model import compile_model, count_parameters
from mamo.report import delta, metric_columns, relative_changes, win_rate
from mamo.resume import computed_changes
from mamo.runs import checkpointed_command, stderr_on_terminal
from mamo.search import run_search
from mamo.search_plan import epochs_before_final, method_name
from mamo.session import open_session
from mamo.spaces import space_from_spec
from mamo.tasks import parse_tasks
from mamo.writes import write_text_atomically
from mamo.yaml_core import load_yaml


def variants(search: SearchConfig, epochs: int, rounds: Iterable[int]) -> dict[str, list[str]]:
    """Variant name -> overrides. Pretraining and each detection round take the preset's epochs and the final
    phase gets the rest of ``epochs``, so every variant trains as long as its baselines."""
    table = {
        f"MAMO (Z={search.rounds})": [],
        "w/o MO (equal weighting)": ["direction.name=equal", "direction.tensioner.formulation=off"],
        "w/o GMK (task-exclusive modules)": ["search.modules=exclusive"],
    }
    swept = {f"MAMO Z={z}": [f"search.rounds={z}"] for z in rounds if z != search.rounds}
    table.update(swept)
    out = {}
    for name, extra in table.items():
        final = epochs - epochs_before_final(search, _rounds(extra, search.rounds))
        if final < 1:
            raise MamoError(f"the ablation '{name}' leaves {final} final epochs of train.epochs={epochs}; "
                            + ("drop its Z from --rounds-sweep, or " if name in swept else "")
                            + "pass --preset a YAML file with more train.epochs or fewer search.pretrain_epochs / "
                            "search.round_epochs.")
        out[name] = [*extra, f"search.final_epochs={final}"]
    return out


def network_parameters(template: nx.DiGraph, latent: int, modules: str | None = None) -> int:
    """Parameters of ``template``'s LeNet network (same input, tasks, heads) at shared width ``latent``: HPS,
    or with every pair's branch of ``modules`` grown from cell 0."""
    graph = g.build_hps_graph(space_from_spec({**template.graph["space"], "latent": latent}),
                              parse_tasks(template.graph["tasks"], "the ablation's template network"))
    for pair in g.pairs(graph) if modules else []:
        g.grow(graph, (pair, 0), modules)
    return count_parameters(compile_model(graph))


def matching_latent(template: nx.DiGraph, target: int, modules: str | None = None) -> int:
    """The shared width whose network (see :func:`network_parameters`) has the parameter count nearest
    ``target``; the count grows with the width, so a bisection finds it."""
    def count(latent: int) -> int:
        return network_parameters(template, latent, modules)

    low, high = 1, 2
    while count(high) < target:
        low, high = high, high * 2
    while high - low > 1:  # count(low) < target ≤ count(high), or low = 1
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < target else (low, middle)
    return min((low, high), key=lambda latent: abs(count(latent) - target))


def equal_parameter_variants(template: nx.DiGraph, search: SearchConfig, epochs: int) -> dict[str, tuple]:
    """Row name -> (how it trains, overrides) of the two ``--equal-params`` rows, sized to MAMO's fully grown
    network."""
    target = network_parameters(template, template.graph["space"]["latent"], "gmk")
    hps = matching_latent(template, target)
    exclusive = matching_latent(template, target, "exclusive")
    final = epochs - epochs_before_final(search)
    return {
        f"HPS (equal), MAMO's size (latent {hps})": (_hps_at, [f"model.latent={hps}"]),
        f"w/o GMK, MAMO's size (latent {exclusive})": (_search_at, [
            f"model.latent={exclusive}", "search.modules=exclusive", "search.baselines=false",
            f"search.final_epochs={final}"]),
    }


def _hps_at(config: Config, runs_root: Path, progress: bool) -> dict:
    """The HPS baseline procedure (equal weighting, ``train.epochs``) on ``config``'s network; cached."""
    session = open_session(config, None, progress, quiet=True, cache_root=runs_root / ".baselines")
    return cached_baseline(session, "hps", config.train.epochs)


WIDTH_TAG = "_latent"  # in the run folder names of the --equal-params searches, before their width


def _search_at(config: Config, runs_root: Path, progress: bool) -> dict:
    """The search of ``config`` in a run folder named by its seed and width (resumed or read back as ever)."""
    folder = runs_root / f"seed{config.train.seed}-{config.search.modules}{WIDTH_TAG}{config.model.latent}"
    return _variant(config, folder, progress)


def _row(name: str, runs: list[dict], stls: list[dict], tasks: dict, deltas: list[float],
         val_deltas: list[float]) -> list[str]:
    """A table row: mean ± std over seeds of each metric's change (+ is better), Δ on test and on validation
    (``deltas``, ``val_deltas``, one per seed) and win rate against that seed's STL."""
    pairs = list(zip(runs, stls, strict=True))
    per_seed = [relative_changes(r["tasks"], s["tasks"], tasks) for r, s in pairs]
    changes = [_mean_std([seed[(t, m)] for seed in per_seed]) for t, m, _ in metric_columns(tasks)]
    return [name, *changes, _mean_std(deltas), _mean_std(val_deltas),
            f"{statistics.mean(win_rate(r['tasks'], s['tasks'], tasks) for r, s in pairs):.2f}",
            f"{statistics.mean(r.get('gmk_modules', 0) for r in runs):.1f}",
            f"{statistics.mean(r['params'] for r in runs):,.0f}"]


def _rounds(overrides: list[str], default: int) -> int:
    for item in overrides:
        if item.startswith("search.rounds="):
            return int(item.split("=", 1)[1])
    return default


def _per_seed(deltas: dict[str, list[float]]) -> str:
    """Each row's Δ per seed, for the notes: ``name: +1.00 / -0.50; ...``."""
    return "; ".join(f"{name}: " + " / ".join(f"{d:+.2f}" for d in values) for name, values in deltas.items())


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="multimnist",
                        help="the preset every variant starts from (default: multimnist; multimnist_sum has "
                             "three tasks)")
    parser.add_argument("--rounds-sweep", type=int, nargs="*", default=None, metavar="Z",
                        help="the numbers of detection rounds of the Z rows (default: 0 to 5, --quick 0 1; "
                             "give none to leave the Z rows out)")
    parser.add_argument("--train-size", type=positive_int, default=None,
                        help="training images per variant (default: the preset's)")
    parser.add_argument("--equal-params", action="store_true",
                        help="add HPS and w/o GMK at MAMO's parameter count (shared width model.latent)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="the --out folder of a stopped ablation: finished variants are read from it, a "
                             "variant stopped part-way resumes from its checkpoint, the rest train there")


RECORD = "ablation.json"  # the options an ablation folder was started with, for its --resume


def _options_text(options: dict) -> str:
    """The recorded options as a command line gives them."""
    parts = [f"--preset {options['preset']}", f"--seeds {options['seeds']}"]
    if options["quick"]:
        parts.append("--quick")
    parts.append(" ".join(["--rounds-sweep", *map(str, options["rounds_sweep"])]))
    if options["train_size"]:
        parts.append(f"--train-size {options['train_size']}")
    if options["equal_params"]:
        parts.append("--equal-params")
    return " ".join(parts)


def _check_resumed_options(folder: Path, options: dict, expected: set[str]) -> None:
    """Refuse to continue an ablation with options that change its variants or leave some of its rows out (its
    table would silently lose them); more seeds, Z rows or the equal-parameter rows may be added. ``expected``:
    the run folders this command trains or reads, for a folder that has no record of its options."""
    recorded_path = folder / RECORD
    if not recorded_path.is_file():  # started before the options were recorded: its run folders tell
        _check_unrecorded_folder(folder, options, expected)
        return
    try:
        recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
        keys = ("preset", "quick", "train_size", "seeds", "rounds_sweep", "equal_params")
        if not isinstance(recorded, dict) or any(key not in recorded for key in keys):
            raise ValueError("not the options an ablation records")
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        damaged = f"{recorded_path} is damaged ({exc}), so the options this ablation was started with are unknown"
        raise MamoError(f"{damaged}; restore the file, or delete it to have the folder's run names checked "
                        "instead.") from exc
    same = all(recorded[key] == options[key] for key in ("preset", "quick", "train_size"))
    adds = (options["seeds"] >= recorded["seeds"] and set(options["rounds_sweep"]) >= set(recorded["rounds_sweep"])
            and options["equal_params"] >= recorded["equal_params"])
    if not (same and adds):
        raise MamoError(f"{folder} holds an ablation with {_options_text(recorded)} but this command asks for "
                        f"{_options_text(options)}; resume it with the options it was started with (more seeds, "
                        "Z rows or --equal-params may be added), or pass a new --out.")


def _check_unrecorded_folder(folder: Path, options: dict, expected: set[str]) -> None:
    """An ablation started before its options were recorded: refuse when it holds runs this command would leave
    out of its table (its seeds and variants are in its run folders' names)."""
    left_out = sorted(run.name for run in (folder / "runs").glob("seed*") if ".incomplete-" not in run.name
                      and run.name not in expected and not (options["equal_params"] and WIDTH_TAG in run.name))
    if left_out:
        raise MamoError(f"{folder} holds runs this command would leave out of its table ({', '.join(left_out)}); "
                        "resume it with the options it was started with (--seeds, --rounds-sweep, --equal-params), "
                        "or pass a new --out.")


def _run_name(seed: int, variant: str) -> str:
    return f"seed{seed}-{variant.split(' (')[0].replace(' ', '_').replace('/', '')}"


def _variant(config: Config, run_dir: Path, progress: bool) -> dict:
    """One variant's metrics: read when it finished before, resumed when it stopped after a checkpoint."""
    saved = run_dir / "config.yaml"  # what a finished or a resumed run trains with
    before = config_from_dict(load_yaml(saved.read_text(encoding="utf-8")), str(saved)) if saved.is_file() else None
    # Where it runs and how often it saves may change (a resumed ablation on another --device), nothing else.
    if before is not None and computed_changes(before.to_dict(), config.to_dict()):
        raise MamoError(f"{run_dir} was trained with another configuration than this ablation asks for; resume "
                        "with the same options (--preset, --seeds, --train-size, --quick) or start a new --out.")
    if (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    if checkpointed_command(run_dir) == "search":
        return run_search(config, run_dir, progress=progress, quiet=True, resume=True, loggers=False)
    if run_dir.exists():  # stopped before its first checkpoint: kept aside, never overwritten
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"))
    return run_search(config, run_dir, progress=progress, quiet=True, loggers=False)


def _announcer(total: int) -> Callable[[int, str], None]:
    """A line on stderr as each of ``total`` variants starts: the searches run quietly (their lines would
    interleave), so a --quick run showed nothing for 12 s and a full one epoch bars that never said which variant
    or seed they trained."""
    say, started = progress_lines(), 0

    def announce(seed: int, name: str) -> None:
        nonlocal started
        started += 1
        say(f"seed {seed}: {name} ({started} of {total})")

    return announce


def run(args: argparse.Namespace) -> dict:
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    preset = args.preset
    # Datasets of fixed splits (logic, concave) use no sizes (a run notes them unused): --quick shortens training.
    # A preset's own smaller size stays (a small NYUv2-format folder could not hold out 128 images).
    data = load_config(preset).data
    sizes = [] if data.name in FIXED_SPLITS else [
        f"data.{split}_size={min(cap, getattr(data, f'{split}_size') or cap)}"
        for split, cap in (("train", 512), ("val", 128), ("test", 128))]
    shared = [*sizes, "train.epochs=5", "search.pretrain_epochs=2", "search.round_epochs=1"] if args.quick else []
    if args.train_size:
        shared.append(f"data.train_size={args.train_size}")
    shared.append(f"train.device={args.device}")
    base = load_config(preset, shared)
    rounds = args.rounds_sweep
    if rounds is None:
        rounds = range(0, 2) if args.quick else range(0, 6)
    if any(z < 0 for z in rounds):
        raise MamoError(f"--rounds-sweep takes numbers of detection rounds ≥ 0, got {list(rounds)}; fix the list.")
    table = variants(base.search, base.train.epochs, rounds)
    if args.equal_params and len(tasks := load_data(base.data).tasks) != 2:
        raise MamoError(f"--equal-params sizes networks by a fully grown pair, which needs two tasks, and preset "
                        f"'{preset}' has {len(tasks)}; drop --equal-params or use a two-task preset.")
    main = next(iter(table))
    folder = Path(args.out)  # the bench command made it (or it is the resumed folder)
    runs_root = Path(args.resume) / "runs" if args.resume else folder / "runs"
    if args.resume and not runs_root.is_dir():
        raise MamoError(f"--resume {args.resume} holds no ablation runs (no runs/ folder); pass the --out folder "
                        "of the ablation to continue.")
    options = {"preset": preset, "seeds": len(seeds), "quick": bool(args.quick), "rounds_sweep": list(rounds),
               "train_size": args.train_size, "equal_params": args.equal_params}
    if args.resume:
        _check_resumed_options(Path(args.resume), options, {_run_name(seed, name) for seed in seeds for name in table})
    record = Path(args.resume or folder) / RECORD
    # A folder without a record gets one only once a run of it has matched this command's configuration: a
    # refused resume must not leave its options behind as the folder's.
    unrecorded = bool(args.resume) and not record.is_file()
    if not unrecorded:
        write_text_atomically(record, json.dumps(options))
    results: dict[str, list[dict]] = {name: [] for name in table}
    run_names: list[str] = []
    progress = stderr_on_terminal()  # epoch bars on a terminal; in a pipe or a file the lines below alone
    announce = _announcer(len(seeds) * (len(table) + 2 * bool(args.equal_params)))
    for seed in seeds:
        for name, overrides in table.items():
            config = load_config(preset, [*shared, f"train.seed={seed}", f"data.seed={seed}", *overrides])
            run_names.append(_run_name(seed, name))
            announce(seed, name)
            results[name].append(_variant(config, runs_root / run_names[-1], progress=progress))
            if unrecorded:
                write_text_atomically(record, json.dumps(options))
                unrecorded = False
    template = load_trained(runs_root / run_names[0])
    tasks = template.tasks
    if args.equal_params:
        for name, (train, overrides) in equal_parameter_variants(template.graph, base.search,
                                                                  base.train.epochs).items():
            results[name] = []
            for seed in seeds:
                announce(seed, name)
                config = load_config(preset, [*shared, f"train.seed={seed}", f"data.seed={seed}", *overrides])
                results[name].append(train(config, runs_root, progress))
    stl = [r["baselines"]["stl"] for r in results[main]]
    columns = [(task, metric) for task, metric, _ in metric_columns(tasks)]
    header = ["Method", *(f"{t} {m} (% vs STL)" for t, m in columns), "Δ %", "val Δ %", "Win", "GMKs", "Params"]
    every = {"HPS (equal)": [r["baselines"]["hps"] for r in results[main]], **results}
    # Test Δ and validation Δ (what a choice between the variants may read), each against the seed's STL there.
    deltas, val_deltas = ({name: [delta(r[split], s[split], tasks) for r, s in zip(runs, stl, strict=True)]
                           for name, runs in every.items()} for split in ("tasks", "val"))
    rows = [_row(name, runs, stl, tasks, deltas[name], val_deltas[name]) for name, runs in every.items()]
    return {
        # The direction named: the rows say "MAMO (Z=2)", and the preset may set any of them (a helper's audit).
        "title": f"MAMO ablations on {preset}, {method_name(base)} (seeds {seeds}: mean ± sample std; every variant "
                 f"trains {base.train.epochs} epochs)",
        "columns": header,
        "rows": rows,
        "notes": ["STL test metrics per seed: " + "; ".join(
                      f"seed {seed}: " + ", ".join(f"{t} {m} {s['tasks'][t][m]:.4f}" for t, m in columns)
                      for seed, s in zip(seeds, stl, strict=True)),
                  f"Δ % per seed (seeds {', '.join(map(str, seeds))}): {_per_seed(deltas)}",
                  f"validation Δ % per seed: {_per_seed(val_deltas)}",
                  f"run folders under {runs_root}"],
    }
