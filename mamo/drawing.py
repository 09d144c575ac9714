"""The architecture drawn from the graph: shared trunk, GMK branches coloured by task pair, fusion, heads.

Like every picture in mamo it is a plain Agg :class:`~matplotlib.figure.Figure` (see :mod:`mamo.plots`); the
graph alone decides what is drawn, the model, when given, only supplies exact parameter counts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
from matplotlib import colormaps
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

from mamo import graph as g
from mamo.plots import TRUNK, new_figure, save_figure, shortened, widest_inches
from mamo.runs import counted

if TYPE_CHECKING:
    from mamo.model import MamoNet


def _group_colours(graph: nx.DiGraph) -> dict[tuple[str, ...], tuple]:
    """A fixed colour per possible group (pairs, then single tasks) so a pair keeps its colour across rounds.

    Greys are left out: they belong to the trunk.
    """
    groups = g.pairs(graph) + [(t,) for t in g.task_names(graph)]
    palette = [c for c in colormaps["tab10"].colors if len(set(c)) > 1]
    if len(groups) > len(palette):
        palette = [c for c in colormaps["tab20"].colors if len(set(c)) > 1]
    if len(groups) > len(palette):  # six tasks or more: tab20's 18 colours repeated, so two pairs looked alike
        palette = [_spread_colour(i) for i in range(len(groups))]
    return {group: (*palette[i], 1.0) for i, group in enumerate(groups)}


def _spread_colour(index: int) -> tuple[float, float, float]:
    """The index-th of as many distinct saturated colours as needed: hues a golden-ratio turn apart (no two
    alike, neighbours far apart), alternating saturation and brightness; never a grey."""
    hue = (index * 0.6180339887498949) % 1.0
    return tuple(float(c) for c in hsv_to_rgb((hue, 0.9 - 0.3 * (index % 2), 0.9 - 0.3 * (index // 2 % 2))))


def node_parameters(graph: nx.DiGraph, model: MamoNet | None = None) -> dict[str, int]:
    """Parameters per node: cells and branches from the graph, heads and fusion weights from the model."""
    counts = {node: int(data.get("params", 0)) for node, data in graph.nodes(data=True)}
    if model is None:
        from mamo.spaces import space_from_spec
        from mamo.tasks import parse_tasks

        space = space_from_spec(graph.graph["space"])
        specs = parse_tasks(graph.graph["tasks"], "the architecture graph")
        shape = tuple(graph.graph["cell_shapes"][-1])
        for task, spec in specs.items():
            counts[g.head_id(task)] = sum(p.numel() for p in space.build_head(spec, shape).parameters())
    else:
        for node, named in model.node_parameters().items():
            counts[node] = sum(p.numel() for _, p in named)
    for task in g.task_names(graph):
        counts[g.fusion_id(task)] = len(g.fusion_groups(graph, task))
    return counts


def _layout(graph: nx.DiGraph) -> tuple[dict[str, tuple[float, float]], list[tuple[str, ...]]]:
    """Columns: input, cells 0..L-1, fusion, head. Rows: trunk at 0, one lane per branch group below it."""
    cells, tasks = g.num_cells(graph), g.task_names(graph)
    firsts = g.branch_first_cells(graph)
    order = list(g.pairs(graph)) + [(t,) for t in tasks]
    lanes = sorted(firsts, key=lambda grp: (firsts[grp], order.index(grp) if grp in order else len(order)))
    span = max(len(lanes), len(tasks) - 1)
    task_rows = np.linspace(0.0, -span, len(tasks)) if len(tasks) > 1 else np.array([-span / 2])
    positions = {g.INPUT: (0.0, 0.0)}
    for node, data in graph.nodes(data=True):
        kind = data["kind"]
        if kind == "cell":
            positions[node] = (data["cell"] + 1.0, 0.0)
        elif kind == "gmk":
            positions[node] = (data["cell"] + 1.0, -1.0 - lanes.index(tuple(data["group"])))
        elif kind in ("fusion", "head"):
            column = cells + 1.0 + (kind == "head")
            positions[node] = (column, float(task_rows[tasks.index(data["task"])]))
    return positions, lanes


BOX_LINE = 27  # characters a box holds at the smallest font (about 18 at the largest): longer names are cut


def _named(kind: str, task: str) -> str:
    """``kind task`` on one line when it fits a box, else the task on a line of its own, cut to fit."""
    line = f"{kind} {task}"
    return line if len(line) <= BOX_LINE else f"{kind}\n{shortened(task, BOX_LINE)}"


def _label(graph: nx.DiGraph, node: str, params: dict[str, int]) -> str:
    data = graph.nodes[node]
    kind = data["kind"]
    if kind == "input":
        return "input\n" + "×".join(str(s) for s in data.get("shape", []))
    if kind == "cell":
        return f"cell {data['cell']}\n{params[node]:,} params"
    if kind == "gmk":
        name = "+".join(data["group"])
        lines = name if len(name) <= 16 else "\n".join(shortened(task, BOX_LINE) for task in data["group"])
        return f"{lines}\n{params[node]:,} params"
    if kind == "fusion":
        groups = g.fusion_groups(graph, data["task"])
        room = (BOX_LINE - len("+β·()")) // 2 - 1  # per name of a pair
        added = "".join(f"\n+β·({'+'.join(shortened(task, room) for task in grp)})" for grp in groups) or "\ntrunk only"
        added = added if len(groups) <= 2 else f"\n+β· {len(groups)} branches"
        return _named("fusion", data["task"]) + added
    return f"{_named('head', data['task'])}\n{params[node]:,} params"


def _lane_legend(graph: nx.DiGraph, lanes: list[tuple[str, ...]], params: dict[str, int]) -> list[str]:
    """One legend entry per branch lane: its group, where and when it grew, its modules and parameters."""
    branches = g.branch_nodes(graph)
    entries = []
    for group in lanes:
        nodes = [n for n in branches if tuple(graph.nodes[n]["group"]) == group]
        rounds = sorted({graph.nodes[n]["round"] for n in nodes})
        start = min(graph.nodes[n]["cell"] for n in nodes)
        # "round 2, 4, 5, 4 modules" read as four rounds: the rounds end with a semicolon.
        entries.append(f"{'+'.join(shortened(task, 40) for task in group)}: from cell {start}, "
                       f"{'round' if len(rounds) == 1 else 'rounds'} {', '.join(map(str, rounds))}; "
                       f"{counted(len(nodes), 'module')}, {sum(params[n] for n in nodes):,} params")
    return entries


def draw_architecture(
    graph: nx.DiGraph,
    path: Path | None = None,
    model: MamoNet | None = None,
    title: str | None = None,
    params: dict[str, int] | None = None,
) -> Figure:
    """The network drawn from its graph: shared trunk (grey), branch modules in one lane and colour per
    group, fusions and heads per task, parameters per node; saved as PNG when ``path`` is given.

    Head sizes come from ``model`` when given, else from the graph's search space; ``params`` (from
    :func:`node_parameters`) skips that lookup.
    """
    positions, lanes = _layout(graph)
    params = params if params is not None else node_parameters(graph, model)
    colours = _group_colours(graph)
    cells, tasks = g.num_cells(graph), g.task_names(graph)
    rows = max(len(lanes), len(tasks) - 1) + 1
    # In inches: the title above, the lanes' legend (two columns) below, 0.85 per row of boxes between. As
    # fractions of the figure, a network with 30 lanes left 1.5 inches blank above its boxes.
    width = 1.55 * (cells + 3) + 0.4
    legend = _lane_legend(graph, lanes, params)
    # Two columns of the lanes' legend when two of its widest entry fit side by side, else one.
    columns = 2 if legend and 2 * (widest_inches(legend, 7.5) + 0.45) <= width - 0.2 else 1
    head, foot = 0.55, 0.25 + (0.16 * math.ceil(len(lanes) / columns) + 0.1 if lanes else 0.0)
    plot = 0.85 * (rows + 0.1)
    height = head + plot + foot
    figure = new_figure(width, height)
    ax = figure.add_axes((0.01, foot / height, 0.98, plot / height))
    box_w, box_h = 0.78, 0.52
    # Patches go in with add_artist: the limits are set by hand below, and add_patch's per-patch data-limit
    # update cost about a fifth of the drawing (61 -> 50 ms for a quick search's picture, measured).

    def node_colour(node: str) -> tuple[float, ...]:
        data = graph.nodes[node]
        return colours[tuple(data["group"])] if data["kind"] == "gmk" else TRUNK

    for source, target in graph.edges:
        (sx, sy), (tx, ty) = positions[source], positions[target]
        branch_edge = graph.nodes[source]["kind"] == "gmk"
        colour = node_colour(source) if branch_edge else "#9a9a9a"
        ax.add_artist(FancyArrowPatch((sx + box_w / 2, sy), (tx - box_w / 2, ty), arrowstyle="-|>", mutation_scale=9,
                                      color=colour, lw=1.6 if branch_edge else 1.0, shrinkA=0, shrinkB=1, zorder=2))
    for node, (x, y) in positions.items():
        kind = graph.nodes[node]["kind"]
        face = {"input": "#ffffff", "cell": "#e6e6e6", "fusion": "#fff7e0", "head": "#e8f1fb"}.get(kind)
        edge = node_colour(node)
        if kind == "gmk":
            face = tuple(0.35 + 0.65 * c for c in edge[:3])
        ax.add_artist(FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h, boxstyle="round,pad=0.02",
                                     fc=face, ec=edge, lw=1.8 if kind == "gmk" else 1.0, zorder=3))
        text = _label(graph, node, params)
        longest = max(len(line) for line in text.split("\n"))
        # About 18 characters fit a box at 7.5 pt; long task names get a smaller font, not an overflow.
        ax.text(x, y, text, ha="center", va="center", fontsize=max(5.0, min(7.5, 7.5 * 18 / longest)), zorder=4)
    ax.set_xlim(-0.6, cells + 2.6)
    low = min(y for _, y in positions.values())
    ax.set_ylim(low - 0.55, 0.55)
    ax.axis("off")
    branches = g.branch_nodes(graph)
    total = sum(params.values())
    heading = f"{title}: " if title else ""
    figure.suptitle(f"{heading}{counted(len(branches), 'branch module')}, {total:,} parameters "
                    f"(shared trunk {sum(params[g.cell_id(k)] for k in range(cells)):,})", fontsize=10,
                    y=1 - 0.15 / height, va="top")
    if lanes:
        handles = [Patch(fc=colours[group], label=label) for group, label in zip(lanes, legend, strict=True)]
        figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=7.5, frameon=False,
                      bbox_to_anchor=(0.5, 0.1 / height))
    if path is not None:
        save_figure(figure, Path(path))
    return figure
