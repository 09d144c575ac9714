"""The plots report.md embeds, saved beside it: test metrics per task and method, and modules grown per round."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mamo.plots import new_figure, save_figure, shortened
from mamo.tasks import TaskSpec


def metric_bars_figure(rows: list[dict], tasks: dict[str, TaskSpec]) -> Figure:
    """One panel per (task, metric): a bar per method (STL, HPS, the grown model, ...) with its value."""
    from mamo.report import metric_columns

    columns = metric_columns(tasks)
    methods = [row["method"] + (f"\nΔ {row['delta']:+.1f}%" if "relative" in row else "") for row in rows]
    palette = colormaps["tab10"]
    per_row = min(len(columns), 3)
    grid_rows = math.ceil(len(columns) / per_row)
    label_width = 0.075 * max(len(line) for name in methods for line in name.split("\n"))
    figure = new_figure(label_width + 3.2 * per_row, 0.35 * len(methods) * grid_rows + 1.1 * grid_rows + 0.4)
    axes = figure.subplots(grid_rows, per_row, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(columns):
            ax.set_visible(False)
            continue
        task, metric, higher = columns[index]
        values = [row["tasks"][task][metric] for row in rows]
        y = np.arange(len(methods))[::-1]
        ax.barh(y, values, color=[palette(i % 10) for i in range(len(methods))], height=0.65)
        for yy, value in zip(y, values, strict=True):
            ax.text(value, yy, f" {value:.4g}", va="center", fontsize=7.5)
        ax.set_yticks(y, methods if index % per_row == 0 else [])
        ax.set_xlim(0, max(max(values), 1e-12) * 1.25) if min(values) >= 0 else None
        ax.xaxis.set_major_locator(MaxNLocator(4))  # small values (mIoU early on) get long tick labels
        title = f"{task} {metric} ({'higher' if higher else 'lower'} is better)"
        # About 46 characters fit a panel's 3.2 inches at 9 pt: a long task name gets a line of its own, cut to fit.
        ax.set_title(title if len(title) <= 44 else f"{shortened(task, 44)}\n{title[len(task) + 1:]}", fontsize=9)
        ax.tick_params(labelsize=8)
        for spine in ("top", "right"):
            ax.spines[spine].set_visible(False)
    figure.suptitle("Test metrics per task", fontsize=10)
    two_lines = any(ax.get_title().count("\n") for ax in axes.flat)
    figure.subplots_adjust(left=(label_width + 0.2) / figure.get_figwidth(), right=0.97,
                           top=(0.8 if grid_rows == 1 else 0.9) - (0.08 / grid_rows if two_lines else 0.0),
                           bottom=0.12 if grid_rows == 1 else 0.07, wspace=0.25, hspace=0.75 if two_lines else 0.6)
    return figure


def growth_figure(rounds: list[dict], module_name: str = "GMK modules") -> Figure:
    """New modules per detection round (bars, with the activated positions) and the running total (line);
    ``module_name`` names what grew (:data:`mamo.graph.MODULE_NAMES`)."""
    listed = len(rounds) <= LISTED_ROUNDS
    labels = [f"round {r['round']}\n" + _listed_positions(r["activated"]) if listed else str(r["round"])
              for r in rounds]
    # Each round's tick gets the width of its longest listed position (about 0.055 inch a character at 8 pt); with
    # more rounds than that, the ticks are round numbers in a picture no wider than MAX_INCHES (50 rounds were 82).
    per_round = max([1.6, *(0.055 * len(line) + 0.3 for label in labels for line in label.split("\n"))])
    width = per_round * len(rounds) + 2.0 if listed else min(MAX_INCHES, 0.25 * len(rounds) + 2.0)
    figure = new_figure(max(4.5, width), 3.4)
    ax = figure.add_subplot()
    if not rounds:
        ax.text(0.5, 0.5, "no detection rounds: the network stayed HPS", ha="center", va="center")
        ax.axis("off")
        return figure
    numbers = [r["round"] for r in rounds]
    modules = [r["modules"] for r in rounds]
    totals = np.cumsum(modules)
    ax.bar(numbers, modules, color="#d62728", width=0.55, label="new modules this round")
    ax.plot(numbers, totals, color="#333333", marker="o", label="modules in the network")
    top = max(int(totals.max()), 1)
    for number, count, total in zip(numbers, modules, totals, strict=True):
        if not listed:
            break  # too narrow a bar for its numbers: the axis says them
        if count >= 0.15 * top:
            ax.text(number, count / 2, f"+{count}", ha="center", va="center", fontsize=9, color="white")
        elif count and total - count > 0.12 * top:
            # White on a bar too short to hold it was white on the page: dark, above the bar. Where the line's
            # total label sits right there too, that label (and the one before it) already tells the count.
            ax.text(number, count + 0.02 * top, f"+{count}", ha="center", va="bottom", fontsize=9, color="#d62728")
        ax.text(number, total + 0.04 * top, f"{total}", ha="center", va="bottom", fontsize=8)
    if listed:  # the activated (pair, cell) positions go under each round's tick, where they never hit the bars
        ax.set_xticks(numbers, labels, fontsize=8)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=20))
        ax.set_xlim(numbers[0] - 0.7, numbers[-1] + 0.7)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("round (report.md lists the positions each round activated)", fontsize=8)
    ax.set_ylim(0, top * 1.3)
    ax.set_ylabel(module_name.split(" (")[0])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{module_name[0].upper()}{module_name[1:]} grown per detection round", fontsize=10, pad=20)
    # In one row between the title and the plot: inside it, the legend covered the first round's total.
    ax.legend(fontsize=8, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)
    # The plot keeps its height in inches and the listing gets its own below it: as fractions of a figure that
    # grew with the listing, 156 positions in one round left the plot no height at all (matplotlib raised).
    below = 0.35 + 0.15 * max(label.count("\n") + 1 for label in labels)
    height = 0.65 + PLOT_INCHES + below
    figure.set_figheight(height)
    figure.subplots_adjust(left=0.12, right=0.97, top=1 - 0.65 / height, bottom=below / height)
    return figure


PLOT_INCHES = 2.3  # the growth plot's own height, whatever is listed under it
LISTED_ROUNDS = 12  # rounds up to which each gets its own tick with its positions
MAX_INCHES = 14.0  # the widest growth plot once the rounds are too many to list
LISTED_POSITIONS = 12  # positions named under a round; report.md lists all of them


def _listed_positions(activated: list) -> str:
    names = [f"{'+'.join(shortened(task, 20) for task in pair)}@cell{cell}" for pair, cell in activated]
    if len(names) > LISTED_POSITIONS:
        names = [*names[: LISTED_POSITIONS - 1], f"and {len(names) - LISTED_POSITIONS + 1} more"]
    return "\n".join(names) or "none"


METRICS_PLOT = "report_metrics.png"  # the one plot a train run's report embeds too (it grows nothing)

REPORT_PLOTS: dict[str, Callable[[list[dict], list[dict], dict[str, TaskSpec], str], Figure]] = {
    METRICS_PLOT: lambda rows, rounds, tasks, module_name: metric_bars_figure(rows, tasks),
    "report_growth.png": lambda rows, rounds, tasks, module_name: growth_figure(rounds, module_name),
}


def report_plots(run_dir: Path, rows: list[dict], rounds: list[dict], tasks: dict[str, TaskSpec],
                 module_name: str = "GMK modules") -> list[Path]:
    """Save the report's plots beside report.md: metric bars per task and method, modules grown per round."""
    return [save_figure(make(rows, rounds, tasks, module_name), Path(run_dir) / name)
            for name, make in REPORT_PLOTS.items()]
