"""The architecture drawn from the graph: shared trunk, GMK branches coloured by task pair, fusion, heads.

Like every picture in mamo it is a plain Agg :class:`~matplotlib.figure.Figure` (see :mod:`mamo.plots`); the
graph alone decides what is drawn, the model, when given, only supplies exact parameter counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
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


BOX_W, BOX_H = 0.78, 0.52  # a box in data units (a column is 1 wide, a lane 1 high)
# Points of a box's text: long lines get a smaller font, down to READABLE, and are cut in the middle to fit there;
# only a box of four lines goes below, for its height (down to SMALLEST). Whole names at 5 pt read worse than cut
# ones at 6 (an 8-task search's head and fusion labels, 2026-11-26).
FULL_SIZE, READABLE, SMALLEST = 7.5, 6.0, 5.0
_WIDTHS: dict[tuple[str, float, float], float] = {}


def _points(renderer: RendererAgg, line: str, size: float) -> float:
    """The width in points of ``line`` as Agg draws it at ``size`` points. Measured, not counted: FreeType fits
    small glyphs to whole pixels, so a line's width moves in steps (a fusion line measured 79.8 pt from 5.5 to
    6.0 pt, then 96.4 pt from 6.25 to 6.75), and fonts sized by the characters overran their boxes."""
    key = (line, size, renderer.dpi)
    if key not in _WIDTHS:
        if len(_WIDTHS) > 20_000:  # a long-lived process drawing many runs' names
            _WIDTHS.clear()
        width = renderer.get_text_width_height_descent(line, FontProperties(size=size), ismath=False)[0]
        _WIDTHS[key] = width * 72 / renderer.dpi
    return _WIDTHS[key]


class _Fit:
    """Box texts fitted by measuring them: ``room`` is a box's inner width in points, ``height`` its height."""

    def __init__(self, renderer: RendererAgg, room: float, height: float):
        self.renderer, self.room, self.height = renderer, room, height

    def fits(self, line: str, size: float) -> bool:
        return _points(self.renderer, line, size) <= self.room

    def cut(self, names: tuple[str, ...], line: Callable[[list[str]], str]) -> str:
        """``line`` of ``names``, each cut in the middle to the same length, as long as fits at READABLE."""
        text = line(list(names))
        for limit in range(max(map(len, names)) - 1, 2, -1):  # 3 characters (a…b) at the least
            if self.fits(text, READABLE):
                break
            text = line([shortened(name, limit) for name in names])
        return text

    def size(self, text: str) -> float:
        """The largest size, FULL_SIZE at most and in quarter points, at which every line of ``text`` fits."""
        lines = text.split("\n")
        # Hinted lines take 1.21-1.38 × the size each (measured at 5-7.5 pt): 3 lines fit at 7.5 pt, 4 at 5.5.
        size = min(FULL_SIZE, math.floor(self.height / (1.4 * len(lines)) * 4) / 4)
        while size > SMALLEST and not all(self.fits(line, size) for line in lines):
            size -= 0.25
        return max(size, SMALLEST)

    def named(self, kind: str, task: str) -> str:
        """``kind task`` on one line when it fits at FULL_SIZE, else the task on a line of its own, cut to fit."""
        line = f"{kind} {task}"
        return line if self.fits(line, FULL_SIZE) else f"{kind}\n{self.cut((task,), lambda n: n[0])}"


def _label(graph: nx.DiGraph, node: str, params: dict[str, int], fit: _Fit) -> str:
    data = graph.nodes[node]
    kind = data["kind"]
    if kind == "input":
        return "input\n" + "×".join(str(s) for s in data.get("shape", []))
    if kind == "cell":
        return f"cell {data['cell']}\n{params[node]:,} params"
    if kind == "gmk":
        name = "+".join(data["group"])
        lines = name if fit.fits(name, FULL_SIZE) else "\n".join(fit.cut((t,), lambda n: n[0]) for t in data["group"])
        return f"{lines}\n{params[node]:,} params"
    if kind == "fusion":
        groups = g.fusion_groups(graph, data["task"])
        if not groups:
            added = "\ntrunk only"
        elif len(groups) > 2:
            added = f"\n+β· {len(groups)} branches"
        else:
            added = "".join("\n" + fit.cut(tuple(grp), lambda n: f"+β·({'+'.join(n)})") for grp in groups)
        return fit.named("fusion", data["task"]) + added
    return f"{fit.named('head', data['task'])}\n{params[node]:,} params"


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
    box_w, box_h = BOX_W, BOX_H
    # Points per data unit across (the axes span cells + 3.2 columns) and down (rows + 0.1 lanes); 1 pt margins
    # at the sides (the height has a factor of its own in _Fit.size).
    fit = _Fit(figure.canvas.get_renderer(), box_w * 72 * 0.98 * width / (cells + 3.2) - 2, box_h * 72 * 0.85)
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
        text = _label(graph, node, params, fit)
        ax.text(x, y, text, ha="center", va="center", fontsize=fit.size(text), zorder=4)
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
