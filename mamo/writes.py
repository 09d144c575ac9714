"""Writing files so that nothing is left half-written.

Every file mamo writes goes to a temporary name beside it and is renamed into place (:func:`replace_atomically`), so
a reader, a crash or a full disk leaves the old file or the new one; checkpoints, weights and cached baselines are
also flushed to the disk (``durable``). Torch's own formats are written through a Python file
(:func:`write_through_file`): given a path, torch writes through its own C++ file, and a full disk or a file-size
limit surfaces as ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 32128 vs 32032`` (for a
``.pt2`` followed by an abort of the whole process, ``terminate called``); given a Python file object, torch calls
its ``write()``, so the OSError of a failed write can be kept and raised in place of torch's error.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO


class _RememberingFile(io.BufferedWriter):
    """A file that keeps the OSError of its failed write, which torch turns into a RuntimeError naming only its
    own position check. Buffered: a raw write may write part of the bytes, which torch would not notice."""

    error: OSError | None = None
    # Anything else a write raised: a stop's KeyboardInterrupt (Ctrl-C, SIGTERM, SIGHUP) lands here when it comes
    # while torch writes, and torch's writer reports it as its own position check, which read as a full disk.
    raised: BaseException | None = None

    def write(self, data: bytes) -> int:  # type: ignore[override]
        try:
            return super().write(data)
        except OSError as exc:
            self.error = exc
            raise
        except BaseException as exc:
            self.raised = exc
            raise


def write_through_file(path: Path, save: Callable[[IO[bytes]], object]) -> None:
    """``save(file)`` with ``path`` open for writing (``torch.save(obj, file)``, ``torch.export.save(program,
    file)``): streamed, so a big checkpoint is never held twice in memory. A failed write raises its own OSError
    (ENOSPC, EFBIG) naming ``path`` instead of torch's RuntimeError, and a stop during the write its
    KeyboardInterrupt."""
    file = _RememberingFile(io.FileIO(path, "wb"))
    try:
        save(file)
        file.close()  # the last buffered bytes: a full disk may show only here
    except RuntimeError as exc:
        if file.raised is not None:
            raise file.raised from None
        if file.error is None:
            raise
        raise OSError(file.error.errno, file.error.strerror, str(path)) from exc
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        with contextlib.suppress(OSError):  # after a failed write, flushing the rest fails the same way
            file.close()


def temporary_beside(path: Path) -> Path:
    """A temporary name beside ``path`` (the same file system, so a rename moves it into place) that no other
    process uses: it holds the host and the process id."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def written_by_another_live_process(path: Path) -> bool:
    """Whether the temporary file or folder ``path`` (:func:`temporary_beside`'s name) belongs to another process
    of this machine that is still running: an export writing beside a stopped run, whose files a resume must
    leave. Another machine's cannot be told and reads False, as do a killed process's and this one's."""
    pid = path.name.removesuffix(".tmp").rpartition(".")[2]
    if not pid.isdigit() or int(pid) == os.getpid() or not path.name.endswith(f".{socket.gethostname()}.{pid}.tmp"):
        return False
    return process_exists(int(pid))


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` of this machine (and PID namespace) is running, another user's included."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return True


def replace_atomically(path: Path, write: Callable[[Path], object], durable: bool = False) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: readers see the old file or
    the new one, never half of one. The temporary name holds the host and the process id, so processes sharing a
    folder (a baseline cache, maybe from several machines) never write the same one; a failed write leaves none
    behind. ``durable`` (checkpoints, weights, cached baselines) also flushes the file to the disk before the
    rename and the rename after it, so that a power cut or a kernel crash leaves the old file or the new one,
    not an empty one."""
    tmp = temporary_beside(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if durable:
            _flush_to_disk(tmp)
        tmp.replace(path)
        if durable:
            _flush_to_disk(path.parent)
    except OSError as exc:
        _discard(tmp)
        # Named by the file the user knows: a failed write() (a full disk) names none, the rest the temporary one.
        if exc.filename is None or str(exc.filename) == str(tmp):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        _discard(tmp)
        raise


def _flush_to_disk(path: Path) -> None:
    """fsync a file or a folder (a folder holds its entries' names: the rename)."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(descriptor)
    except OSError as exc:
        # Some file systems cannot sync a folder (EINVAL); the file itself is on the disk by then.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP) or not path.is_dir():
            raise
    finally:
        os.close(descriptor)


def _discard(tmp: Path) -> None:
    """Remove what a failed write left; on a read-only file system removing even a file never made fails (EROFS),
    an error that must not take the place of the write's own."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str, durable: bool = False) -> None:
    """:func:`replace_atomically` for a text file, always UTF-8 (reports hold Δ and arrows, whatever the locale)."""
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable)


def write_csv_atomically(path: Path, rows: Iterable[Sequence[object]]) -> None:
    """:func:`replace_atomically` for a CSV table (the csv module's dialect: quoted as needed, CRLF rows), UTF-8."""
    table = io.StringIO(newline="")
    csv.writer(table).writerows(rows)
    replace_atomically(path, lambda tmp: tmp.write_text(table.getvalue(), encoding="utf-8", newline=""))
