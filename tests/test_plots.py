"""The pictures: annotated conflict heatmaps on a shared colour scale, the overview, histograms, the
architecture drawing and the report's plots, rendered headless and read back from their artists."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from matplotlib.image import AxesImage
from PIL import Image

from mamo import drawing, plots, report_plots
from mamo import graph as g
from mamo.config import ModelConfig
from mamo.conflicts import ConflictStats
from mamo.report import build_rows
from mamo.spaces import create_space
from mamo.tasks import parse_tasks

TASKS = ["seg", "depth", "normal"]


def known_stats() -> ConflictStats:
    """Three tasks, three cells (cell 0 without parameters), 10 mini-batches, hand-set Q and cosine sums."""
    stats = ConflictStats(TASKS, 3, [0, 120, 4000])
    stats.steps = 10
    q = {1: {(0, 1): 7, (0, 2): 1, (1, 2): 0}, 2: {(0, 1): 2, (0, 2): 10, (1, 2): 4}}
    mean = {1: {(0, 1): -0.3, (0, 2): 0.2, (1, 2): 0.05}, 2: {(0, 1): 0.1, (0, 2): -0.6, (1, 2): 0.0}}
    for cell in (1, 2):
        for (i, j), value in q[cell].items():
            stats.counts[cell, i, j] = stats.counts[cell, j, i] = value
            stats.cosine_sums[cell, i, j] = stats.cosine_sums[cell, j, i] = mean[cell][i, j] * stats.steps
        np.fill_diagonal(stats.cosine_sums[cell], stats.steps)
        stats.measured[cell] = stats.steps  # both gradients non-zero in every mini-batch
    stats.histograms[2, 1, 2] = 10  # seg vs normal at cell 2: every cosine in [-0.8, -0.7)
    return stats


def annotations(ax) -> dict[tuple[int, int], str]:
    """The heatmap's value labels keyed by (row, column) of the matrix."""
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in value_texts(ax)}


def value_texts(ax) -> list:
    return [t for t in ax.texts if t.get_gid() != plots.TASK_NAME]


def task_names(ax) -> tuple[list[str], list[str]]:
    """The task names under the columns (left to right) and beside the rows (top to bottom)."""
    names = [t for t in ax.texts if t.get_gid() == plots.TASK_NAME]
    columns = sorted((t for t in names if t.get_va() == "top"), key=lambda t: t.get_position()[0])
    rows = sorted((t for t in names if t.get_va() == "center"), key=lambda t: t.get_position()[1])
    return [t.get_text() for t in columns], [t.get_text() for t in rows]


def heatmap_images(figure) -> list[AxesImage]:
    return [image for ax in figure.axes for image in ax.images]


def test_counts_heatmap_annotates_every_pair_with_q_and_its_share():
    stats = known_stats()
    figure = plots.new_figure(4, 4)
    ax = figure.add_subplot()
    image = plots.conflict_heatmap(stats, 1, "counts", ax=ax)
    assert annotations(ax) == {
        (0, 1): "7\n70%", (1, 0): "7\n70%", (0, 2): "1\n10%", (2, 0): "1\n10%", (1, 2): "0\n0%", (2, 1): "0\n0%",
    }
    assert task_names(ax) == (TASKS, TASKS)
    # Under the matrix and left of it, on the picture itself.
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    for text in (t for t in ax.texts if t.get_gid() == plots.TASK_NAME):
        extent = text.get_window_extent(renderer)
        assert extent.y1 <= frame.y0 or extent.x1 <= frame.x0
    # Full red means "conflicts in every mini-batch": the scale runs from 0 to the round's mini-batches.
    assert image.get_clim() == (0.0, 10.0)
    assert np.ma.getmaskarray(image.get_array()).diagonal().all()  # the diagonal carries no value


def test_cosine_heatmap_is_symmetric_around_zero_and_red_means_conflict():
    stats = known_stats()
    ax = plots.new_figure(4, 4).add_subplot()
    image = plots.conflict_heatmap(stats, 2, "cosine", ax=ax)
    labels = annotations(ax)
    assert labels[0, 2] == labels[2, 0] == "-0.60"
    assert labels[0, 1] == "+0.10" and labels[1, 2] == "+0.00"
    assert image.get_clim() == (-0.6, 0.6)  # the largest |mean cosine| over every cell, rounded up to 0.1
    red, green, blue, _ = image.cmap(image.norm(-0.6))
    assert red > 0.3 and red > 2 * blue  # a conflicting pair is drawn red
    red, green, blue, _ = image.cmap(image.norm(0.6))
    assert blue > 2 * red


