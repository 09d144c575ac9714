"""mamo's conflict pictures: heatmaps and cosine histograms (the architecture: drawing.py; report.md's plots:
report_plots.py), and the figure helpers all three share.

Figures are plain :class:`matplotlib.figure.Figure` objects on the Agg canvas, never pyplot: nothing here
touches matplotlib's global state or needs a display, so rendering works headless and from any caller.
Conflict pictures read a :class:`~mamo.conflicts.ConflictStats`; the architecture is drawn from the graph
alone (the model, when given, only supplies exact head sizes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from matplotlib.textpath import text_to_path
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import ScaledTranslation

from mamo.conflicts import HISTOGRAM_EDGES, ConflictStats
from mamo.runs import counted
from mamo.writes import replace_atomically

DPI = 100
NO_PARAMS = "#d9d9d9"  # cells without parameters and the matrix diagonal: nothing to measure there
TRUNK = "#4d4d4d"
BOX = 0.6  # inches per heatmap entry
_TITLE_ROOM = 0.5  # inches above a heatmap panel for its two-line title


def _batches(number: int) -> str:
    return counted(number, "mini-batch", "mini-batches")


def new_figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas (no pyplot, no global backend)."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """The rendered figure as an H×W×3 uint8 array (what TensorBoard's add_image takes with HWC)."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def shortened(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` characters with an ellipsis in the middle, keeping both ends (task names often
    differ only at one of them), for boxes and ticks with no room for a long name; the full names stay in
    the legends, tables and TensorBoard tags."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 3
    return f"{name[: limit - 1 - tail]}…{name[len(name) - tail:]}"


def save_figure(figure: Figure, path: Path, dpi: int = DPI) -> Path:
    """``figure`` as a picture at ``path`` (its suffix gives the format), through a temporary file: a full disk
    leaves the earlier picture and no half of the new one, and its error names ``path``."""
    path = Path(path)
    # The format spelled out: matplotlib would read it from the temporary name's ".tmp".
    replace_atomically(path, lambda tmp: figure.savefig(tmp, format=path.suffix[1:] or "png", dpi=dpi,
                                                        facecolor="white"))
    return path


# ------------------------------------------------------------------------------------------ conflict heatmaps


def share(part: float, whole: int) -> str:
    """``part`` of ``whole`` in whole percent, halves rounded up (2 of 16 is 13%; Python's format makes it 12%)."""
    return f"{math.floor(100 * part / max(whole, 1) + 0.5)}%"


@dataclass(frozen=True)
class HeatmapKind:
    """How one kind of m×m conflict matrix is read, coloured and annotated."""

    matrix: Callable[[ConflictStats], np.ndarray]  # (L, m, m)
    cmap: str
    label: str
    limits: Callable[[ConflictStats], tuple[float, float]]  # the colour scale shared by every cell
    annotate: Callable[[float, ConflictStats], str]
    whole_ticks: bool = False  # colour-bar ticks at whole numbers only (counts)


def _cosine_limit(stats: ConflictStats) -> float:
    # Symmetric around 0 so white means "orthogonal"; wide enough for the strongest off-diagonal mean.
    m = len(stats.tasks)
    off = ~np.eye(m, dtype=bool)
    usable = stats.usable_cells()
    largest = max((float(np.abs(stats.mean_cosine()[c][off]).max()) for c in usable if m > 1), default=0.0)
    return min(1.0, max(0.1, math.ceil(largest * 10) / 10))


KINDS: dict[str, HeatmapKind] = {
    "counts": HeatmapKind(
        matrix=lambda s: s.counts.astype(float),
        cmap="Reds",
        label="conflicts Q\n(mini-batches with cos < 0)",
        # Full red = the pair conflicts in every mini-batch of the round, so colours compare across rounds.
        limits=lambda s: (0.0, float(max(s.steps, 1))),
        annotate=lambda v, s: f"{int(v)}\n{share(v, s.steps)}",
        whole_ticks=True,
    ),
    "cosine": HeatmapKind(
        matrix=lambda s: s.mean_cosine(),
        cmap="RdBu",
        label="mean gradient cosine\n(red: pulls apart)",
        limits=lambda s: (-_cosine_limit(s), _cosine_limit(s)),
        annotate=lambda v, s: f"{v:+.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:+.3f}",
    ),
}


