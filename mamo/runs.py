"""Run folders: created once and never overwritten, a log file, the resolved config, atomic writes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import re
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from mamo.config import Config, config_text
from mamo.errors import WRITE_FAILURES, MamoError, write_fix
from mamo.writes import write_text_atomically

RUNS_ROOT = Path("runs")


def numbered(base: Path) -> Iterator[Path]:
    """``base``, then ``base-2``, ``base-3``, ...: the default folder names of two commands started in the same
    second."""
    return (base if n == 1 else base.with_name(f"{base.name}-{n}") for n in itertools.count(1))


def claim_new_folder(base: Path) -> Path:
    """Create the first of :func:`numbered` ``base`` that does not exist; ``mkdir`` fails on a folder that exists,
    so of two commands that picked the same name, the second takes the next."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for path in numbered(base):
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable: numbered() never ends")


def refuse_file_above(path: Path, option: str, fix: str) -> None:
    """Refuse ``path`` (given as ``option``) when an existing ancestor of it is a file, below which no folder can
    be made (mkdir would fail with NotADirectoryError, naming no path the user gave); ``fix`` ends the sentence."""
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise MamoError(f"{option} {path} lies below {blocking}, which is a file; {fix}.")


def utf8_path(path: str | Path, what: str) -> Path:
    """``path``, refused unless valid UTF-8 (``$'bad\\xffname'`` is a Linux name): log.txt, the reports that name
    it, safetensors and torch.export take no other, so a run failed midway or intact model files read as damaged."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")  # the bad bytes as \xff, as ls -b shows them
        raise MamoError(f"{what} {shown} is not valid UTF-8, which mamo's log and model files need; rename it (or "
                        "pass another path).") from None
    return Path(path)


def free_run_dir(run_dir: str | Path | None, config: Config, command: str) -> Path:
    """The run folder a command will create (``run_dir``, else runs/<timestamp>-<command>-<preset>, with -2, -3,
    ... when that is taken), checked to be free; nothing is created, so a command can validate its inputs first
    and leave no folder behind on bad input."""
    if not run_dir:
        base = RUNS_ROOT / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{config.name}"
        return next(path for path in numbered(utf8_path(base, "the run folder")) if not path.exists())
    path = utf8_path(run_dir, "--run-dir")
    refuse_file_above(path, "--run-dir", "pick another --run-dir")
    if path.is_symlink() and not path.exists():  # mkdir fails on it with FileExistsError, as if a run took it
        raise MamoError(f"--run-dir {path} is a link to {os.readlink(path)}, which does not exist; create what it "
                        "points to or pass another --run-dir.")
    if path.exists() and not path.is_dir():
        raise MamoError(f"--run-dir {path} is a file, not a folder; pass a new --run-dir (a folder to create).")
    if path.exists() and any(path.iterdir()) and not never_started(path):
        raise MamoError(f"run folder {path} already exists and is not empty; pass a new --run-dir or remove it.")
    return path


def never_started(path: Path) -> bool:
    """Whether ``path`` is a run folder whose command was killed between claiming it and writing config.yaml
    (an empty checkpoints/, perhaps config.yaml's temporary file): nothing ran there, so a new run may take it."""
    entries = list(path.iterdir()) if path.is_dir() else []
    return bool(entries) and all(
        (entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir()))
        or (entry.name.startswith("config.yaml.") and entry.name.endswith(".tmp") and entry.is_file())
        for entry in entries)


RUN_HEADER = "# mamo"  # config.yaml's first line names the command that made the folder: "# mamo search run: ..."


