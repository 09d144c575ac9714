"""Box texts of the architecture picture: measured, so they stay inside their boxes at a readable size."""

from __future__ import annotations

import itertools

import networkx as nx

from mamo import drawing
from mamo import graph as g
from mamo.config import ModelConfig
from mamo.spaces import create_space
from mamo.tasks import parse_tasks


def grown(names: list[str] | tuple[str, ...], positions: list) -> nx.DiGraph:
    space = create_space(ModelConfig(backbone="lenet"), (1, 28, 28))
    graph = g.build_hps_graph(space, parse_tasks({t: {"type": "classification", "classes": 10} for t in names}, "t"))
    for pair, cell in positions:
        g.grow(graph, (pair, cell), round_index=1)
    return graph


def inside(inner, outer, slack: float = 1.0) -> bool:
    return (inner.x0 >= outer.x0 - slack and inner.x1 <= outer.x1 + slack and inner.y0 >= outer.y0 - slack
            and inner.y1 <= outer.y1 + slack)


def box_texts_and_their_boxes(figure):
    """Each box label of an architecture picture with the extent of its own box (the nearest centre)."""
    renderer = figure.canvas.get_renderer()
    boxes = [patch.get_window_extent(renderer) for patch in figure.axes[0].patches if hasattr(patch, "get_boxstyle")]
    for text in figure.axes[0].texts:
        e = text.get_window_extent(renderer)
        box = min(boxes, key=lambda b: abs(b.x0 + b.x1 - e.x0 - e.x1) + abs(b.y0 + b.y1 - e.y0 - e.y1))
        yield text, e, box


NYUV2 = ("segmentation", "depth", "normal")


def test_nyuv2s_fusion_labels_stay_inside_their_boxes_with_whole_task_names():
    # The nyuv2 preset's own pictures: "+β·(segmen…ion+normal)" ran 1.6 px over its fusion box, since the font was
    # sized by counting characters and FreeType draws small sizes wider (a helper's look at a dense search).
    graph = grown(NYUV2, [(("segmentation", "depth"), 1), (("segmentation", "normal"), 0), (("depth", "normal"), 0)])
    figure = drawing.draw_architecture(graph)
    for text, extent, box in box_texts_and_their_boxes(figure):
        assert inside(extent, box), text.get_text()
    labels = [t.get_text() for t in figure.axes[0].texts]
    assert "fusion normal\n+β·(segmentation+normal)\n+β·(depth+normal)" in labels  # 12 characters need no cut


EIGHT = ["semantic_segmentation", "depth", "surface_normal", "scene_class", "object_count", "illumination_angle",
         "camera_height", "upper_left_digit_classification"]


def test_with_eight_tasks_no_box_text_shrinks_below_six_points():
    # "head semantic_segmentation" stayed on one line at 5.2 pt while "fusion semantic_segmentation", one character
    # longer, went on two lines at a readable size; most fusion labels were at 5 pt (a helper's 8-task search).
    pairs = [(pair, k % 2) for k, pair in enumerate(itertools.combinations(EIGHT, 2)) if k % 3 == 0]
    figure = drawing.draw_architecture(grown(EIGHT, pairs))
    for text, extent, box in box_texts_and_their_boxes(figure):
        assert inside(extent, box), text.get_text()
        assert text.get_fontsize() >= 6.0, text.get_text()
    labels = [t.get_text() for t in figure.axes[0].texts]
    assert "head\nupper_left_digit_classification\n3,060 params" in labels  # whole: it fits at 6 pt
    assert "fusion camera_height\n+β·(camer…ht+upper…on)" in labels  # a pair too long even at 6 pt: both names cut