def test_text_stays_readable_on_dark_cells():
    stats = known_stats()
    ax = plots.new_figure(4, 4).add_subplot()
    plots.conflict_heatmap(stats, 2, "counts", ax=ax)
    colours = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_color() for t in value_texts(ax)}
    assert colours[0, 2] == "white"  # Q = 10 of 10: darkest red
    assert colours[0, 1] == "black"  # Q = 2 of 10: light


def test_a_cell_without_parameters_is_marked_not_annotated():
    ax = plots.new_figure(4, 4).add_subplot()
    plots.conflict_heatmap(known_stats(), 0, "counts", ax=ax)
    assert [t.get_text() for t in value_texts(ax)] == ["no\nparameters"]


@pytest.mark.parametrize("kind", list(plots.KINDS))
def test_a_pair_never_measured_at_a_cell_is_grey_and_says_so(kind: str):
    # A task whose gradient is zero at a cell in every mini-batch (a one-class head) read "0 / 0%" and "+0.00",
    # as if measured and orthogonal.
    stats = known_stats()
    stats.measured[2, 1, 2] = stats.measured[2, 2, 1] = 0
    ax = plots.new_figure(4, 4).add_subplot()
    image = plots.conflict_heatmap(stats, 2, kind, ax=ax)
    labels = annotations(ax)
    assert labels[1, 2] == labels[2, 1] == "n/a"
    assert labels[0, 1] != "n/a"
    mask = np.ma.getmaskarray(image.get_array())
    assert mask[1, 2] and mask[2, 1] and not mask[0, 1]


def test_the_outline_boxes_grown_pairs():
    ax = plots.new_figure(4, 4).add_subplot()
    image = plots.conflict_heatmap(known_stats(), 1, "counts", ax=ax, outline=[("seg", "depth")])
    boxes = [p for p in image.axes.patches if not p.get_fill()]
    assert sorted((round(p.get_x() + p.get_width() / 2), round(p.get_y() + p.get_height() / 2)) for p in boxes) == [
        (0, 1), (1, 0)]


def test_overview_has_one_axes_per_cell_and_kind_on_one_shared_scale():
    stats = known_stats()
    figure = plots.overview_figure(stats, grown=[[["seg", "normal"], 2]])
    images = heatmap_images(figure)
    assert len(images) == 2 * stats.num_cells
    counts, cosine = images[: stats.num_cells], images[stats.num_cells :]
    assert {im.get_clim() for im in counts} == {(0.0, 10.0)}
    assert {im.get_clim() for im in cosine} == {(-0.6, 0.6)}
    titles = [ax.get_title() for ax in figure.axes if ax.images]
    assert titles[:3] == ["cell 0\n0 params", "cell 1\n120 params", "cell 2\n4,000 params"]
    headline = figure.get_suptitle()
    assert "10 mini-batches" in headline
    assert "seg vs normal at cell 2, in 10 of 10 mini-batches (100%), mean cosine -0.60" in headline
    assert len(figure.axes) == 2 * stats.num_cells + 2  # plus one colour bar per row


def test_overview_images_cut_every_cell_out_of_one_render():
    stats = known_stats()
    overview, cells = plots.overview_images(stats)
    assert overview.dtype == np.uint8 and overview.ndim == 3 and overview.shape[2] == 3
    width, height = plots.overview_figure(stats).get_size_inches() * plots.DPI
    assert overview.shape[:2] == (round(height), round(width))
    assert set(cells) == {(kind, cell) for kind in ("counts", "cosine") for cell in range(3)}
    for pixels in cells.values():
        assert 100 < pixels.shape[0] < overview.shape[0] / 2 + 60 and 100 < pixels.shape[1] < overview.shape[1] / 2
        assert pixels.std() > 10  # a picture, not a blank strip