def new_run_dir(run_dir: str | Path | None, config: Config, command: str, path: Path | None = None,
                held: contextlib.ExitStack | None = None) -> Path:
    """Create the run folder ``path`` (default: :func:`free_run_dir`) with checkpoints/ and the resolved
    config.yaml. Creating checkpoints/ claims the folder: of two runs that picked the same one (two commands
    started in the same second), the second takes the next free default name, or is refused if ``run_dir``
    named the folder. The folder's :class:`FolderLock` is taken before anything in it is looked at and goes into
    ``held``, to last while the run works there (without ``held`` it is let go on return): a folder whose
    checkpoints/ is there but not yet config.yaml is another command's being made, not a killed one's to take."""
    path = path or free_run_dir(run_dir, config, command)
    with contextlib.ExitStack() as locked:
        while True:
            made = not path.exists()  # else a folder the user made, which stays
            try:
                path.mkdir(parents=True, exist_ok=True)
                locked.enter_context(FolderLock(path))
                if never_started(path):  # what a killed command left: free_run_dir gave it to this run
                    for entry in path.iterdir():
                        entry.rmdir() if entry.is_dir() else entry.unlink()
                (path / "checkpoints").mkdir()
                break
            except (FileExistsError, FolderBusy) as exc:
                locked.close()  # not this run's folder: the next one is locked afresh
                if isinstance(exc, FileExistsError) and exc.filename != str(path / "checkpoints"):
                    raise  # a link to nothing in the way (runs/ itself, say): os_failure names it; a retry looped
                if run_dir:
                    raise MamoError(f"run folder {path} was taken by another run meanwhile; pass a new --run-dir."
                                    ) from None
                path = free_run_dir(None, config, command)
            except OSError as exc:
                # No run has started, so the CLI's advice for a failed write ("continue with --resume") would mislead.
                if exc.errno not in WRITE_FAILURES - {errno.ENAMETOOLONG}:
                    raise
                raise MamoError(f"could not create the run folder {path} ({exc.strerror}); pass a --run-dir where "
                                "you can write, or fix the folder's permissions.") from exc
        try:
            write_run_config(path, command, config)
        except OSError as exc:
            if exc.errno not in WRITE_FAILURES:
                raise
            # No config.yaml, nothing to --resume (the CLI's advice): the folder goes back to how it was, for a retry.
            for part in [path / "checkpoints", *([path] if made else [])]:
                part.rmdir()
            raise MamoError(f"could not write {path / 'config.yaml'} ({exc.strerror}), so the run did not start; "
                            f"{write_fix(exc.errno)}, then run the command again.") from exc
        if held is not None:
            held.enter_context(locked.pop_all())
    return path


def write_run_config(directory: Path, command: str, config: Config) -> None:
    """config.yaml, atomically: a command killed while writing it leaves the old one or none, never an empty one
    that --resume would read as the built-in defaults."""
    header = f"{RUN_HEADER} {command} run: its resolved config (a preset to copy; --resume reads it back)\n"
    write_text_atomically(directory / "config.yaml", header + config_text(config))


# Which checkpoint files mark a run folder as one command's (folders made before config.yaml named it).
CHECKPOINT_MARKS = {"train": ("last.pt", "best.pt"), "search": ("phase-*.pt", "in-phase.pt")}


def checkpointed_command(directory: Path) -> str | None:
    """The command whose checkpoints ``directory`` holds (``train`` or ``search``), or None."""
    found = (directory / "checkpoints").glob
    return next((command for command, marks in CHECKPOINT_MARKS.items()
                 if any(any(found(mark)) for mark in marks)), None)