def _text_colour(rgba: tuple) -> str:
    luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
    return "black" if luminance > 0.55 else "white"


TASK_NAME = "task-name"  # the gid of the task-name texts along a heatmap's axes


NAME_SIZE = 9.5  # points, the task names along a heatmap's axes


def _tilted(tasks: list[str]) -> bool:
    return max(map(len, tasks)) > 4  # long names under the columns would run into each other


def widest_inches(texts: list[str], size: float) -> float:
    """The width of the widest of ``texts`` in the default font at ``size`` points, without a figure."""
    font = FontProperties(size=size)
    return max(text_to_path.get_text_width_height_descent(t, font, ismath=False)[0] for t in texts) / 72


def _task_names(ax: Axes, tasks: list[str], fontsize: float = NAME_SIZE) -> None:
    """Task names under the columns and left of the rows, as plain texts rather than axis ticks (each tick
    builds two lines and a label and is laid out again on every draw; about 10 ms less per overview)."""
    ax.set_xticks([])
    ax.set_yticks([])
    tilt = _tilted(tasks)
    inches = ax.figure.dpi_scale_trans
    under = ax.get_xaxis_transform() + ScaledTranslation(0, -4 / 72, inches)  # x: data, y: axes fraction
    left = ax.get_yaxis_transform() + ScaledTranslation(-4 / 72, 0, inches)  # x: axes fraction, y: data
    for k, task in enumerate(tasks):
        ax.text(k, 0, task, transform=under, fontsize=fontsize, gid=TASK_NAME, va="top", rotation=30 if tilt else 0,
                ha="right" if tilt else "center", rotation_mode="anchor")
        ax.text(0, k, task, transform=left, fontsize=fontsize, gid=TASK_NAME, ha="right", va="center")


def conflict_heatmap(
    stats: ConflictStats,
    cell: int,
    kind: str,
    ax: Axes,
    outline: list[tuple[str, str]] | None = None,
) -> AxesImage:
    """Annotated m×m heatmap of one cell on ``ax``: conflict counts Q or mean cosine, task names on both axes,
    on the scale shared by every cell of ``stats``. ``outline`` boxes these pairs (the overview: those that got a
    new module at this cell). Returns the image, for the row's colour bar.
    """
    spec = KINDS[kind]
    vmin, vmax = spec.limits(stats)
    m = len(stats.tasks)
    has_params = stats.cell_params[cell] > 0
    values = spec.matrix(stats)[cell]
    # A pair with no mini-batch in which both gradients at this cell were non-zero has no cosine: grey, not a
    # "0 conflicts, +0.00" that reads like a measured, orthogonal pair.
    unmeasured = stats.measured[cell] == 0
    masked = np.ma.masked_array(values, mask=np.eye(m, dtype=bool) | (not has_params) | unmeasured)
    cmap = colormaps[spec.cmap].with_extremes(bad=NO_PARAMS)
    norm = Normalize(vmin, vmax)
    image = ax.imshow(masked, cmap=cmap, norm=norm)
    ax.set_facecolor(NO_PARAMS)
    size = 8.5
    for i in range(m):
        for j in range(m):
            if i != j and has_params and unmeasured[i, j]:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=size, color="#555555")
            elif i != j and has_params:
                ax.text(j, i, spec.annotate(values[i, j], stats), ha="center", va="center", fontsize=size,
                        color=_text_colour(cmap(norm(values[i, j]))))
    if not has_params:
        ax.text((m - 1) / 2, (m - 1) / 2, "no\nparameters", ha="center", va="center", fontsize=size, color="#555555")
    tasks = list(stats.tasks)
    for a, b in outline or []:
        for i, j in ((tasks.index(a), tasks.index(b)), (tasks.index(b), tasks.index(a))):
            ax.add_patch(Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False, lw=2.2, ec="#1a1a1a"))
    _task_names(ax, tasks)
    ax.set_title(f"cell {cell}\n{stats.cell_params[cell]:,} params", fontsize=size + 1)
    # White separators as two line collections: minor-tick grids cost a tick object per line.
    ax.hlines(np.arange(0.5, m - 1), -0.5, m - 0.5, colors="white", linewidth=1.5)
    ax.vlines(np.arange(0.5, m - 1), -0.5, m - 0.5, colors="white", linewidth=1.5)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return image