@pytest.mark.parametrize("tasks, cells", [
    (TASKS, 3), (["left", "right"], 4), (["a", "semantic_segmentation", "b", "c"], 2),
    (["W" * 40, "b", "c"], 3), (["MMMMMMMMMMMMMMMMMMMM", "b"], 2), (["x" * 40, "b", "c"], 2), (["a", "b"], 1),
])
def test_each_cells_cut_out_region_holds_its_panel_and_colour_bar_with_all_their_text(tasks, cells):
    # The regions come from the hand-made layout, not from measuring every text; check them against
    # matplotlib's own extents (tick labels, titles, the colour bar's ticks and label), for short and long task
    # names, wide letters too (a width per character ran 40 W's into the next panel and off the figure).
    stats = ConflictStats(tasks, cells, [1000 * (c + 1) for c in range(cells)])
    stats.steps = 3
    stats.counts[:] = 1
    figure, panels, regions = plots._overview(stats, None, "title")
    renderer = figure.canvas.get_renderer()
    bar_axes = sorted((ax for ax in figure.axes if ax not in panels.values()), key=lambda ax: -ax.get_position().y0)
    bars = dict(zip(plots.KINDS, bar_axes, strict=True))  # one colour bar per row, top row first
    for (kind, cell), (panel_region, bar_region) in regions.items():
        for ax, (x0, y0, x1, y1) in ((panels[kind, cell], panel_region), (bars[kind], bar_region)):
            extent = ax.get_tightbbox(renderer)
            assert x0 * plots.DPI <= extent.x0 + 1 and extent.x1 - 1 <= x1 * plots.DPI
            assert y0 * plots.DPI <= extent.y0 + 1 and extent.y1 - 1 <= y1 * plots.DPI
    frames = {key: ax.get_window_extent(renderer) for key, ax in panels.items()}
    for key, ax in panels.items():
        for name in (t for t in ax.texts if t.get_gid() == plots.TASK_NAME):
            extent = name.get_window_extent(renderer)
            assert extent.x0 >= 0 and extent.y0 >= 0 and extent.x1 <= figure.bbox.width
            assert not any(extent.overlaps(frame) for other, frame in frames.items() if other != key)


@pytest.mark.parametrize("cells", [1, 2])
def test_the_headline_and_notes_of_a_narrow_overview_stay_inside_the_picture(cells):
    # With one or two cells of two tasks the figure was sized for the panels alone, 338 px wide for one cell,
    # and the headline naming the worst pair lost both ends (a helper's search with a one-cell trunk).
    stats = ConflictStats(["task_0", "task_1"], cells, [1000] * cells)
    stats.steps = stats.measured[:] = 8
    stats.counts[0, 0, 1] = stats.counts[0, 1, 0] = 3
    stats.cosine_sums[0, 0, 1] = stats.cosine_sums[0, 1, 0] = -0.8
    figure, panels, _ = plots._overview(stats, [[["task_0", "task_1"], 0]], "Where tasks fight, round 1")
    renderer = figure.canvas.get_renderer()
    page = figure.bbox
    texts = figure.texts  # the headline (suptitle) and the notes
    assert len(texts) == 2 and "most conflict: task_0 vs task_1 at cell 0" in figure._suptitle.get_text()
    for text in texts:
        assert inside(text.get_window_extent(renderer), page)
    centre = (min(ax.get_position().x0 for ax in figure.axes) + max(ax.get_position().x1 for ax in figure.axes)) / 2
    assert centre == pytest.approx(0.5, abs=0.1)  # the panels sit in the middle of the widened picture


def test_worst_conflict_without_any_conflict():
    stats = ConflictStats(["a", "b"], 2, [5, 5])
    stats.steps = stats.measured[:] = 3
    assert plots.worst_conflict(stats) == "no pair conflicted in any mini-batch"


def test_the_headline_says_when_no_pair_could_be_measured():
    # A task whose gradient was always zero read as "no pair conflicted", as if the pairs had been measured.
    stats = ConflictStats(["a", "b"], 2, [5, 5])
    stats.steps = 3
    stats.measured[:, 0, 0] = 3  # only task a's own entries: b's gradient was zero at every cell
    assert plots.worst_conflict(stats) == (
        "no pair measured: in every mini-batch a task's gradient was zero at every cell")
    stats.measured[1, 0, 1] = stats.measured[1, 1, 0] = 1
    assert plots.worst_conflict(stats) == "no pair conflicted in any mini-batch"


