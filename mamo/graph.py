"""The architecture as a networkx DiGraph: the single source of truth the model is compiled from.

Nodes (``kind``): ``input``, ``cell`` (shared trunk cell ``cell``), ``gmk`` (a branch module of a task group at
cell ``cell``; a pair for MAMO's gradient mediative kernels, a single task for CoNAL-style exclusive modules),
``fusion`` (per task) and ``head`` (per task). Modules carry their ``builder`` (the search space's
``build_cell`` or ``build_head``) with its ``args``, and every node but the input its parameter count
``params`` (a fusion's are its β, one per branch group). Edges are data flow. Graph-level attributes hold the search
space spec, the task specs and the trunk's cell shapes, so :func:`mamo.model.compile_model` needs nothing else.
"""

from __future__ import annotations

import itertools
import json

import networkx as nx
import torch

from mamo.spaces import SearchSpace
from mamo.tasks import TaskSpec

INPUT = "input"
Group = tuple[str, ...]
Position = tuple[Group, int]


def cell_id(index: int) -> str:
    return f"cell{index}"


def branch_id(group: Group, index: int) -> str:
    return f"gmk_{'+'.join(group)}_{index}"


def fusion_id(task: str) -> str:
    return f"fusion_{task}"


def head_id(task: str) -> str:
    return f"head_{task}"


def build_hps_graph(space: SearchSpace, tasks: dict[str, TaskSpec]) -> nx.DiGraph:
    """The hard-parameter-sharing network: input -> shared cells -> one fusion and head per task."""
    # Measuring builds cells and heads, which draws random weights: the caller's RNG stays as it was (the
    # model's init is compile_model's, from its own seed).
    with torch.random.fork_rng(devices=[]):
        shapes = space.cell_shapes()
        params = [sum(p.numel() for p in space.build_cell(k).parameters()) for k in range(space.num_cells)]
        head_params = {name: sum(p.numel() for p in space.build_head(spec, shapes[-1]).parameters())
                       for name, spec in tasks.items()}
    graph = nx.DiGraph(
        space=space.spec(),
        tasks={name: spec.to_dict() for name, spec in tasks.items()},
        cell_shapes=[list(s) for s in shapes],
        cell_params=params,
    )
    graph.add_node(INPUT, kind="input", shape=list(space.input_shape))
    previous = INPUT
    for index in range(space.num_cells):
        graph.add_node(cell_id(index), kind="cell", cell=index, builder="cell", args={"cell": index},
                       params=params[index])
        graph.add_edge(previous, cell_id(index))
        previous = cell_id(index)
    features = list(shapes[-1])
    for task in tasks:
        graph.add_node(fusion_id(task), kind="fusion", task=task, groups=[], params=0)  # one β per group
        graph.add_node(head_id(task), kind="head", task=task, builder="head",
                       args={"task": task, "features": features}, params=head_params[task])
        graph.add_edge(previous, fusion_id(task))
        graph.add_edge(fusion_id(task), head_id(task))
    return graph


def task_names(graph: nx.DiGraph) -> list[str]:
    return list(graph.graph["tasks"])


def num_cells(graph: nx.DiGraph) -> int:
    return len(graph.graph["cell_shapes"])


def pairs(graph: nx.DiGraph) -> list[Group]:
    return list(itertools.combinations(task_names(graph), 2))


def branch_nodes(graph: nx.DiGraph) -> list[str]:
    return [node for node, kind in graph.nodes(data="kind") if kind == "gmk"]


def branch_first_cells(graph: nx.DiGraph) -> dict[tuple[str, ...], int]:
    """Each branch group's first cell now, not the position that created a module: a later round can grow the
    same group's branch from a shallower cell, and the modules below it then read from the new one."""
    first: dict[tuple[str, ...], int] = {}
    for node in branch_nodes(graph):
        group, cell = tuple(graph.nodes[node]["group"]), graph.nodes[node]["cell"]
        first[group] = min(first.get(group, cell), cell)
    return first


def drop_initial_weights(graph: nx.DiGraph) -> None:
    """Forget the space's initial-weights file (timm's ``model.weights``): trained weights replace it, so a
    rebuilt model must not need the file any more."""
    if "weights" in graph.graph["space"]:
        graph.graph["space"]["weights"] = None


# What each ``search.modules`` setting grows, as reports and plots name it.
MODULE_NAMES: dict[str, str] = {"gmk": "GMK modules", "exclusive": "task-exclusive modules (w/o GMK)"}


def groups_for(pair: Group, modules: str) -> list[Group]:
    """The branch groups a conflicting pair spawns: the pair itself (GMK) or one per task (exclusive)."""
    return [pair] if modules == "gmk" else [(task,) for task in pair]


def is_grown(graph: nx.DiGraph, position: Position, modules: str) -> bool:
    pair, index = position
    return all(graph.has_node(branch_id(group, index)) for group in groups_for(pair, modules))


def candidate_positions(graph: nx.DiGraph, modules: str = "gmk") -> list[Position]:
    """Every (pair, cell) where a branch could still grow: cells with parameters, minus grown positions."""
    params = graph.graph["cell_params"]
    return [
        (pair, index)
        for index in range(num_cells(graph))
        if params[index] > 0
        for pair in pairs(graph)
        if not is_grown(graph, (pair, index), modules)
    ]


