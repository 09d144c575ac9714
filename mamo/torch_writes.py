"""Writing torch's own formats (checkpoints, ``torch.export`` programs) so that a failed write says why.

Given a path, torch writes through its own C++ file, and a full disk or a file-size limit surfaces as
``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 32128 vs 32032`` (for a ``.pt2``
followed by an abort of the whole process, ``terminate called``). Given a Python file object instead, torch
calls its ``write()``, so the OSError of a failed write can be kept and raised in place of torch's error.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
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