def test_the_histogram_picture_marks_no_mean_for_a_pair_never_measured():
    # It drew the mean marker at cosine 0 (mean_cosine's fill value) for a pair with a zero-gradient task.
    stats = known_stats()
    stats.measured[:, 0, 1] = stats.measured[:, 1, 0] = 0  # seg vs depth: never measured at any cell
    stats.measured[1, 0, 2] = stats.measured[1, 2, 0] = 0  # seg vs normal: measured at cell 2 only
    figure = plots.histogram_figure(stats)
    seg_depth, seg_normal, depth_normal = (ax for ax in figure.axes if ax.get_visible())

    def markers(ax) -> list[float]:
        return [line.get_xdata()[0] for line in ax.lines if line.get_marker() == "^"]

    assert markers(seg_depth) == [] and [t.get_text() for t in seg_depth.texts] == [
        "not measured: a gradient was\nzero in every mini-batch"]
    assert markers(seg_normal) == [pytest.approx(-0.6)] and not seg_normal.texts
    assert markers(depth_normal) == [pytest.approx(0.05), pytest.approx(0.0)] and not depth_normal.texts


def test_the_histogram_title_of_one_pair_stays_inside_the_picture():
    # A round of 1,234 mini-batches ran the title off both edges, and "1.00" lost its last pixel.
    stats = ConflictStats(["task_0", "task_1"], 2, [10, 10])
    stats.steps = stats.measured[:] = 1234
    figure = plots.histogram_figure(stats)
    renderer = figure.canvas.get_renderer()
    assert inside(figure._suptitle.get_window_extent(renderer), figure.bbox, slack=-5)  # 5 px from each edge
    (panel,) = (ax for ax in figure.axes if ax.get_visible())
    for label in panel.get_xticklabels():
        assert inside(label.get_window_extent(renderer), figure.bbox, slack=0)


def test_the_headline_reads_the_mean_cosine_as_its_cell_does():
    # It said "-0.00" beside a cell annotated "-0.004".
    stats = ConflictStats(["a", "b"], 1, [5])
    stats.steps = stats.measured[0] = 16
    stats.counts[0, 0, 1] = stats.counts[0, 1, 0] = 2
    stats.cosine_sums[0, 0, 1] = stats.cosine_sums[0, 1, 0] = -0.004 * 16
    assert plots.worst_conflict(stats) == ("most conflict: a vs b at cell 0, in 2 of 16 mini-batches (13%), "
                                           "mean cosine -0.004")


def test_histogram_figure_draws_a_line_per_usable_cell_for_each_pair():
    stats = known_stats()
    figure = plots.histogram_figure(stats)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["seg vs depth", "seg vs normal", "depth vs normal"]
    (legend,) = figure.legends  # one for the figure: a legend per panel ran over its neighbours with many cells
    assert [t.get_text() for t in legend.get_texts()] == ["cell 1", "cell 2"]  # cell 0 has no parameters
    assert not any(ax.get_legend() for ax in visible)
    heights = visible[1].patches[-1].get_data().values  # cell 2's stairs
    assert heights[2] == pytest.approx(1.0) and heights.sum() == pytest.approx(1.0)


def test_with_many_pairs_the_histogram_picture_shows_those_that_conflict_most_under_its_title():
    # 16 tasks drew 120 panels (1320 × 11300 pixels, 7.7 s a round) with the title over the first row.
    tasks = [f"t{k}" for k in range(16)]
    stats = ConflictStats(tasks, 2, [10, 10])
    stats.steps = 5
    most = {(3, 9): 5, (0, 15): 4, **{(k, k + 1): 1 for k in range(10)}, (1, 2): 3, (4, 6): 2}
    for (i, j), q in most.items():
        stats.counts[1, i, j] = stats.counts[1, j, i] = q
    figure = plots.histogram_figure(stats)
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert len(titles) == plots.HISTOGRAM_PAIRS == 12
    assert {"t3 vs t9", "t0 vs t15", "t1 vs t2", "t4 vs t6"} <= set(titles)  # in the order of stats.pairs
    assert titles == [f"{a} vs {b}" for a, b in (stats.pairs[p] for p in plots.histogram_pairs(stats))]
    assert figure._suptitle.get_text().endswith("the 12 of 120 pairs with the most conflicts")
    pixels = plots.figure_to_array(figure)
    assert pixels.shape[0] < 1400
    top_panel = max(ax.get_position().y1 for ax in figure.axes if ax.get_visible())
    title_bottom = figure._suptitle.get_window_extent(figure.canvas.get_renderer()).y0 / pixels.shape[0]
    assert title_bottom > top_panel