def available_cores() -> int:
    """The cores this process may run on (its affinity where the OS reports one, as on Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def stderr_on_terminal() -> bool:
    """Whether stderr, where progress bars go, is a terminal that can show them; False also for a process started
    with it closed (``2>&-``), where Python has no ``sys.stderr`` and asking it crashed the command, and for a
    terminal that reports no width (``script`` under CI, a serial console: 0 × 0), where tqdm drew nothing and
    the epoch lines were off, so a run showed no progress at all."""
    if sys.stderr is None or not sys.stderr.isatty():
        return False
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):  # a terminal whose size cannot be asked: bars, as before
        return True


def cli(*words: str | Path) -> str:
    """The command of ``words`` (``"search", "--resume", folder``) as the user can run it again the way they ran
    mamo: ``mamo ...`` through the installed command, ``python cli.py ...`` from the checkout, ``python
    /path/cli.py ...`` from elsewhere (a printed ``python cli.py`` failed there); the Python API's callers get
    ``python cli.py``. Each word is quoted for the shell where it needs it (a folder named ``my run (1)``), so the
    line can be pasted; a plain path prints unchanged."""
    command = shlex.join(map(str, words))
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if program.name == "mamo":
        return f"mamo {command}"
    if program.name == "cli.py" and program.resolve() != (Path.cwd() / "cli.py").resolve():
        return f"python {shlex.quote(str(program.resolve()))} {command}"
    return f"python cli.py {command}"


def run_command(directory: Path) -> str | None:
    """The command that made the run folder ``directory`` (``train`` or ``search``), from its config.yaml's first
    line or else its checkpoints, or None: how --resume refuses the other command's folder, also one stopped
    before its first checkpoint."""
    try:
        with open(directory / "config.yaml", encoding="utf-8", errors="replace") as file:
            first = file.readline()
    except OSError:
        first = ""
    named = re.match(rf"{re.escape(RUN_HEADER)} (train|search) run:", first)
    return named.group(1) if named else checkpointed_command(directory)


class FolderBusy(MamoError):
    """A run folder another mamo command holds (:class:`FolderLock`)."""


class FolderLock:
    """An exclusive lock on a run folder while a command works in it: a ``--resume`` of a run that is still
    running (another terminal, a batch system's second start) is refused instead of both writing its files.
    The kernel drops the lock when the process ends, however it ends, so a killed run leaves nothing stale."""

    def __init__(self, directory: Path):
        self._fd: int | None = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise FolderBusy(f"{directory} is in use by another mamo command that is still running; wait for it to "
                            "end or stop it, then resume.") from None
        except OSError:  # a file system without locks: run unguarded, as before locks existed
            pass

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def one_at_a_time(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder``, waited for, while the block runs: for short steps that processes
    sharing the folder must take in turn. The kernel lets it go however its holder ends; a file system without
    locks goes unguarded."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def in_use(directory: Path) -> bool:
    """Whether another mamo command holds ``directory`` (:class:`FolderLock`): a run still working there. Asked
    with a shared lock, let go at once; False where it cannot be told (no folder, a file system without locks)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)
    return False


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """``1 new module``, ``3 new modules``: a count with its noun (a regular plural unless ``plural`` is given,
    ``mini-batches``) as a log line reads."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def table_lines(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines: the header row, its rule, one line per row of cell texts (a '|' inside a cell,
    as in a task named 'a|b', escaped so that it does not split the cell)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(text.replace("|", "\\|") for text in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def format_duration(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``3 min 05 s``, ``2 h 14 min``: what a person reads off a log line."""
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class RunLog:
    """Writes timestamped lines to the run's log file and, unless quiet, to the terminal."""

    def __init__(self, path: Path | None, quiet: bool = False, stream: TextIO | None = None):
        self.path = path
        self.quiet = quiet
        self.stream = stream or sys.stderr

    def __call__(self, message: str) -> None:
        self.record(message)
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    def result(self, message: str) -> None:
        """What the run computed (its report), into the log file and, unless quiet, to stdout: `> file` and
        `| tee` keep it, while progress and notes stay on stderr, as tune, bench and show print theirs."""
        self.record(message)
        if not self.quiet:
            print(message, flush=True)

    def record(self, message: str) -> None:
        """Only into the log file: for what the terminal shows another way (the CLI prints errors itself)."""
        if self.path is None:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(f"{time.strftime('%H:%M:%S')} {message}\n")
        except OSError as exc:  # a full disk must not hide the message the run is stopping with; the terminal has it
            if exc.errno not in WRITE_FAILURES:
                raise


