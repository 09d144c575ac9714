"""The baseline cache: STL and HPS results keyed by what determines them, shared by every run under one runs root.

Several processes, maybe on several machines, may share the folder. A result is written atomically; while a
baseline trains, its network is checkpointed beside it (``<key>.pt``) and the training process holds a claim
(``<key>.claim``: its host, process id and PID namespace, touched by a thread), so that another process that
needs the same baseline waits for the result instead of training it a second time, and takes the training
over, from the checkpoint, only once the claim is abandoned (its process gone, or the claim silent for
:data:`CLAIM_STALE_SECONDS`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from mamo.config import Config
from mamo.data_plugins import plugin_source_digest
from mamo.runs import one_at_a_time
from mamo.trainer import OPTIMIZER_SETTINGS
from mamo.writes import process_exists, write_text_atomically

#: A temporary file untouched this long was left by a killed writer: a save takes seconds, never an hour.
ABANDONED_AFTER_SECONDS = 3600.0
#: A claim untouched this long is abandoned: its owner's thread touches it every CLAIM_TOUCH_SECONDS, so only a
#: killed process or a machine that stopped (or lost the shared folder) goes silent.
CLAIM_STALE_SECONDS = 600.0
CLAIM_TOUCH_SECONDS = 30.0
WAIT_POLL_SECONDS = 2.0


def baseline_key(config: Config, kind: str, epochs: int) -> str:
    """Cache key of a baseline: the data (with a plugin's source file), the backbone, the training budget (with
    ``train.threads`` when set: CPU results depend on it) and the seed, nothing else."""
    train = config.train
    payload = {
        "kind": kind,
        "data": asdict(config.data),
        "model": asdict(config.model),
        "budget": {
            "epochs": epochs, "batch_size": train.batch_size, "lr": train.lr, "optimizer": train.optimizer,
            "momentum": train.momentum, "weight_decay": train.weight_decay, "precision": train.precision,
        },
        "seed": train.seed,
    }
    # A setting the optimizer never reads trains nothing new: Adam's key holds no momentum (SGD's keys stay).
    for setting in {s for read in OPTIMIZER_SETTINGS.values() for s in read} - set(
            OPTIMIZER_SETTINGS.get(train.optimizer, ())):
        del payload["budget"][setting]
    if train.threads is not None:  # an explicit thread count asks for its own numbers; null keeps the old keys
        payload["budget"]["threads"] = train.threads
    source = plugin_source_digest(config.data.name)
    if source is not None:  # only for plugins, so the keys of the built-in datasets' caches stay what they were
        payload["plugin_source"] = source
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _pid_namespace() -> str:
    """This process's PID namespace (Linux), so that a process id is only checked where it means the same
    process: containers sharing a host name (``--uts=host``) have their own process ids."""
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:")
    except OSError:
        return "?"


def process_owner() -> str:
    """This process as "host pid pid-namespace": what :func:`owner_gone` checks (claims, tune's trials)."""
    return f"{socket.gethostname()} {os.getpid()} {_pid_namespace()}"


def owner_gone(owner: str) -> bool:
    """Whether the process :func:`process_owner` described as ``owner`` has exited. Known only for a process of
    this machine and PID namespace; of any other (or an unreadable ``owner``) it is False: not known gone."""
    parts, here = owner.split(), process_owner().split()
    same_machine = len(parts) == 3 and parts[1].isdigit() and parts[0] == here[0] and parts[2] == here[2] != "?"
    return same_machine and not process_exists(int(parts[1]))


def _abandoned(path: Path) -> bool:
    """Whether the claim at ``path`` is one nobody holds any more (a missing one counts as abandoned)."""
    try:
        owner, age = path.read_text(encoding="utf-8"), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    # Killed on this machine: no need to wait out the silence.
    return age > CLAIM_STALE_SECONDS or owner_gone(owner)


class Claim:
    """The right to train one baseline, held through a file that a background thread touches every
    :data:`CLAIM_TOUCH_SECONDS` until :meth:`release` (so through long evaluations too, not only steps)."""

    def __init__(self, path: Path):
        self.path, self.owner = path, process_owner()
        self._released = threading.Event()
        self._toucher = threading.Thread(target=self._touch, name=f"claim {path.name}", daemon=True)
        self._toucher.start()

    def _touch(self) -> None:
        while not self._released.wait(CLAIM_TOUCH_SECONDS):
            with contextlib.suppress(OSError):  # gone (taken over) or a full disk: the next touch may work
                os.utime(self.path)

    def release(self) -> None:
        self._released.set()
        self._toucher.join()
        with contextlib.suppress(FileNotFoundError):
            if self.path.read_text(encoding="utf-8") == self.owner:  # not a claim taken over since
                self.path.unlink()


class BaselineCache:
    """Results under ``root``: ``<key>.json``, with ``<key>.pt`` and ``<key>.claim`` while one trains.

    Opening it removes what kills left behind: temporary files of interrupted saves and checkpoints of results
    that were cached since, once :data:`ABANDONED_AFTER_SECONDS` old (a recent one may be another process's), and
    the claims of cached results whose owner is gone (a kill between caching a result and letting its claim go
    left the claim there for good; harmless, since the result is read first, but litter)."""

    def __init__(self, root: Path):
        self.root = root
        cutoff = time.time() - ABANDONED_AFTER_SECONDS
        leftovers = [*root.glob("*.tmp"), *(p for p in root.glob("*.pt") if self._path(p.stem).exists())]
        for leftover in leftovers if root.is_dir() else []:
            with contextlib.suppress(FileNotFoundError):  # another process opening the cache removed it first
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
        for claim in root.glob("*.claim") if root.is_dir() else []:
            if self._path(claim.stem).exists() and _abandoned(claim):
                claim.unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError: a damaged entry is retrained, not trusted
            return None
        return result if isinstance(result, dict) else None

    def _claim_path(self, key: str) -> Path:
        return self.root / f"{key}.claim"

    def checkpoint_path(self, key: str) -> Path:
        """Where the network of ``key`` is checkpointed while it trains (removed once its result is cached)."""
        return self.root / f"{key}.pt"

    def put(self, key: str, result: dict) -> None:
        # Flushed to the disk: a baseline is minutes of training, and a power cut must not leave its entry empty.
        write_text_atomically(self._path(key), json.dumps(result, indent=1), durable=True)

    def try_claim(self, key: str) -> Claim | None:
        """The claim on training ``key``, taken now (an abandoned one taken over), or None while a live process
        holds it."""
        path = self._claim_path(key)
        while True:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                handle = open(path, "x", encoding="utf-8")  # exclusive: one process wins
            except FileExistsError:
                pass
            else:
                try:
                    with handle:
                        handle.write(process_owner())
                except BaseException:  # a full disk: an empty claim would make others wait out its silence
                    path.unlink(missing_ok=True)
                    raise
                return Claim(path)
            if not _abandoned(path):
                return None
            # Judged again under a lock, one waiter at a time: two that found the owner dead removed each other's
            # new claim and both trained the baseline. Only a claim still there is removed; a missing one is
            # retried above, where the exclusive create lets one process win.
            with one_at_a_time(self.root):  # a file system without locks: trained twice, as before
                if path.exists() and _abandoned(path):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

    @contextlib.contextmanager
    def claim(self, key: str, log: Callable[[str], None], name: str, wait: bool = True) -> Iterator[Claim | None]:
        """Hold the claim on training ``key`` (``name`` in messages) while the block runs. Yields the claim, or
        None when the result is cached (it appeared while another process trained it) or, with ``wait=False``,
        while another process holds the claim; with ``wait``, waits for that process, saying so once."""
        said = False
        while True:
            if self.get(key) is None and (held := self.try_claim(key)) is not None:
                if self.get(key) is None:
                    break
                held.release()  # its owner cached it and let go between the two looks
            if self.get(key) is not None or not wait:
                yield None
                return
            if not said:
                path = self._claim_path(key)
                with contextlib.suppress(FileNotFoundError):
                    holder = path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
                    log(f"{name}: waiting for the process that trains it ({holder}, {path}); delete that file if "
                        "no such process runs")
                said = True
            time.sleep(WAIT_POLL_SECONDS)
        try:
            yield held
        finally:
            held.release()
