"""Stops: SIGINT, SIGTERM and SIGHUP become a KeyboardInterrupt, as Ctrl-C is, plus a flag for the raise Python
drops. Process-wide, as signals are; the CLI installs the handlers around every command. And the start and end of a
command's process (:func:`hold_standard_descriptors`, :func:`exit_quickly`)."""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

# Set by mamo's stop-signal handlers (SIGINT, SIGTERM, SIGHUP under the CLI; a tune worker's), which also raise
# KeyboardInterrupt. Python drops a KeyboardInterrupt raised while a weakref callback or a finaliser runs (the
# garbage collector's, often, in training): the trainer and a tune worker check this between steps and trials
# and raise it again there. Process-wide because signals are; the CLI clears it when its command ends.
STOP_REQUESTED = threading.Event()


def interrupt(number: int, frame: object) -> None:
    """A signal handler that does what Ctrl-C does, raise KeyboardInterrupt at every signal, and also requests
    the stop (:data:`STOP_REQUESTED`), in case Python drops this raise."""
    STOP_REQUESTED.set()
    raise KeyboardInterrupt


def hide_dropped_stops(previous: Callable[[Any], object]) -> Callable[[Any], object]:
    """An unraisable-exception hook that keeps quiet about a stop's KeyboardInterrupt Python dropped (it printed
    "Exception ignored in ... weakref" tracebacks; :data:`STOP_REQUESTED` stops the run instead)
    and hands everything else to ``previous``."""

    def hook(unraisable: Any) -> object:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and STOP_REQUESTED.is_set():
            return None
        return previous(unraisable)

    return hook


# Ctrl-C; a kill or a batch system's stop; a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def handling_stops(handler: Callable[[int, Any], None]) -> Iterator[bool]:
    """Inside, ``handler`` takes the stop signals (:data:`STOP_SIGNALS`) and the previous handlers come back
    after; only in the main thread, where Python delivers signals. Yields whether it took them."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        yield True
    finally:
        for number, restored in previous.items():
            signal.signal(number, restored)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP (a kill, a batch system's stop, a closed terminal) stop a command as Ctrl-C
    (SIGINT) does, and a stop Python dropped is raised again at the next training step or trial: a train or
    search logs how to continue, a tune records its running trials as stopped, stops its workers and writes its
    summary. Only in the main thread, where Python delivers signals."""
    with handling_stops(interrupt) as taken:
        if not taken:
            yield
            return
        unraisable = sys.unraisablehook
        sys.unraisablehook = hide_dropped_stops(unraisable)
        try:
            yield
        finally:
            sys.unraisablehook = unraisable
            STOP_REQUESTED.clear()


def hold_standard_descriptors() -> None:
    """Put /dev/null on descriptors 0, 1 and 2 where the process started without them (``2>&-``, some service
    managers): the next file the command opened took the lowest free descriptor, so a C++ warning written to
    stderr would have gone into it (a checkpoint, an event file). Python's ``sys.stderr`` stays None there, and
    mamo's messages go where ``print`` sends them."""
    for descriptor in (0, 1, 2):
        try:
            os.fstat(descriptor)
        except OSError:
            held = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one, unless a lower one is too
            if held != descriptor:
                os.dup2(held, descriptor)
                os.close(held)


def output_reader_left() -> bool:
    """Whether the reader of stdout or stderr has left (`| head` exited): the pipe's write end then polls as an
    error. A BrokenPipeError can also come from a socket a data plugin reads, which is no reader leaving."""
    poller = select.poll()
    for descriptor in (1, 2):
        poller.register(descriptor, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def exit_quickly(code: int) -> None:
    """End the process with ``code`` without tearing down the interpreter, once nothing is left running.

    A run's interpreter took 1.0–1.2 s to exit after its last line (0.5 s for ``import torch`` alone, measured):
    freeing every module's objects one by one and C++'s static destructors, nothing that writes a file.
    Everything mamo writes is closed by then, so this runs the ``atexit`` hooks (logging's flush,
    multiprocessing's joins), flushes the standard streams and leaves with ``os._exit``. A thread still
    running (a writer left open by a failure, say) gets Python's ordinary exit, which waits for it."""
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()
           if thread is not threading.main_thread()):
        raise SystemExit(code)
    atexit._run_exitfuncs()  # the documented hooks have no public runner; this is what Python's exit calls
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started without it (`>&-`): Python's own exit skips it too
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that left (`| head`), or a stream already closed
            pass
    os._exit(code)
