"""The command line: ``mamo <command>`` (also ``python cli.py <command>``).

Each command is one row of :data:`COMMANDS`: a help line and the module that owns it. That module defines
``add_arguments_<command>(parser)`` and ``command_<command>(args) -> int``; nothing here knows a command's
flags. User errors (:class:`MamoError`) and the machine's limits (a full disk, memory) print one sentence and
exit with status 2; nothing already written is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import io
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mamo
from mamo.errors import WRITE_FAILURES, MamoError, StopExplained, write_fix
from mamo.stops import exit_quickly, hold_standard_descriptors, output_reader_left, stop_signals_interrupt


@dataclass(frozen=True)
class Command:
    help: str
    module: str
    again: str = "run the command again"  # how to go on once a failed write's cause is fixed


COMMANDS: dict[str, Command] = {
    "train": Command("train the shared (HPS) network with the configured direction, or STL with "
                     "--set train.mode=stl", "mamo.train", "continue with --resume"),
    "search": Command("grow GMK modules where tasks conflict (MAMO Algorithm 1) and report against STL/HPS",
                      "mamo.search", "continue with --resume"),
    "export": Command("write a run's architecture and deployable programs (json, graphml, dot, png, onnx, pt2)",
                      "mamo.export"),
    "show": Command("print a run's architecture as a tree with parameter counts and where GMKs grew",
                    "mamo.export"),
    "bench": Command("run a benchmark (logic, logic3, multimnist_recon, step, ablation) and save its table",
                     "mamo.bench",
                     "run the command again (bench ablation continues with --resume)"),
    "tune": Command("tune T, alpha and the detection rounds with Optuna", "mamo.tune",
                    "rerun the command with the same --run-dir"),
}


def add_preset_arguments(parser: argparse.ArgumentParser, default_text: str, run_dir_help: str) -> None:
    """The arguments every command that reads a preset shares; ``default_text`` says what the preset defaults to
    (the argument's own default is None, so that a command can tell that none was given), ``run_dir_help`` what
    ``--run-dir`` names."""
    from mamo.config import PRESET_DIR

    shipped = ", ".join(sorted(path.stem for path in PRESET_DIR.glob("*.yaml")))
    parser.add_argument("preset", nargs="?", default=None,
                        help=f"a preset name in {PRESET_DIR} ({shipped}) or a YAML file (default: {default_text})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--run-dir", default=None, help=run_dir_help)
    parser.add_argument("--no-progress", action="store_true",
                        help="hide progress bars and print a line per epoch instead (the default when stderr is not "
                             "a terminal: a file or a pipe)")
    parser.add_argument("--no-tensorboard", action="store_true",
                        help="write no TensorBoard events or pictures (the report and its plots are still written)")
    parser.add_argument("--no-pictures", action="store_true",
                        help="TensorBoard events without the pictures (conflict heatmaps, architecture drawings), "
                             "which are nearly all of the logging's cost: for many-trial studies of short searches")


RESUMABLE_DEFAULT_PRESET = "multimnist"  # the preset of train and search when none is given


def add_resumable_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """``train``'s and ``search``'s arguments: a preset's, plus ``--resume``."""
    from mamo.resume import resume_settings_text

    add_preset_arguments(parser, RESUMABLE_DEFAULT_PRESET,
                         f"the run folder to create (default: runs/<time>-{command}-<preset>)")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help=f"continue a stopped {command} run from its newest checkpoint, with the config saved "
                             f"in RUN_DIR; --set may change only {resume_settings_text(command)}")