@pytest.fixture(scope="module")
def grown_graph():
    space = create_space(ModelConfig(backbone="lenet"), (1, 28, 28))
    tasks = parse_tasks({t: {"type": "classification", "classes": 10} for t in TASKS}, "test")
    graph = g.build_hps_graph(space, tasks)
    g.grow(graph, (("seg", "depth"), 1), round_index=1)
    g.grow(graph, (("depth", "normal"), 2), round_index=2)
    return graph


def test_draw_architecture_writes_a_png_with_every_node_and_its_parameters(grown_graph, tmp_path):
    path = tmp_path / "nested" / "architecture.png"
    figure = drawing.draw_architecture(grown_graph, path, title="after round 2")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == tuple(round(s * plots.DPI) for s in figure.get_size_inches())
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert len(texts) == grown_graph.number_of_nodes()
    params = grown_graph.graph["cell_params"]
    assert f"cell 2\n{params[2]:,} params" in texts
    assert f"seg+depth\n{params[1]:,} params" in texts and f"depth+normal\n{params[2]:,} params" in texts
    assert "fusion depth\n+β·(seg+depth)\n+β·(depth+normal)" in texts
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[0].startswith("seg+depth: from cell 1, round 1; 2 modules")
    assert "after round 2: 3 branch modules" in figure.get_suptitle()


def test_a_lane_grown_in_several_rounds_lists_them_apart_from_its_module_count():
    # "round 2, 4, 5, 4 modules" read as four rounds (a helper's 8-task search).
    space = create_space(ModelConfig(backbone="lenet"), (1, 28, 28))
    graph = g.build_hps_graph(space, parse_tasks({t: {"type": "classification", "classes": 10} for t in TASKS}, "t"))
    g.grow(graph, (("seg", "depth"), 2), round_index=1)
    g.grow(graph, (("seg", "depth"), 1), round_index=3)
    legend = [t.get_text() for t in drawing.draw_architecture(graph).legends[0].get_texts()]
    assert legend[0].startswith("seg+depth: from cell 1, rounds 1, 3; 2 modules, ")


LONG = {"seg": "upper_left_digit_classification", "depth": "lower_right_digit", "normal": "digit_sum_of_both_items"}


def inside(inner, outer, slack: float = 1.0) -> bool:
    return (inner.x0 >= outer.x0 - slack and inner.x1 <= outer.x1 + slack and inner.y0 >= outer.y0 - slack
            and inner.y1 <= outer.y1 + slack)


def test_long_task_names_stay_inside_their_boxes_and_the_legend_inside_the_picture():
    # Fusion labels ran out of their boxes over the heads and arrows, and the two-column legend was cut off at
    # both edges (a helper's look at a search with such names).
    space = create_space(ModelConfig(backbone="lenet"), (1, 28, 28))
    tasks = parse_tasks({LONG[t]: {"type": "classification", "classes": 10} for t in TASKS}, "test")
    graph = g.build_hps_graph(space, tasks)
    g.grow(graph, ((LONG["seg"], LONG["depth"]), 1), round_index=1)
    g.grow(graph, ((LONG["seg"], LONG["normal"]), 0), round_index=1)
    g.grow(graph, ((LONG["depth"], LONG["normal"]), 2), round_index=2)
    figure = drawing.draw_architecture(graph, title="after round 2")
    renderer = figure.canvas.get_renderer()
    boxes = [patch.get_window_extent(renderer) for patch in figure.axes[0].patches if hasattr(patch, "get_boxstyle")]
    texts = figure.axes[0].texts
    assert len(texts) == len(boxes) == graph.number_of_nodes()
    for text in texts:
        extent = text.get_window_extent(renderer)
        assert any(inside(extent, box) for box in boxes), text.get_text()
    page = figure.bbox
    legend = figure.legends[0]
    assert legend.get_window_extent(renderer).x0 >= page.x0 and legend.get_window_extent(renderer).x1 <= page.x1
    assert any(LONG["seg"] in t.get_text() for t in legend.get_texts())  # the legend keeps whole names


def test_shortened_keeps_both_ends_of_a_long_name():
    assert plots.shortened("upper_left_digit_classification", 16) == "upper_left…ation"
    assert plots.shortened("short", 16) == "short"
    assert all(len(plots.shortened("x" * n, 11)) == min(n, 11) for n in range(1, 30))


