"""``mamo bench NAME``: run one benchmark, print its tables and save them as markdown and JSON.

A benchmark is a module named in :data:`BENCHES`, imported only when chosen (so one benchmark's imports never
slow or break another). It exposes ``run(args) -> dict`` and optionally ``add_options(parser)`` for its own
flags. The result holds ``title``, ``columns``, ``rows`` and ``notes`` (one table), or ``tables`` (a list of
``{title, columns, rows}``), plus anything else worth keeping in the JSON. Every benchmark gets ``--out``
(``args.out`` is the created output folder) and of the shared options ``--quick``, ``--seeds`` and ``--device``
those its ``SHARED_OPTIONS`` names (default: all three), so none is accepted and then ignored. While it runs, a
benchmark names its parts on stderr through :func:`progress_lines`; one stopped part-way may raise
:class:`Interrupted` with the tables of what it finished, which are saved as a finished run's are.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from mamo.errors import MamoError
from mamo.runs import claim_new_folder, cli, refuse_file_above, table_lines
from mamo.writes import write_text_atomically

BENCHES: dict[str, str] = {
    "logic": "mamo.bench.logic",
    "logic3": "mamo.bench.logic3",
    "multimnist_recon": "mamo.bench.recon",
    "step": "mamo.bench.step",
    "ablation": "mamo.bench.ablation",
}
BENCH_ROOT = Path("runs") / "bench"
SHARED_OPTIONS = ("quick", "seeds", "device")  # a benchmark's SHARED_OPTIONS names those it reads
QUICK = "few seeds, a small grid, short training"  # what --quick cuts, unless a benchmark's QUICK says otherwise


def add_arguments_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help=f"the benchmark: {', '.join(BENCHES)}")
    options = parser.add_argument("options", nargs=argparse.REMAINDER, default=[],
                                  help="--quick, --seeds N, --device auto|cpu|cuda, --out DIR and the benchmark's "
                                       "own options (mamo bench NAME --help lists them)")
    options.required = False  # Python 3.11 requires a REMAINDER positional: a bare `bench` named it as missing too


def load_bench(name: str) -> ModuleType:
    """The module of benchmark ``name``."""
    if name not in BENCHES:
        raise MamoError(f"unknown benchmark '{name}'; use one of {', '.join(BENCHES)}.")
    return importlib.import_module(BENCHES[name])


MAX_COUNT = 1_000_000  # seeds, epochs, rounds, sizes: far beyond any benchmark, and below what crashed (10**21 seeds)


def _count(text: str, maximum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer; pass a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    if value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum:,}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type for counts (seeds, epochs, rounds, sizes): 0 must not fall back to a long default run, and
    a count past :data:`MAX_COUNT` is a typo, not a benchmark."""
    return _count(text, MAX_COUNT)


def learning_rates(text: str) -> list[float]:
    """An argparse type for --lrs: comma-separated finite positive learning rates."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers; pass e.g. "
                                         "0.05,0.01") from None
    if not values or not all(0.0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"'{text}' holds a learning rate that is not finite and positive; pass e.g. "
                                         "0.05,0.01")
    return values


def thread_count(text: str) -> int:
    """An argparse type for --threads: a positive integer the system can start that many threads for."""
    from mamo.trainer import MAX_THREADS

    return _count(text, MAX_THREADS)


def progress_lines(start: float | None = None) -> Callable[[str], None]:
    """A printer of progress lines on stderr, ``[    12 s] text`` with the seconds since ``start`` (default: now):
    a benchmark's parts run quietly for seconds to minutes each, and a pipe or a file gets no bar. Written through
    tqdm, so that a bar on a terminal is redrawn below a line rather than cut by it."""
    from tqdm import tqdm

    begin = time.perf_counter() if start is None else start

    def say(text: str) -> None:
        if sys.stderr is None:  # started with stderr closed (2>&-): stdout holds the tables alone
            return
        tqdm.write(f"[{time.perf_counter() - begin:6.0f} s] {text}", file=sys.stderr)
        sys.stderr.flush()

    return say


class Interrupted(KeyboardInterrupt):
    """A benchmark stopped part-way (Ctrl-C, a stop signal) that hands back the result of what it finished:
    saved as a whole run's is, where before the stop removed the empty folder and lost it."""

    def __init__(self, result: dict):
        super().__init__()
        self.result = result


def bench_parser(name: str, module: ModuleType) -> argparse.ArgumentParser:
    """The shared options plus the benchmark's own."""
    # No abbreviations: `--set` would otherwise be read as `--setups` of `bench step` and fail naming the wrong option.
    # The docstring's first line, without its reStructuredText quotes (``mamo bench step``: ...).
    description = (module.__doc__ or "").split("\n")[0].replace("``", "")
    parser = argparse.ArgumentParser(prog=f"mamo bench {name}", description=description, allow_abbrev=False)
    shared = getattr(module, "SHARED_OPTIONS", SHARED_OPTIONS)
    if "quick" in shared:
        parser.add_argument("--quick", action="store_true", help=f"a smoke run: {getattr(module, 'QUICK', QUICK)}")
    if "seeds" in shared:
        parser.add_argument("--seeds", type=positive_int, default=None,
                            help="number of seeds (default: the benchmark's)")
    if "device" in shared:
        parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", default=None, help="output folder (default: runs/bench/<name>-<time>); "
                                                    "must not exist or be empty")
    if hasattr(module, "add_options"):
        module.add_options(parser)
    return parser


