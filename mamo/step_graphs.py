"""CUDA graphs for the device half of a training step (``train.cuda_graphs``).

On a GPU the step of a small or mid-sized network is launch-bound: the host issues kernels more slowly than
the device runs them (docs/performance.md, "CUDA graphs"). A CUDA graph records the kernels of the step's
device half once (forward, losses, per-task gradients and Gramian, or the summed backward) and replays them
with one launch. The host half stays eager: the one synchronisation that reads the losses and the Gramian, the
direction's solve, the combination and the optimizer's update (so a changed learning rate, parameters added
by growth and a loaded optimizer state take effect as they do without graphs).

A graph is recorded per kind of step and batch shape (the last, smaller batch of an epoch gets its own; a step
that collects conflict statistics is another kind) after ``WARMUP`` eager steps of that shape on a side stream,
as torch asks; each graph keeps its inputs, activations and gradients in memory of its own. A function that
cannot be recorded (one that needs a value on the host, say) is run eagerly from then on, with one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

WARMUP = 2  # eager steps of a shape before its graph is recorded: lazy initialisation and cuDNN's choices
MAX_GRAPHS = 4  # recorded per step object; further kinds or shapes run eagerly (a dataset of odd batch sizes)

Targets = dict[str, torch.Tensor]
# Its output: one tensor on CUDA (what a graph records); on the CPU, where nothing is recorded, a tuple may do.
DeviceHalf = Callable[[torch.Tensor, Targets], torch.Tensor | tuple]


class HostState(Protocol):
    """Python-side state that the device half sets as it runs (a layout's per-task gradient lists), which a replay
    does not: taken once the graph is recorded and handed back after every replay."""

    def snapshot(self) -> Any: ...

    def restore(self, saved: Any) -> None: ...


def _key(name: str, x: torch.Tensor, targets: Targets) -> tuple:
    return (name, x.shape, x.dtype, tuple((task, t.shape, t.dtype) for task, t in targets.items()))


@dataclass
class _Recording:
    steps: int = 0  # eager steps seen of this shape
    graph: torch.cuda.CUDAGraph | None = None
    x: torch.Tensor | None = None  # the graph's input buffers, refilled before each replay
    targets: Targets = field(default_factory=dict)
    output: torch.Tensor | None = None
    grads: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)
    state: Any = None  # ``host_state.snapshot()`` once recorded
    failed: bool = False


class StepGraphs:
    """Runs a step's device half from a CUDA graph per batch shape; see the module's docstring.

    ``parameters`` are the model's: after a replay each that had a gradient when the graph was recorded gets
    that tensor back as its ``.grad`` (the buffer the graph writes, for those the device half sets), in case the
    host half or an eager step in between set it to something else.
    """

    def __init__(self, parameters: Callable[[], list[torch.nn.Parameter]],
                 side_streams: dict[torch.device, torch.cuda.Stream] | None = None):
        self.parameters = parameters
        self.recordings: dict[tuple, _Recording] = {}
        # One warm-up stream per device, handed on when a grown network is recorded anew: torch keeps cuBLAS
        # workspaces per stream, and a new stream for every warm-up would take a new one from its pool each time.
        self.side_streams = {} if side_streams is None else side_streams

    def run(self, name: str, device_half: DeviceHalf, x: torch.Tensor, targets: Targets,
            host_state: HostState | None = None) -> torch.Tensor:
        """``device_half(x, targets)``: eagerly while warming up (or once recording failed), else by replay;
        ``host_state`` is what ``device_half`` leaves on the host besides gradients (see :class:`HostState`)."""
        key = _key(name, x, targets)
        recording = self.recordings.get(key)
        if recording is None:
            if len(self.recordings) >= MAX_GRAPHS:
                return device_half(x, targets)
            recording = self.recordings[key] = _Recording()
        if recording.failed:
            return device_half(x, targets)
        if recording.graph is None:
            if recording.steps < WARMUP:
                recording.steps += 1
                return self._on_side_stream(device_half, x, targets)
            if not self._record(recording, name, device_half, x, targets):
                return device_half(x, targets)
            if host_state is not None:
                recording.state = host_state.snapshot()
        else:
            recording.x.copy_(x, non_blocking=True)
            for task, target in targets.items():
                recording.targets[task].copy_(target, non_blocking=True)
        recording.graph.replay()
        for param, grad in recording.grads:
            if param.grad is not grad:
                param.grad = grad
        if host_state is not None:
            host_state.restore(recording.state)
        return recording.output

    def _record(self, recording: _Recording, name: str, device_half: DeviceHalf, x: torch.Tensor,
                targets: Targets) -> bool:
        recording.x = x.clone()
        recording.targets = {task: t.clone() for task, t in targets.items()}
        graph = torch.cuda.CUDAGraph()
        before = [(p, p.grad) for p in self.parameters()]
        try:
            with torch.cuda.graph(graph):
                recording.output = device_half(recording.x, recording.targets)
        except RuntimeError as exc:
            recording.failed, recording.x, recording.targets, recording.output = True, None, {}, None
            for param, grad in before:  # a half-recorded step may have pointed them at the graph's memory
                param.grad = grad
            warnings.warn(f"the {name} step could not be recorded as a CUDA graph ({str(exc).splitlines()[0]}); "
                          "it runs eagerly (set train.cuda_graphs=false to skip the attempt).", stacklevel=4)
            return False
        recording.graph = graph
        # Only the gradients the device half set while recorded (into the graph's memory): those the host half
        # sets itself (a layout's combination) would otherwise be kept alive with the graph.
        recording.grads = [(p, p.grad) for p, grad in before if p.grad is not None and p.grad is not grad]
        return True

    def _on_side_stream(self, device_half: DeviceHalf, x: torch.Tensor, targets: Targets) -> torch.Tensor:
        """An eager run on a side stream, as torch asks of the steps before a graph is recorded."""
        side = self.side_streams.get(x.device)
        if side is None:
            side = self.side_streams[x.device] = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            output = device_half(x, targets)
        torch.cuda.current_stream(x.device).wait_stream(side)
        return output