def worst_conflict(stats: ConflictStats) -> str:
    """One sentence naming the (pair, cell) with the most conflicts, for a picture's headline."""
    usable = stats.usable_cells()
    if not usable or not stats.pairs or stats.steps == 0:
        return "no conflicts measured"
    cosine = stats.mean_cosine()
    best = max((stats.conflict_count((pair, c)), -c, pair) for c in usable for pair in stats.pairs)
    q, cell, (a, b) = best[0], -best[1], best[2]
    if q == 0:
        off_diagonal = ~np.eye(len(stats.tasks), dtype=bool)
        if not any(stats.measured[c][off_diagonal].any() for c in usable):
            return "no pair measured: in every mini-batch a task's gradient was zero at every cell"
        return "no pair conflicted in any mini-batch"
    mean = cosine[cell, stats.tasks.index(a), stats.tasks.index(b)]
    return (f"most conflict: {a} vs {b} at cell {cell}, in {q} of {_batches(stats.steps)} "
            f"({share(q, stats.steps)}), mean cosine {KINDS['cosine'].annotate(mean, stats)}")  # as its cell reads


def _overview(stats: ConflictStats, grown: list | None, title: str | None) -> tuple[Figure, dict, dict]:
    """The overview figure, its heatmap axes by (kind, cell), and per (kind, cell) the two regions of the
    figure (in inches, origin bottom left) that make that cell's own picture: its panel with tick labels and
    title, and its row's colour bar with ticks and label.

    Axes are placed by hand in inches (a matrix entry is BOX wide whatever m is, gaps leave room for the
    task names): much faster than a constrained layout, text keeps one size for any m or cell count, and
    the per-cell regions are known from one measurement of the longest task name.
    """
    m, cells = len(stats.tasks), stats.num_cells
    side = BOX * m
    name = widest_inches(stats.tasks, NAME_SIZE)  # a width per character ran 40 W's into the next panel
    label = name + 0.25  # room for the task names left of the rows
    below = 0.5 * name + 0.3 if _tilted(stats.tasks) else 0.35  # under the columns: sin 30° of a tilted name
    gap_x, gap_y, head, foot = label + 0.35, below + 0.6, 1.15, 0.55
    headline = [f"{title or 'Where tasks fight'} ({_batches(stats.steps)})", worst_conflict(stats)]
    notes = ["Top: Q = mini-batches in which the two tasks' gradients at that cell point apart (cos < 0), "
             "and its share of the round.",
             "Bottom: mean gradient cosine; red = the tasks pull the cell apart, blue = they agree.",
             *(["Boxed: the pair got a new module at that cell this round (its branch runs from the activated "
                "cell to the output)."] if grown else [])]
    panels_width = label + cells * side + (cells - 1) * gap_x + 1.5
    # One or two small cells are narrower than the headline and the notes, which were cut at both edges: the
    # figure takes the text's width and the panels move to its middle.
    text_width = max(widest_inches(headline, 10.5), widest_inches(notes, 7.5)) + 0.4
    left = max(0.0, (text_width - panels_width) / 2)
    # Whole pixels: a measured name width gives fractions, which the canvas would truncate.
    width = math.ceil(max(panels_width, text_width) * DPI) / DPI
    height = math.ceil((head + 2 * side + gap_y + below + foot) * DPI) / DPI
    figure = new_figure(width, height)

    def place(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        return x / width, y / height, w / width, h / height

    boxed: dict[int, list[tuple[str, str]]] = {}
    for pair, cell in grown or []:
        boxed.setdefault(int(cell), []).append(tuple(pair))
    panels, regions = {}, {}
    bar_x = left + label + cells * side + (cells - 1) * gap_x + 0.2
    for row, kind in enumerate(KINDS):
        y = height - head - side - row * (side + gap_y)
        # Below a panel: the x tick labels; above it: its two-line title (the row gap and the head leave
        # more room than either needs, so neighbouring rows never reach into a region).
        low, high = y - below - 0.05, y + side + _TITLE_ROOM
        bar_region = (bar_x - 0.05, low, min(width, bar_x + 1.25), high)
        image = None
        for cell in range(cells):
            x = left + label + cell * (side + gap_x)
            panels[kind, cell] = figure.add_axes(place(x, y, side, side))
            image = conflict_heatmap(stats, cell, kind, ax=panels[kind, cell], outline=boxed.get(cell))
            regions[kind, cell] = [(max(0.0, x - label), low, x + side + 0.1, high), bar_region]
        bar = figure.colorbar(image, cax=figure.add_axes(place(bar_x, y, 0.14, side)))
        bar.ax.yaxis.set_major_locator(MaxNLocator(5, integer=KINDS[kind].whole_ticks))
        bar.set_label(KINDS[kind].label, fontsize=8, labelpad=4)
        bar.ax.tick_params(labelsize=7)
    figure.suptitle("\n".join(headline), fontsize=10.5, y=1 - 0.08 / height, va="top")
    figure.text(0.5, 0.08 / height, "\n".join(notes), ha="center", va="bottom", fontsize=7.5, color="#333333")
    return figure, panels, regions


def overview_figure(stats: ConflictStats, grown: list | None = None, title: str | None = None) -> Figure:
    """Every cell side by side: conflict counts on top, mean cosine below, one colour scale per row.

    ``grown`` ([[task_a, task_b], cell] entries, :func:`mamo.board.grown_positions`) boxes the positions where
    the round created a module: from each activated cell to the output, none where an earlier branch ran.
    """
    return _overview(stats, grown, title)[0]


def _crop(pixels: np.ndarray, regions: list[tuple[float, float, float, float]]) -> np.ndarray:
    """The pixels under regions given in inches (x0, y0, x1, y1; origin bottom left), side by side."""
    height, width = pixels.shape[:2]
    top = height - round(max(r[3] for r in regions) * DPI)
    bottom = height - round(min(r[1] for r in regions) * DPI)
    rows = slice(max(0, top), min(height, bottom))
    parts = [pixels[rows, max(0, round(x0 * DPI)) : min(width, round(x1 * DPI))] for x0, _, x1, _ in regions]
    return np.concatenate(parts, axis=1)


def overview_images(
    stats: ConflictStats, grown: list | None = None, title: str | None = None
) -> tuple[np.ndarray, dict[tuple[str, int], np.ndarray]]:
    """The overview as an array, and every cell's heatmap (with its row's colour bar) cut out of it.

    One render gives all 2·L per-cell images: they share the overview's colour scale by construction, and
    rendering once keeps per-round logging cheap.
    """
    figure, _, regions = _overview(stats, grown, title)
    pixels = figure_to_array(figure)
    return pixels, {key: _crop(pixels, parts) for key, parts in regions.items()}


HISTOGRAM_PAIRS = 12  # panels in the histogram picture: with more pairs, those with the most conflicts


def histogram_pairs(stats: ConflictStats) -> list[int]:
    """The indices of the pairs the histogram picture shows: all of them, or the :data:`HISTOGRAM_PAIRS` with
    the most conflicts over every cell (TensorBoard's histograms keep every pair)."""
    if len(stats.pairs) <= HISTOGRAM_PAIRS:
        return list(range(len(stats.pairs)))
    index = {task: k for k, task in enumerate(stats.tasks)}
    totals = [int(stats.counts[:, index[a], index[b]].sum()) for a, b in stats.pairs]
    return sorted(sorted(range(len(totals)), key=lambda p: -totals[p])[:HISTOGRAM_PAIRS])


def histogram_figure(stats: ConflictStats) -> Figure:
    """Per task pair, the distribution of cosines over the round's mini-batches, one line per cell; one legend
    of the cells for the whole figure. With many tasks, only the pairs :func:`histogram_pairs` picks."""
    shown = histogram_pairs(stats)
    columns = max(1, min(len(shown), 3))
    rows = max(1, math.ceil(len(shown) / columns))
    usable = stats.usable_cells()
    legend_rows = math.ceil(len(usable) / 8)
    head = 0.75 + 0.2 * legend_rows  # inches above the panels: the title and the cells' legend
    which = "" if len(shown) == len(stats.pairs) else (
        f", the {len(shown)} of {len(stats.pairs)} pairs with the most conflicts")
    title = f"Gradient cosines per pair and cell over {_batches(stats.steps)} (▲ = mean){which}"
    # One pair's panel is narrower than the title, which touched both edges.
    width, height = max(4.2 * columns + 0.6, widest_inches([title], 10) + 0.4), 2.8 * rows + 0.3 + head
    figure = new_figure(width, height)
    axes = figure.subplots(rows, columns, squeeze=False)
    palette = colormaps["viridis"]
    means = stats.mean_cosine()
    for slot, ax in enumerate(axes.flat):
        if slot >= len(shown):
            ax.set_visible(False)
            continue
        index = shown[slot]
        a, b = stats.pairs[index]
        i, j = stats.tasks.index(a), stats.tasks.index(b)
        ax.axvspan(-1.0, 0.0, color="#d62728", alpha=0.07, lw=0)
        ax.axvline(0.0, color="#888888", lw=0.8)
        for rank, cell in enumerate(usable):
            colour = palette(rank / max(len(usable) - 1, 1) * 0.9)
            ax.stairs(stats.histograms[cell, index] / max(stats.steps, 1), HISTOGRAM_EDGES, color=colour, lw=1.6,
                      label=f"cell {cell}")
            if stats.measured[cell, i, j]:  # an unmeasured pair has no mean (mean_cosine's 0 would read as one)
                ax.plot([means[cell, i, j]], [0.0], marker="^", color=colour, ms=7, clip_on=False)
        if not any(stats.measured[cell, i, j] for cell in usable):
            ax.text(0.5, 0.5, "not measured: a gradient was\nzero in every mini-batch", transform=ax.transAxes,
                    ha="center", va="center", fontsize=8, color="#555555", bbox={"fc": "white", "ec": "none"})
        ax.set_xlim(-1.0, 1.0)
        ax.set_ylim(bottom=0.0)
        ax.set_title(f"{a} vs {b}", fontsize=10)
        ax.set_xlabel("gradient cosine (red side: conflict)", fontsize=8)
        ax.set_ylabel("share of mini-batches", fontsize=8)
        ax.tick_params(labelsize=7)
    # Placed in inches from the top: as fractions of a tall figure the title sat on the first row of panels.
    figure.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    if usable and shown:
        figure.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper center", ncol=min(len(usable), 8),
                      fontsize=7.5, frameon=False, bbox_to_anchor=(0.5, 1 - 0.4 / height))
    figure.subplots_adjust(left=0.6 / width, right=1 - 0.25 / width, top=1 - head / height, bottom=0.55 / height,
                           wspace=0.3, hspace=0.6)
    return figure