def output_dir(out: str | None, name: str) -> Path:
    """Create the output folder; an existing non-empty one is refused, a default name never collides."""
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise MamoError(f"--out {path} is a file; --out takes a new or empty folder, e.g. --out {path}.bench.")
        refuse_file_above(path, "--out", "pass a folder elsewhere to --out")
        if path.exists() and any(path.iterdir()):
            raise MamoError(f"output folder {path} already exists and is not empty; pass a new --out.")
        path.mkdir(parents=True, exist_ok=True)
        return path
    return claim_new_folder(BENCH_ROOT / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def tables_of(result: dict) -> list[dict]:
    """Every table of a result: its ``tables`` list, or the single table at its top level."""
    if "tables" in result:
        return list(result["tables"])
    return [{key: result[key] for key in ("title", "columns", "rows")}]


def cell(value: Any) -> str:
    """A table cell as text: floats with four significant digits, everything else as is."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def to_markdown(result: dict) -> str:
    """The result as markdown: each table under its title, then the notes as a list."""
    parts = []
    for table in tables_of(result):
        parts.append(f"## {table['title']}\n")
        body = ([cell(v) for v in row] for row in table["rows"])
        parts.extend(table_lines([cell(c) for c in table["columns"]], body))
        parts.append("")
    notes = result.get("notes") or []
    if notes:
        parts.append("Notes:\n")
        parts.extend(f"- {note}" for note in notes)
        parts.append("")
    return "\n".join(parts)


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None: JSON has neither, and strict readers refuse Python's
    bare NaN and Infinity tokens (the markdown table keeps them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def resume_command(name: str, given: list[str], folder: Path) -> str:
    """The command that continues a stopped benchmark in ``folder``: the options it was given (a resume checks
    they are the same), with ``--resume folder`` in place of any ``--out`` or earlier ``--resume``."""
    kept, skip = [], False
    for text in given:
        if skip or text in ("--out", "--resume"):
            skip = not skip
            continue
        if not text.startswith(("--out=", "--resume=")):
            kept.append(text)
    return cli("bench", name, *kept, "--resume", folder)


def quick_banner(module: ModuleType) -> str:
    """Above every table of a --quick run: its tables look like a full run's, thesis columns included."""
    cut = getattr(module, "QUICK", None) or QUICK + ", so a tensioner may never switch on"
    return (f"**A `--quick` smoke run** ({cut}): it shows that the benchmark runs, and its numbers compare with "
            "neither the thesis' nor a full run's.\n\n")


def command_bench(args: argparse.Namespace) -> int:
    from mamo.errors import StopExplained
    from mamo.trainer import resolve_device

    module = load_bench(args.name)
    options = bench_parser(args.name, module).parse_args(args.options)
    if hasattr(options, "device"):
        resolve_device(options.device, option="--device")  # named as the user gave it, before any folder is made
    resumed = getattr(options, "resume", None)
    # A resumed bench writes its tables back into the folder it continues (unless --out names another).
    if resumed and (options.out is None or Path(options.out).resolve() == Path(resumed).resolve()):
        folder, created, made = Path(resumed), False, []
    else:
        created = options.out is None or not Path(options.out).exists()  # an empty --out the user made stays
        made = [] if options.out else [p for p in (BENCH_ROOT, BENCH_ROOT.parent) if not p.exists()]
        folder = output_dir(options.out, args.name)
    options.out = str(folder)
    start, stopped = time.perf_counter(), False
    try:
        result = module.run(options)
    except Interrupted as stop:  # saved below, then the stop goes on
        result, stopped = stop.result, True
    except BaseException as error:
        # Refused, interrupted (Ctrl-C) or crashed before it wrote anything: no empty folder left behind.
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            for parent in made:  # runs/bench (and runs) when this command made them
                if not any(parent.iterdir()):
                    parent.rmdir()
        if isinstance(error, KeyboardInterrupt) and hasattr(options, "resume") and folder.is_dir():
            # On stderr, as a stopped search's, train's or tune's: stdout holds the tables alone (`> file`).
            print(f"stopped; continue with: {resume_command(args.name, args.options, folder)}", file=sys.stderr,
                  flush=True)
            raise StopExplained from None
        raise
    result.setdefault("wall_seconds", round(time.perf_counter() - start, 1))
    result.setdefault("options", {k: v for k, v in vars(options).items()})
    smoke = quick_banner(module) if getattr(options, "quick", False) else ""
    text = f"# mamo bench {args.name}\n\n{smoke}" + to_markdown(result)
    data = json.dumps(finite_or_null(result), indent=1, default=str, allow_nan=False)
    write_text_atomically(folder / "results.md", text)
    write_text_atomically(folder / "results.json", data)
    print(text)
    if stopped:  # on stderr, as any stop's word: stdout holds the tables alone
        print(f"stopped; what finished is saved in {folder / 'results.md'} and {folder / 'results.json'}",
              file=sys.stderr, flush=True)
        raise StopExplained
    print(f"saved {folder / 'results.md'} and {folder / 'results.json'} ({result['wall_seconds']} s)")
    return 0
