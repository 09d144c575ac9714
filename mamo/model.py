"""The nn.Module compiled from the architecture graph.

:class:`MamoNet` evaluates the graph's nodes in topological order. A trunk cell takes its predecessor's output;
a branch module (GMK) takes the mean of the trunk stream and its own branch stream (the trunk stream alone at
the branch's first cell); the fusion of task t adds ``beta[t, group] * branch output`` to the trunk output;
the head maps the fused features to the task's prediction. Growth edits the graph and calls :meth:`sync`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import networkx as nx
import torch
from torch import nn

from mamo import graph as g
from mamo.spaces import SearchSpace, space_from_spec
from mamo.tasks import TaskSpec, parse_tasks

# How a module node is made: its ``builder`` names the search space's method, its ``args`` the arguments.
BUILDERS: dict[str, Callable[[SearchSpace, dict, dict[str, TaskSpec]], nn.Module]] = {
    "cell": lambda space, args, tasks: space.build_cell(args["cell"]),
    "head": lambda space, args, tasks: space.build_head(tasks[args["task"]], tuple(args["features"])),
}


def _beta_name(task: str, group: g.Group) -> str:
    # ParameterDict keys may not contain '.'; task names come from users, so keep them readable but safe.
    return f"{task}|{'+'.join(group)}".replace(".", "_")


class MamoNet(nn.Module):
    """A multi-task network whose structure is ``graph``; ``forward(x)`` returns ``{task: prediction}``."""

    def __init__(self, graph: nx.DiGraph):
        super().__init__()
        self.graph = graph
        self.space = space_from_spec(graph.graph["space"])
        self.tasks: dict[str, TaskSpec] = parse_tasks(graph.graph["tasks"], "the architecture graph")
        self.blocks = nn.ModuleDict()
        self.betas = nn.ParameterDict()
        self.sync(copy_from_trunk=False)

    # ----- structure -------------------------------------------------------------------------------------
    def sync(self, copy_from_trunk: bool = True) -> list[str]:
        """Build modules for graph nodes that have none yet; returns the new node ids.

        A new branch module is a copy of its trunk cell's current weights (``copy_from_trunk``), which with the
        mean input makes a new branch an exact fork of the trunk; a new fusion weight starts at 0.
        """
        added = []
        for node, data in self.graph.nodes(data=True):
            if "builder" in data and node not in self.blocks:
                if data["kind"] == "gmk" and copy_from_trunk:
                    module = copy.deepcopy(self.blocks[g.cell_id(data["cell"])])
                else:
                    module = BUILDERS[data["builder"]](self.space, data["args"], self.tasks)
                self.blocks[node] = module.to(self._device())
                added.append(node)
        for task in self.tasks:
            for group in g.fusion_groups(self.graph, task):
                name = _beta_name(task, group)
                if name not in self.betas:
                    self.betas[name] = nn.Parameter(torch.zeros((), device=self._device()))
        self._order = list(nx.topological_sort(self.graph))
        self._inputs = {node: g.branch_inputs(self.graph, node) for node in self._order}
        return added

    def _device(self) -> torch.device:
        for param in self.parameters():
            return param.device
        return torch.device("cpu")

    def node_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters grouped by graph node, nodes in topological order (fusion betas under their fusion)."""
        grouped: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for node in self._order:
            kind = self.graph.nodes[node]["kind"]
            if kind in ("cell", "gmk", "head"):
                grouped[node] = [(f"blocks.{node}.{n}", p) for n, p in self.blocks[node].named_parameters()]
            elif kind == "fusion":
                task = self.graph.nodes[node]["task"]
                grouped[node] = [
                    (f"betas.{_beta_name(task, grp)}", self.betas[_beta_name(task, grp)])
                    for grp in g.fusion_groups(self.graph, task)
                ]
        return grouped

    # ----- computation -----------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of the last trunk cell and of every branch's last module: what the fusions read."""
        outputs = self._run_cells(x)
        last = g.num_cells(self.graph) - 1
        return {
            node: value
            for node, value in outputs.items()
            if node != g.INPUT and self.graph.nodes[node]["cell"] == last
        }

    def forward_heads(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fusion and heads on the representation from :meth:`forward_features`."""
        return {task: self.forward_head(features, task) for task in self.tasks}

    def forward_head(self, features: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        """One task's fusion and head on the representation (MGDA-UB runs each task on its own copy of it)."""
        last_cell = g.num_cells(self.graph) - 1
        fused = features[g.cell_id(last_cell)]
        for group in g.fusion_groups(self.graph, task):
            fused = fused + self.betas[_beta_name(task, group)] * features[g.branch_id(group, last_cell)]
        return self.blocks[g.head_id(task)](fused)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_heads(self.forward_features(x))

    def _run_cells(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every trunk cell's and GMK module's output, by node."""
        outputs = {g.INPUT: x}
        for node in self._order:
            kind = self.graph.nodes[node]["kind"]
            if kind not in ("cell", "gmk"):
                continue
            inputs = [outputs[p] for p in self._inputs[node]]
            # The mean of trunk and branch streams keeps a freshly copied branch an exact fork of the trunk.
            value = inputs[0] if len(inputs) == 1 else (inputs[0] + inputs[1]) / 2
            outputs[node] = self.blocks[node](value)
        return outputs


@contextlib.contextmanager
def run_settings() -> Iterator[None]:
    """Inside, torch's process-wide settings that mamo's runs and networks need, as the caller's are after:
    float32 by default (a notebook's torch.set_default_dtype(torch.float64) built float64 networks that refused
    the float32 data, and cast would start from other weights than a fresh process's), and gradients on (a call
    inside torch.no_grad() or torch.inference_mode() ended in a traceback)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        torch.set_default_dtype(before)


def compile_model(graph: nx.DiGraph, seed: int = 0, device: torch.device | str = "cpu") -> MamoNet:
    """Build the module for ``graph`` with weights initialised from ``seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]), run_settings():
        # The CPU generator alone, which builds the modules: torch.manual_seed also reseeds every CUDA generator,
        # which fork_rng(devices=[]) does not restore (a review of the CUDA paths).
        torch.default_generator.manual_seed(seed)
        model = MamoNet(graph)
    return model.to(device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
