"""The peers ``mamo bench step`` times beside mamo: torchjd's and LibMTL's MGDA on the same model and batch.

Each factory takes a :class:`~mamo.bench.step.Setup` and returns a closure running one complete step, or
raises :class:`Unavailable` naming the package to install when the peer is missing.
"""

from __future__ import annotations

import signal
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mamo.bench.step import Setup

LIBMTL_LIMIT_S = 120  # LibMTL's min-norm loop never increments its iteration counter: a step may never end
INSTALL = "pip install -e '.[bench]' in the checkout"  # the optional peers of the step benchmark

Step = Callable[[], object]


class Unavailable(Exception):
    """A method that cannot run here (a peer package missing); the message says why."""


def torchjd_step(chunk: int | None) -> Callable[[Setup], Step]:
    """torchjd's MGDA; ``chunk`` is its ``parallel_chunk_size`` (None, its default: every task at once under
    vmap; 1: one task at a time, no vmap)."""

    def factory(setup: Setup) -> Step:
        try:
            from torchjd.aggregation import MGDA as TorchjdMGDA
            from torchjd.autojac import jac_to_grad, mtl_backward
        except ImportError as exc:
            raise Unavailable(f"torchjd is not installed ({exc}); {INSTALL}") from exc
        optimizer, aggregator, part = setup.optimizer(), TorchjdMGDA(), setup.part

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with setup.autocast():
                features = setup.model.forward_features(setup.x)
                predictions = setup.model.forward_heads(features)
            mtl_backward(setup.losses(predictions), features=list(features.values()),
                         tasks_params=[part.specific[t] for t in part.tasks], shared_params=part.shared,
                         parallel_chunk_size=chunk)
            jac_to_grad(part.shared, aggregator)
            optimizer.step()

        return step

    return factory


def _libmtl_mgda() -> type:
    """LibMTL's MGDA weighting. LibMTL 1.1.5 imports ``torchvision.models.utils``, gone from torchvision; the
    one function it takes from there now lives in ``torch.hub``, so a stand-in module is registered first."""
    try:
        import torchvision.models.utils  # noqa: F401
    except ImportError:
        shim = types.ModuleType("torchvision.models.utils")
        shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
        sys.modules.setdefault("torchvision.models.utils", shim)
    from LibMTL.weighting.MGDA import MGDA as LibmtlMGDA

    return LibmtlMGDA


def libmtl_step(setup: Setup) -> Step:
    try:
        base = _libmtl_mgda()
    except ImportError as exc:
        raise Unavailable(f"LibMTL is not installed ({exc}); {INSTALL}") from exc
    part = setup.part

    class Weighting(base):  # the attributes LibMTL's trainer would mix in
        def __init__(self):
            super().__init__()
            self.task_num, self.rep_grad, self.device = len(part.tasks), False, setup.x.device
            self.task_name = list(part.tasks)

        def get_share_params(self) -> list[torch.nn.Parameter]:
            return part.shared

        def zero_grad_share_params(self) -> None:
            # In place: LibMTL's _reset_grad writes into param.grad and crashes when it is None (what
            # zero_grad() leaves since torch 2.0).
            for param in part.shared:
                if param.grad is not None:
                    param.grad.zero_()

    optimizer, weighting = setup.optimizer(), Weighting()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with setup.autocast():
            predictions = setup.model(setup.x)
        weighting.backward(setup.losses(predictions), mgda_gn="none")
        optimizer.step()

    return _time_limited(step, LIBMTL_LIMIT_S)


def _time_limited(step: Step, seconds: int) -> Step:
    """Raise TimeoutError from a step that runs longer than ``seconds`` (main thread, POSIX; else unguarded)."""
    if not hasattr(signal, "setitimer"):
        return step

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"one step ran longer than {seconds} s")

    def guarded() -> object:
        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return step()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return guarded