def test_shares_round_halves_up():
    assert [plots.share(q, 16) for q in (2, 6, 16)] == ["13%", "38%", "100%"]  # Python's format said 12%, 38%


def test_branch_lanes_keep_one_colour_per_pair(grown_graph):
    figure = drawing.draw_architecture(grown_graph)
    colours = drawing._group_colours(grown_graph)
    thick = [p for p in figure.axes[0].patches if p.get_linewidth() > 1.5]  # branch boxes and arrows
    edges = {tuple(round(c, 3) for c in p.get_edgecolor()[:3]) for p in thick}
    expected = {tuple(round(c, 3) for c in colours[pair][:3]) for pair in [("seg", "depth"), ("depth", "normal")]}
    assert edges == expected


@pytest.mark.parametrize("m", [2, 5, 6, 16])
def test_every_pair_and_task_gets_its_own_colour_and_none_is_grey(m):
    # Beyond 18 groups (six tasks: 15 pairs + 6 tasks) tab20's colours repeated, so two pairs' lanes looked alike.
    space = create_space(ModelConfig(backbone="lenet"), (1, 28, 28))
    graph = g.build_hps_graph(space, parse_tasks({f"t{i}": {"type": "classification", "classes": 2} for i in range(m)},
                                                 "test"))
    colours = drawing._group_colours(graph)
    assert len(colours) == m * (m - 1) // 2 + m
    rgb = [tuple(round(c, 3) for c in colour[:3]) for colour in colours.values()]
    assert len(set(rgb)) == len(rgb)
    assert all(max(c) - min(c) > 0.05 for c in rgb)  # the trunk is grey
    if m == 2:
        assert drawing._group_colours(graph) == colours  # fixed: a pair keeps its colour across rounds