def run_resumable(args: argparse.Namespace, runner: Callable[..., object]) -> int:
    """Start ``runner`` (``run_train`` or ``run_search``) on the preset, or continue the run in ``args.resume``."""
    from mamo.config import load_config

    if args.resume and (args.preset is not None or args.run_dir is not None):
        given = f"the preset '{args.preset}'" if args.preset is not None else f"--run-dir {args.run_dir}"
        raise MamoError(f"--resume continues {args.resume} with the config.yaml and folder it has, so {given} would "
                        "be ignored; leave it out, or start a new run without --resume.")
    # A resumed run reads its configuration from the run folder; load_config(None) is only a placeholder.
    config = load_config(None) if args.resume else load_config(args.preset or RESUMABLE_DEFAULT_PRESET,
                                                                 args.overrides)
    runner(config, args.resume or args.run_dir, progress=show_progress(args), resume=bool(args.resume),
           loggers=not args.no_tensorboard, pictures=not args.no_pictures,
           resume_settings=args.overrides if args.resume else ())
    return 0


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal: redirected to a file they are thousands of carriage returns, so the
    epoch lines (:class:`mamo.trainer.EpochLines`) take their place there, as with ``--no-progress``."""
    from mamo.runs import stderr_on_terminal

    return not args.no_progress and stderr_on_terminal()


def _handler(name: str, prefix: str) -> Callable[..., Any]:
    module = importlib.import_module(COMMANDS[name].module)
    return getattr(module, f"{prefix}_{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (so one command's imports never slow or break another)."""
    parser = argparse.ArgumentParser(prog="mamo", description="Grow multi-task networks where tasks fight.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"mamo {mamo.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, spec in COMMANDS.items():
        subparser = sub.add_parser(name, help=spec.help, description=spec.help, allow_abbrev=False)
        if name == command:
            _handler(name, "add_arguments")(subparser)
    return parser


def _virtual_folder(folder: Path) -> bool:
    """Whether ``folder`` is on a file system without storage (procfs, sysfs: no blocks at all)."""
    try:
        return folder.is_dir() and os.statvfs(folder).f_blocks == 0
    except OSError:
        return False


def os_failure(exc: OSError, again: str = "run the command again") -> str | None:
    """The sentence for an OS error that the machine or the path causes, not mamo (None: a bug, keep the trace);
    ``again`` says how the command goes on once the cause is fixed."""
    where = f" {exc.filename}" if exc.filename else ""
    path = Path(exc.filename) if isinstance(exc.filename, str) and exc.filename else None
    if exc.errno == errno.EEXIST and path is not None and path.is_symlink() and not path.exists():
        return (f"{path} is a link to {os.readlink(path)}, which does not exist; create what it points to or pass "
                "another path.")
    if exc.errno == errno.EISDIR and path is not None:
        return f"could not write {path}: a folder has that name; move the folder away or pass another path."
    if exc.errno == errno.ENAMETOOLONG:
        return (f"could not use{where} ({exc.strerror}); shorten the path: a file or folder name holds at most "
                "255 bytes.")
    if exc.errno == errno.ENOENT and exc.filename and _virtual_folder(Path(exc.filename).parent):
        # /proc refuses a new folder with ENOENT although its parent exists; any other ENOENT is a bug.
        return (f"could not create{where} ({exc.strerror}): {Path(exc.filename).parent} is a virtual file system "
                "that takes no new files; pass a path on a disk.")
    if exc.errno in WRITE_FAILURES:
        return f"could not write{where} ({exc.strerror}); {write_fix(exc.errno)}, then {again}."
    return None


def _tolerate_narrow_terminals() -> None:
    """A terminal whose encoding lacks Δ, ± or the tree's lines shows '?' for them: printing the summary at the
    end of a run (or ``show``, or a help text) used to crash there with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="replace")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _tolerate_narrow_terminals()
    args = build_parser(next((a for a in argv if a in COMMANDS), None)).parse_args(argv)
    try:
        with stop_signals_interrupt():
            return int(_handler(args.command, "command")(args) or 0)
    except MamoError as exc:
        print(f"mamo: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not output_reader_left():  # another pipe or socket: an error like any other
            raise
        # The reader of stdout or stderr left (`| head`): end as a program that SIGPIPE ends does, quietly (it
        # printed a traceback), with the shell's code for it; what is still buffered goes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(devnull, stream.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:
        message = os_failure(exc, COMMANDS[args.command].again)
        if message is None:
            raise
        print(f"mamo: error: {message}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        from mamo.spaces import memory_failure  # here, not at the top: `mamo --help` needs no torch

        reason = memory_failure(exc)
        if reason is None:
            raise
        print(f"mamo: error: {args.command} ran out of memory ({reason}); free memory or make the run smaller (a "
              f"smaller train.batch_size or model), then {COMMANDS[args.command].again}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        if not isinstance(stop, StopExplained):
            # Commands with something to continue say so themselves (StopExplained); here nothing was kept: a
            # bench that writes its tables at the end, a run stopped before its folder existed.
            print("mamo: interrupted.", file=sys.stderr)
        return 130


def run() -> None:
    """The ``mamo`` console script and ``python cli.py``: :func:`main` between :func:`hold_standard_descriptors` and
    :func:`exit_quickly`."""
    hold_standard_descriptors()
    exit_quickly(main())


if __name__ == "__main__":
    run()