def grow(graph: nx.DiGraph, position: Position, modules: str = "gmk", round_index: int = 0) -> list[str]:
    """Activate ``position``: create the group's branch module at every cell from there to the output.

    Returns the new node ids (possibly none, where the branch already ran from an earlier cell).
    Raises ValueError if the position itself is already grown.
    """
    pair, start = position
    if is_grown(graph, position, modules):
        raise ValueError(f"position {pair} at cell {start} is already grown")
    last = num_cells(graph) - 1
    added = []
    for group in groups_for(pair, modules):
        for index in range(start, last + 1):
            node = branch_id(group, index)
            if graph.has_node(node):
                continue
            graph.add_node(
                node,
                kind="gmk",
                cell=index,
                group=list(group),
                builder="cell",
                args={"cell": index},
                params=graph.graph["cell_params"][index],
                round=round_index,
                activated_by=[list(pair), start],
            )
            trunk_input = INPUT if index == 0 else cell_id(index - 1)
            graph.add_edge(trunk_input, node)
            if index > 0 and graph.has_node(branch_id(group, index - 1)):
                graph.add_edge(branch_id(group, index - 1), node)
            if index < last and graph.has_node(branch_id(group, index + 1)):
                graph.add_edge(node, branch_id(group, index + 1))
            added.append(node)
        if added and branch_id(group, last) in added:
            for task in group:
                graph.add_edge(branch_id(group, last), fusion_id(task))
                fusion = graph.nodes[fusion_id(task)]
                fusion["groups"].append(list(group))
                fusion["params"] = len(fusion["groups"])
    return added


def branch_inputs(graph: nx.DiGraph, node: str) -> list[str]:
    """Predecessors in a fixed order: the trunk stream first, then the node's own branch stream."""
    preds = list(graph.predecessors(node))
    return sorted(preds, key=lambda p: graph.nodes[p]["kind"] == "gmk")


def fusion_groups(graph: nx.DiGraph, task: str) -> list[Group]:
    return [tuple(group) for group in graph.nodes[fusion_id(task)]["groups"]]


def task_sets(graph: nx.DiGraph) -> dict[str, frozenset[str]]:
    """For every node, the tasks whose loss depends on it: heads among its descendants (reachability)."""
    heads = {node: data["task"] for node, data in graph.nodes(data=True) if data["kind"] == "head"}
    sets = {}
    for node in graph.nodes:
        reach = nx.descendants(graph, node) | {node}
        sets[node] = frozenset(heads[n] for n in reach if n in heads)
    return sets


def module_counts(graph: nx.DiGraph) -> dict[tuple[Group, int], int]:
    """How many branch modules each activated (pair, cell) position created."""
    counts: dict[tuple[Group, int], int] = {}
    for node in branch_nodes(graph):
        pair, start = graph.nodes[node]["activated_by"]
        key = (tuple(pair), int(start))
        counts[key] = counts.get(key, 0) + 1
    return counts


def structure_error(graph: nx.DiGraph) -> str | None:
    """What is wrong with the wiring of an architecture graph, or None when :class:`mamo.model.MamoNet` can run it.

    The wiring rules live here, beside :func:`build_hps_graph` and :func:`grow` that follow them: the model reads
    each cell's and branch module's inputs off the edges and each task's prediction off its head, so an edited
    or truncated architecture.json (its edges emptied, say) would otherwise compile and fail only inside a
    forward pass or torch.export."""
    if not nx.is_directed_acyclic_graph(graph):
        return "its edges form a cycle"
    if INPUT not in graph:
        return f"it has no '{INPUT}' node"
    for node, data in graph.nodes(data=True):
        kind = data.get("kind")
        if kind not in ("input", "cell", "gmk", "fusion", "head"):
            return f"node '{node}' has an unknown kind {kind!r}"
        if kind in ("cell", "gmk"):
            index = data.get("cell")
            if not isinstance(index, int) or isinstance(index, bool):
                return f"node '{node}' has no cell index"
            # What MamoNet._run_cells reads (the wiring grow() makes): the trunk stream, and for a branch module
            # its own stream before it where the branch already ran there.
            wanted = {INPUT if index == 0 else cell_id(index - 1)}
            before = branch_id(tuple(data.get("group") or ()), index - 1)
            if kind == "gmk" and index > 0 and before in graph:
                wanted.add(before)
            preds = set(graph.predecessors(node))
            if preds != wanted:
                return f"node '{node}' reads from {sorted(preds)}, not {sorted(wanted)}"
    reachable = nx.descendants(graph, INPUT)
    last = num_cells(graph) - 1
    for task in graph.graph["tasks"]:
        fusion, head = fusion_id(task), head_id(task)
        for node in (fusion, head):
            if node not in reachable:
                return f"node '{node}' of task '{task}' is missing or not reachable from the input"
        # A fusion adds the last trunk cell and its groups' last branch modules; the head reads the fusion.
        fused = {cell_id(last), *(branch_id(tuple(group), last) for group in graph.nodes[fusion]["groups"])}
        if set(graph.predecessors(fusion)) != fused:
            return f"node '{fusion}' reads from {sorted(graph.predecessors(fusion))}, not {sorted(fused)}"
        if set(graph.predecessors(head)) != {fusion}:
            return f"node '{head}' reads from {sorted(graph.predecessors(head))}, not ['{fusion}']"
    return None


def graph_to_dict(graph: nx.DiGraph) -> dict:
    """Node-link JSON form (the canonical export)."""
    return nx.node_link_data(graph, edges="edges")


def graph_from_dict(data: dict) -> nx.DiGraph:
    return nx.node_link_graph(data, directed=True, edges="edges")


def graph_to_json(graph: nx.DiGraph) -> str:
    return json.dumps(graph_to_dict(graph), indent=1)
