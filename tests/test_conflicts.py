"""Conflict statistics (DESIGN §2): counts, mean cosines, histograms from Gram blocks, and the thresholds."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from mamo import graph as g
from mamo.conflicts import HISTOGRAM_EDGES, ConflictStats, select_positions
from mamo.errors import MamoError


def gram_from_vectors(*vectors) -> torch.Tensor:
    J = torch.tensor(vectors, dtype=torch.float64)
    return J @ J.T


def test_counts_mean_cosine_and_histogram_follow_the_gram_blocks():
    stats = ConflictStats(["a", "b", "c"], num_cells=2, cell_params=[10, 10])
    conflicting = gram_from_vectors([1.0, 0.0], [-1.0, 1.0], [0.0, 1.0])  # cos(a,b) = -0.707, cos(a,c) = 0
    agreeing = gram_from_vectors([1.0, 0.0], [1.0, 1.0], [1.0, 0.0])
    stats.update({g.cell_id(0): conflicting, g.cell_id(1): agreeing})
    stats.update({g.cell_id(0): conflicting, g.cell_id(1): conflicting})
    assert stats.steps == 2
    assert stats.counts[0].tolist() == [[0, 2, 0], [2, 0, 0], [0, 0, 0]]
    assert stats.counts[1, 0, 1] == 1 and stats.counts[1, 1, 2] == 0
    mean = stats.mean_cosine()
    np.testing.assert_allclose(mean[0, 0, 1], -np.sqrt(0.5))
    np.testing.assert_allclose(mean[1, 0, 1], (np.sqrt(0.5) - np.sqrt(0.5)) / 2, atol=1e-12)
    assert np.allclose(np.diagonal(mean, axis1=1, axis2=2), 1.0)
    # Pair (a, b) at cell 0: both cosines -0.707 fall in the bin [-0.8, -0.7).
    bin_index = np.digitize(-np.sqrt(0.5), HISTOGRAM_EDGES) - 1
    assert stats.histograms[0, 0, bin_index] == 2 and stats.histograms[0].sum() == 2 * 3
    assert stats.conflict_count((("a", "b"), 0)) == 2


def test_a_zero_gradient_has_no_cosine_it_is_no_conflict_and_stays_out_of_the_mean():
    stats = ConflictStats(["a", "b"], num_cells=1, cell_params=[5])
    stats.update({g.cell_id(0): gram_from_vectors([0.0, 0.0], [1.0, 0.0])})
    assert stats.counts.sum() == 0 and stats.mean_cosine()[0, 0, 1] == 0.0 and stats.histograms.sum() == 0
    stats.update({g.cell_id(0): gram_from_vectors([1.0, 1.0], [1.0, 0.0])})  # cosine 1/√2
    stats.update({g.cell_id(0): gram_from_vectors([0.0, 0.0], [1.0, 0.0])})
    assert stats.steps == 3 and stats.measured[0, 0, 1] == stats.measured[0, 1, 0] == 1
    assert stats.mean_cosine()[0, 0, 1] == pytest.approx(2**-0.5)  # the one measured cosine, not a third of it
    assert stats.histograms.sum() == 1 and stats.mean_cosine()[0, 0, 0] == 1.0


def test_a_cosine_on_a_bin_edge_counts_in_the_bin_that_starts_there():
    # Edges from np.linspace were a hair off k/10 (0.1 read 0.10000000000000009), so a cosine of exactly 0.1
    # counted in [0.0, 0.1).
    for k in range(-10, 10):
        stats = ConflictStats(["a", "b"], num_cells=1, cell_params=[2])
        cosine = k / 10
        stats.update({g.cell_id(0): np.array([[1.0, cosine], [cosine, 1.0]])})
        assert stats.histograms[0, 0].tolist() == [int(b == k + 10) for b in range(20)], cosine
    assert HISTOGRAM_EDGES.tolist() == [k / 10 for k in range(-10, 11)]


def test_a_task_whose_gradient_was_always_zero_is_named_silent():
    # A task with one class (zero cross-entropy gradient) froze an MGDA search's trunk without a word.
    stats = ConflictStats(["a", "b", "c"], num_cells=2, cell_params=[5, 0])
    for vectors in (([1.0, 0.0], [0.0, 0.0], [1.0, 1.0]), ([0.0, 1.0], [0.0, 0.0], [0.0, 0.0])):
        stats.update({g.cell_id(0): gram_from_vectors(*vectors)})
    assert stats.silent_tasks() == ["b"]  # c was non-zero once; cell 1 has no parameters to measure
    assert [stats.measured[0, t, t] for t in range(3)] == [2, 0, 1]
    assert ConflictStats(["a", "b"], num_cells=1, cell_params=[5]).silent_tasks() == []  # no mini-batch yet


def test_a_gradient_below_1e_15_in_norm_is_a_zero_one_and_cosines_stay_in_range():
    # A helper's audit: float32 Gram entries of a gradient ~1e-21 long are subnormal sums, and a parallel pair
    # read mean cosines of 1.0007 and 2.66 (metrics.json and the heatmap showed them).
    u = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    stats = ConflictStats(["a", "b"], num_cells=2, cell_params=[2000, 2000])
    for scale in (1e-21, 1e-22):
        jacobian = torch.stack([scale * u, u]).float()
        # Anti-parallel, as float32 rounding can leave it: |G_ab| a hair above sqrt(G_aa·G_bb).
        rounded = torch.tensor([[1.0, -1.0000002], [-1.0000002, 1.0]])
        stats.update({g.cell_id(0): jacobian @ jacobian.T, g.cell_id(1): rounded})
    assert stats.measured[0, 0, 1] == 0 and stats.counts[0].sum() == 0 and stats.histograms[0].sum() == 0
    assert stats.measured[1, 0, 1] == 2 and stats.counts[1, 0, 1] == 2
    assert -1.0 <= stats.mean_cosine()[1, 0, 1] <= 1.0 and stats.histograms[1, 0, 0] == 2


def test_a_round_checkpointed_before_measured_existed_resumes_with_its_old_mean():
    stats = ConflictStats(["a", "b"], num_cells=1, cell_params=[5])
    for vectors in (([1.0, 0.0], [1.0, 1.0]), ([0.0, 0.0], [1.0, 0.0])):
        stats.update({g.cell_id(0): gram_from_vectors(*vectors)})
    old = ConflictStats.__new__(ConflictStats)
    old.__dict__.update({k: v for k, v in stats.__dict__.items() if k != "measured"})
    restored = pickle.loads(pickle.dumps(old))
    assert restored.measured.tolist() == [[[2, 2], [2, 2]]]
    # The mean it had when it was saved: the old update added cosine 0 for the zero gradient and divided by 2.
    assert restored.mean_cosine()[0, 0, 1] == pytest.approx(2**-0.5 / 2)
    restored.update({g.cell_id(0): gram_from_vectors([1.0, 0.0], [1.0, 0.0])})
    assert restored.steps == 3 and restored.measured[0, 0, 1] == 3


def crafted(counts: dict, cells: int = 3, params=None) -> tuple[ConflictStats, list]:
    tasks = ["a", "b", "c"]
    stats = ConflictStats(tasks, cells, params or [1] * cells)
    for ((i, j), cell), q in counts.items():
        a, b = tasks.index(i), tasks.index(j)
        stats.counts[cell, a, b] = stats.counts[cell, b, a] = q
    candidates = [(pair, cell) for cell in range(cells) for pair in stats.pairs]
    return stats, candidates


def reference_update(stats: ConflictStats, blocks: dict[int, np.ndarray]) -> None:
    """The statistics of one mini-batch computed on whole arrays with numpy (what update did before it moved
    to Python floats for speed): the two must agree exactly."""
    stats.steps += 1
    m = len(stats.tasks)
    rows, cols = np.triu_indices(m, k=1)
    for cell, gram in blocks.items():
        norms = np.where(gram.diagonal() >= 1e-30, np.sqrt(np.maximum(gram.diagonal(), 0.0)), 0.0)
        denominator = np.multiply.outer(norms, norms)
        defined = denominator > 0.0
        cosine = np.clip(np.where(defined, gram / np.where(defined, denominator, 1.0), 0.0), -1.0, 1.0)
        np.fill_diagonal(cosine, np.where(norms > 0.0, 1.0, 0.0))  # the diagonal: the task's own non-zero batches
        np.fill_diagonal(defined, norms > 0.0)
        stats.cosine_sums[cell] += cosine
        stats.measured[cell] += defined
        stats.counts[cell] += cosine < 0.0
        bins = np.clip(np.digitize(cosine[rows, cols], HISTOGRAM_EDGES) - 1, 0, len(HISTOGRAM_EDGES) - 2)
        pairs = np.flatnonzero(defined[rows, cols])
        stats.histograms[cell, pairs, bins[pairs]] += 1


@pytest.mark.parametrize("m", [2, 3, 5])
def test_update_agrees_exactly_with_a_whole_array_computation(m):
    rng = np.random.default_rng(m)
    tasks = [f"t{k}" for k in range(m)]
    fast, reference = ConflictStats(tasks, 4, [10, 0, 10, 10]), ConflictStats(tasks, 4, [10, 0, 10, 10])
    for step in range(40):
        blocks = {}
        for cell in (0, 2, 3):  # cell 1 has no parameters and no block
            J = rng.standard_normal((m, 6)).astype(np.float32)
            if step % 7 == 0:
                J[rng.integers(m)] = 0.0  # a zero gradient
            if step % 5 == 0:
                J[1] = -J[0]  # cosine exactly -1, on a histogram edge
            gram = (J.astype(np.float64) @ J.T.astype(np.float64)).astype(np.float32)
            if step % 3 == 0:  # a block need not be exactly symmetric (chunked products): one ulp apart
                gram[0, 1] = np.nextafter(gram[0, 1], np.float32(np.inf))
            blocks[cell] = gram.astype(np.float64)
        fast.update({g.cell_id(c): torch.from_numpy(b).float() for c, b in blocks.items()})
        reference_update(reference, blocks)
    assert fast.steps == reference.steps == 40
    np.testing.assert_array_equal(fast.counts, reference.counts)
    np.testing.assert_array_equal(fast.cosine_sums, reference.cosine_sums)
    np.testing.assert_array_equal(fast.histograms, reference.histograms)
    np.testing.assert_array_equal(fast.measured, reference.measured)
    rows, cols = np.triu_indices(m, k=1)
    measured = fast.measured[:, rows, cols].sum()  # every measured cosine is in the histogram, and only those
    assert fast.histograms.sum() == measured < 40 * 3 * len(fast.pairs)


def test_global_threshold_takes_positions_at_or_above_the_mean_of_nonzero_counts():
    stats, candidates = crafted({(("a", "b"), 0): 6, (("a", "c"), 1): 2, (("b", "c"), 2): 4})
    assert select_positions(stats, candidates, "global") == [(("a", "b"), 0), (("b", "c"), 2)]


def test_layer_threshold_averages_per_cell():
    stats, candidates = crafted({(("a", "b"), 0): 6, (("a", "c"), 0): 2, (("b", "c"), 1): 1})
    assert select_positions(stats, candidates, "layer") == [(("a", "b"), 0), (("b", "c"), 1)]


def test_topk_takes_the_k_largest():
    stats, candidates = crafted({(("a", "b"), 0): 6, (("a", "c"), 1): 2, (("b", "c"), 2): 4})
    assert select_positions(stats, candidates, "topk:2") == [(("a", "b"), 0), (("b", "c"), 2)]
    assert select_positions(stats, candidates, "topk:9") == [(("a", "b"), 0), (("b", "c"), 2), (("a", "c"), 1)]


def test_topk_spends_no_slot_on_a_position_its_pairs_branch_already_covers():
    # ab@1 lies on the branch ab@0 grows, so the second slot goes to the next pair.
    stats, candidates = crafted({(("a", "b"), 0): 9, (("a", "b"), 1): 8, (("a", "c"), 2): 3})
    assert select_positions(stats, candidates, "topk:2") == [(("a", "b"), 0), (("a", "c"), 2)]
    # A shallower position of a chosen pair moves the pair's branch up and keeps its slot: the deeper ab@2 would
    # grow nothing under ab@0's branch (on the three-task preset topk:2 used to pick left+right at cells 1 and
    # 0 and so grow one branch).
    stats, candidates = crafted({(("a", "b"), 2): 9, (("a", "b"), 0): 8, (("a", "b"), 1): 7, (("a", "c"), 1): 5})
    assert select_positions(stats, candidates, "topk:2") == [(("a", "b"), 0), (("a", "c"), 1)]
    assert select_positions(stats, candidates, "topk:3") == [(("a", "b"), 0), (("a", "c"), 1)]
    assert select_positions(stats, candidates, "topk:1") == [(("a", "b"), 2)]  # the slots fill before ab@0


def test_nothing_grows_when_no_pair_conflicts():
    stats, candidates = crafted({})
    for threshold in ("global", "layer", "topk:3"):
        assert select_positions(stats, candidates, threshold) == []


def test_a_cell_without_parameters_is_never_a_candidate():
    stats, candidates = crafted({(("a", "b"), 1): 9, (("a", "b"), 0): 1}, params=[5, 0, 5])
    assert select_positions(stats, candidates, "global") == [(("a", "b"), 0)]


@pytest.mark.parametrize("text", ["median", "topk", "topk:0", "topk:x", "layer:2"])
def test_bad_thresholds_are_refused_with_the_valid_forms(text):
    stats, candidates = crafted({})
    with pytest.raises(MamoError, match="global, layer or topk:K|positive integer K"):
        select_positions(stats, candidates, text)