def test_report_plots_save_metric_bars_and_growth(tmp_path):
    tasks = parse_tasks({"a": {"type": "classification", "classes": 10}, "b": {"type": "regression", "dim": 2}}, "t")
    results = {
        "STL": {"tasks": {"a": {"accuracy": 0.8}, "b": {"mse": 0.5, "mae": 0.25}}},
        "HPS (equal)": {"tasks": {"a": {"accuracy": 0.7}, "b": {"mse": 0.6, "mae": 0.3}}},
        "MAMO": {"tasks": {"a": {"accuracy": 0.9}, "b": {"mse": 0.4, "mae": 0.2}}},
    }
    rows = build_rows(results, "STL", tasks)
    rounds = [{"round": 1, "activated": [[["a", "b"], 1]], "modules": 2}, {"round": 2, "activated": [], "modules": 0}]
    paths = report_plots.report_plots(tmp_path, rows, rounds, tasks)
    assert [p.name for p in paths] == ["report_metrics.png", "report_growth.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200
    bars = report_plots.metric_bars_figure(rows, tasks)
    panels = [ax for ax in bars.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [
        "a accuracy (higher is better)", "b mse (lower is better)", "b mae (lower is better)"]
    assert [t.get_text().strip() for t in panels[1].texts] == ["0.5", "0.6", "0.4"]
    # STL is the reference (no Δ); MAMO's Δ = (12.5 + 20 + 20) / 3 = 17.5.
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["STL", "HPS (equal)\nΔ -17.5%", "MAMO\nΔ +17.5%"]
    assert panels[0].get_yticks().tolist() == [2, 1, 0]  # the first row on top
    growth = report_plots.growth_figure(rounds)
    labels = [t.get_text() for t in growth.axes[0].get_xticklabels()]
    assert labels == ["round 1\na+b@cell1", "round 2\nnone"]
    assert growth.axes[0].get_title() == "GMK modules grown per detection round"
    exclusive = report_plots.growth_figure(rounds, "task-exclusive modules (w/o GMK)").axes[0]
    assert exclusive.get_title() == "Task-exclusive modules (w/o GMK) grown per detection round"
    assert exclusive.get_ylabel() == "task-exclusive modules"


def test_report_plots_with_long_task_names_keep_titles_and_position_labels_apart():
    names = list(LONG.values())
    tasks = parse_tasks({name: {"type": "classification", "classes": 10} for name in names}, "t")
    results = {method: {"tasks": {name: {"accuracy": value} for name in names}}
               for method, value in (("STL", 0.5), ("HPS (equal)", 0.4), ("MAMO", 0.3))}
    bars = report_plots.metric_bars_figure(build_rows(results, "STL", tasks), tasks)
    renderer = bars.canvas.get_renderer()
    titles = [ax.title.get_window_extent(renderer) for ax in bars.axes if ax.get_visible()]
    assert all(left.x1 < right.x0 for left, right in itertools.pairwise(titles))  # they overlapped
    assert all(inside(title, bars.bbox) for title in titles)
    rounds = [{"round": 1, "activated": [[names[:2], 0], [names[1:], 0], [names[::2], 1]], "modules": 3},
              {"round": 2, "activated": [[names[:2], 1]], "modules": 1}]
    growth = report_plots.growth_figure(rounds)
    renderer = growth.canvas.get_renderer()
    ticks = [label.get_window_extent(renderer) for label in growth.axes[0].get_xticklabels()]
    assert all(left.x1 < right.x0 for left, right in itertools.pairwise(ticks))  # they ran into each other
    assert all(inside(tick, growth.bbox) for tick in ticks)


def test_a_round_that_activates_many_positions_keeps_the_growth_plot_its_height():
    # 156 positions listed under one round left the plot no height, and matplotlib raised at the end of a search
    # with 16 tasks, which then could not finish, not even resumed.
    pairs = [[f"t{i}", f"t{j}"] for i in range(16) for j in range(i + 1, 16)]
    rounds = [{"round": 1, "activated": [[pair, cell] for pair in pairs for cell in (0, 1)], "modules": 240},
              {"round": 2, "activated": [[pairs[0], 2]], "modules": 1}]
    figure = report_plots.growth_figure(rounds)
    plots.figure_to_array(figure)  # renders
    ax = figure.axes[0]
    assert ax.get_position().height * figure.get_figheight() == pytest.approx(report_plots.PLOT_INCHES)
    listed = [t.get_text().split("\n") for t in ax.get_xticklabels()]
    assert listed[0][0] == "round 1" and listed[0][1] == "t0+t1@cell0"
    assert len(listed[0]) == 1 + report_plots.LISTED_POSITIONS and listed[0][-1] == "and 229 more"
    assert listed[1] == ["round 2", "t0+t1@cell2"]


def test_many_rounds_keep_the_growth_plot_readable():
    # 50 rounds made an 82-inch strip (8200 pixels) that report.md scaled down to unreadable ticks.
    rounds = [{"round": z, "activated": [[["a", "b"], 0]] if z < 3 else [], "modules": int(z < 3)}
              for z in range(1, 51)]
    figure = report_plots.growth_figure(rounds)
    plots.figure_to_array(figure)  # renders
    assert figure.get_figwidth() == report_plots.MAX_INCHES
    ticks = [label.get_text() for label in figure.axes[0].get_xticklabels() if label.get_text()]
    assert 5 <= len(ticks) <= 21 and all(tick.isdigit() for tick in ticks)
    assert len(figure.axes[0].texts) == 0  # no per-round numbers crowded over the narrow bars
    few = report_plots.growth_figure(rounds[:report_plots.LISTED_ROUNDS])
    assert few.axes[0].get_xticklabels()[0].get_text() == "round 1\na+b@cell0"


def test_a_short_growth_bar_gets_its_count_above_it_in_a_dark_colour():
    # "+2" and "+1" were white text centred on bars too short to hold them: white on white (an 8-task search).
    from matplotlib.colors import to_hex

    rounds = [{"round": r + 1, "modules": m, "activated": []} for r, m in enumerate([77, 26, 6, 2, 1, 0])]
    ax = report_plots.growth_figure(rounds).axes[0]
    counts = {t.get_text(): t for t in ax.texts if t.get_text().startswith("+")}
    assert set(counts) == {"+77", "+26", "+6", "+2", "+1"}
    for text, label in counts.items():
        short = int(text[1:]) < 0.15 * 112
        assert (to_hex(label.get_color()) != "#ffffff") == short
        assert label.get_position()[1] > int(text[1:]) if short else label.get_position()[1] < int(text[1:])


def test_growth_without_rounds_says_so():
    figure = report_plots.growth_figure([])
    assert "stayed HPS" in figure.axes[0].texts[0].get_text()


def test_figure_to_array_is_hwc_uint8():
    figure = plots.new_figure(2.0, 1.5)
    figure.add_subplot().plot([0, 1], [1, 0])
    pixels = plots.figure_to_array(figure)
    assert pixels.shape == (150, 200, 3) and pixels.dtype == np.uint8
