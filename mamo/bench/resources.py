"""Clocks, device synchronisation and peak-memory readings for ``mamo bench step``."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch

MiB = 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def memory_mark(device: torch.device) -> float | None:
    """Reset the peak counter; the baseline it is read against (None: this platform cannot measure it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device))
    try:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, or the baseline hides it
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return float(_status_kib("VmRSS") * 1024)
    except OSError:
        return None


def memory_peak(device: torch.device, base: float | None) -> float | None:
    if base is None:
        return None
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - base) / MiB
    return (_status_kib("VmHWM") * 1024 - base) / MiB
