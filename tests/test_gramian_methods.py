"""UPGrad, IMTL-G and Aligned-MTL against what their papers define, beyond the properties every direction shares
(tests/test_directions.py runs those on them too)."""

from __future__ import annotations

import itertools

import direction_cases
import numpy as np
import pytest
from direction_cases import far_apart_jacobians

from mamo.directions import IMTLG, AlignedMTL, UPGrad
from mamo.directions.base import numerical_range


def random_jacobian(rng: np.random.Generator, m: int, d: int, spread: float = 20.0) -> np.ndarray:
    return direction_cases.random_jacobian(rng, m, d, spread).numpy()


def brute_force_dual_cone_projection(G: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """argmin_{v ≥ floor} vᵀGv by enumerating which constraints are active and solving each one's linear
    optimality conditions; the best feasible candidate that satisfies them wins."""
    m = len(floor)
    best, best_value = None, np.inf
    for k in range(m + 1):
        for free in itertools.combinations(range(m), k):
            v = floor.copy()
            fixed = [t for t in range(m) if t not in free]
            if free:
                idx = list(free)
                # Gradient zero on the free coordinates: G_ff v_f = -G_fa floor_a.
                v[idx] = np.linalg.lstsq(G[np.ix_(idx, idx)], -G[np.ix_(idx, fixed)] @ floor[fixed], rcond=None)[0]
            if (v < floor - 1e-12).any():
                continue
            value = float(v @ G @ v)
            if value < best_value - 1e-12:
                best, best_value = v, value
    return best


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_upgrad_averages_the_exact_projections_onto_the_dual_cone(m):
    rng = np.random.default_rng(m)
    for d in (2, m, m + 3):
        for _ in range(15):
            J = random_jacobian(rng, m, d)
            G = J @ J.T
            expected = sum(brute_force_dual_cone_projection(G, np.eye(m)[i] / m) for i in range(m))
            weights, _ = UPGrad().weigh(G, np.ones(m))
            # Weights can differ along G's null space; the directions may not.
            np.testing.assert_allclose(J.T @ weights, J.T @ expected, atol=1e-9 * np.abs(J).max())


def test_upgrad_is_the_mean_gradient_where_no_task_conflicts():
    J = np.array([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.2, 0.1, 2.0]])
    weights, _ = UPGrad().weigh(J @ J.T, np.ones(3))
    np.testing.assert_allclose(weights, np.full(3, 1 / 3), atol=1e-12)


@pytest.mark.parametrize("m", [2, 3, 4, 6])
def test_upgrad_keeps_every_task_downhill_when_gradient_norms_differ_by_1e7(m):
    for J in far_apart_jacobians(5, m, 40):
        weights, _ = UPGrad().weigh(J @ J.T, np.ones(m))
        v = weights @ J
        assert (J @ v / (np.linalg.norm(J, axis=1) * np.linalg.norm(v))).min() > -1e-9


def test_imtl_g_gives_the_published_example():
    # torchjd's documented IMTL-G example: J = [[-4, 1, 1], [6, 1, 1]] aggregates to (0.0767, 1, 1).
    J = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    weights, _ = IMTLG().weigh(J @ J.T, np.ones(2))
    np.testing.assert_allclose(weights @ J, [0.0767, 1.0, 1.0], atol=5e-5)


@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_imtl_g_projects_equally_and_positively_on_every_unit_gradient(m):
    rng = np.random.default_rng(m)
    flipped = 0
    for _ in range(200):
        J = rng.standard_normal((m, m + 4)) * np.exp(rng.uniform(0, 3, m))[:, None]
        G = J @ J.T
        weights, _ = IMTLG().weigh(G, np.ones(m))
        projections = J @ (weights @ J) / np.linalg.norm(J, axis=1)
        np.testing.assert_allclose(projections, projections.mean(), rtol=1e-7)
        assert projections.mean() > 0  # v / Σv (the literal Σw = 1) is uphill for all where Σv < 0
        raw = np.linalg.solve(G, np.sqrt(G.diagonal()))
        flipped += raw.sum() < 0
        if (raw >= 0).all():
            np.testing.assert_allclose(weights, raw / raw.sum(), rtol=1e-7)  # IMTL-G's own normalisation
    assert (flipped > 0) == (m > 2)  # the cases the literal normalisation flips (none for two tasks) were there


def test_aligned_mtl_gradients_are_orthogonal_with_the_smallest_singular_value():
    rng = np.random.default_rng(3)
    for m in (2, 3, 5):
        J = random_jacobian(rng, m, m + 3, spread=50.0)
        G = J @ J.T
        values, vectors = numerical_range(G)
        balance = np.sqrt(values[-1]) * (vectors / np.sqrt(values)) @ vectors.T
        aligned = balance.T @ J  # the aligned gradients, one row per task
        np.testing.assert_allclose(aligned @ aligned.T, values[-1] * np.eye(m), atol=1e-9 * values[0])
        weights, _ = AlignedMTL().weigh(G, np.ones(m))
        np.testing.assert_allclose(weights @ J, aligned.mean(axis=0), atol=1e-12 * np.abs(J).max())
        scaled, _ = AlignedMTL().weigh(1e6 * G, np.ones(m))
        np.testing.assert_allclose(scaled, weights, rtol=1e-9)  # the weights do not depend on the scale


def test_aligned_mtl_of_orthogonal_equal_gradients_is_their_mean():
    weights, _ = AlignedMTL().weigh(4.0 * np.eye(3), np.ones(3))
    np.testing.assert_allclose(weights, np.full(3, 1 / 3))


@pytest.mark.parametrize("method", [UPGrad, IMTLG, AlignedMTL])
def test_all_zero_gradients_give_uniform_weights(method):
    weights, _ = method().weigh(np.zeros((3, 3)), np.ones(3))
    np.testing.assert_allclose(weights, np.full(3, 1 / 3))


def degenerate_float32_jacobian(rng: np.random.Generator, m: int, d: int, kind: str,
                                spread: float) -> tuple[np.ndarray, np.ndarray]:
    """A float32 Jacobian with an exactly repeated, opposite (a power-of-2 multiple, so exact in float32) or zero
    row, and its float32 Gramian, as a training step computes it."""
    J = random_jacobian(rng, m, d, spread).astype(np.float32)
    i, j = rng.choice(m, 2, replace=False)
    J[i] = {"dup": J[j], "opposite": -J[j] * np.float32(2.0 ** rng.integers(-3, 8)), "zero": 0.0 * J[j]}[kind]
    return J.astype(np.float64), (J @ J.T).astype(np.float64)


@pytest.mark.parametrize("kind", ["dup", "opposite", "zero"])
def test_upgrad_stays_bounded_and_downhill_on_rank_deficient_float32_gramians(kind):
    # scipy's NNLS solves its passive sets without a rank test: on exactly dependent gradients it returned
    # weights up to 1e20, directions 16 times the longest gradient, and sent tasks uphill at that scale.
    rng = np.random.default_rng(11)
    for _ in range(60):
        m = int(rng.integers(3, 9))
        spread = float(rng.choice([1.0, 1e3, 1e6]))
        J, G = degenerate_float32_jacobian(rng, m, int(rng.choice([2, m, 50])), kind, spread)
        weights, _ = UPGrad().weigh(G, np.ones(m))
        d = weights @ J
        norms = np.linalg.norm(J, axis=1)
        # Each g_i/m projected onto a convex cone that holds 0 is no longer than g_i/m.
        assert np.linalg.norm(d) <= norms.mean() * (1 + 1e-5)
        assert (J @ d)[norms > 0].min() >= -1e-5 * norms.max() ** 2
        assert np.isfinite(weights).all() and (np.abs(weights) * norms).max() <= 10 * norms.max()


@pytest.mark.parametrize("d", [1, 2, 50])
def test_imtl_g_takes_no_step_where_no_direction_projects_equally_and_positively(d):
    # g and -2g (or ±g, ±2g): only d = 0 has equal projections on the unit gradients. The solve's right-hand side
    # then lies in G's null space up to rounding; dividing by Σ|v| gave NaN where it was exactly 0, and blew the
    # rounding up into d = ±g (one task uphill at full length) where it was not.
    rng = np.random.default_rng(d)
    for rows in ([1.0, -2.0], [1.0, -1.0, 2.0, -2.0], [3.0, -1.5]):
        g = rng.standard_normal(d)
        J = (np.array(rows)[:, None] * g).astype(np.float32)
        weights, _ = IMTLG().weigh((J @ J.T).astype(np.float64), np.ones(len(rows)))
        assert np.isfinite(weights).all()
        assert np.linalg.norm(weights @ J.astype(np.float64)) <= 1e-6 * np.linalg.norm(J, axis=1).max()


@pytest.mark.parametrize("factor", [1.0, 2.0, 0.25])
def test_upgrad_keeps_every_task_downhill_beside_exactly_opposite_float64_gradients(factor):
    # The ridge freed a coordinate that the exact optimum holds at 0 (a lift of 1e-9), the ridge-free solve on that
    # set went negative there, and the ridged answer was kept: tasks up to 1e-8·max||g||² uphill (a helper's audit).
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = int(rng.integers(3, 7))
        J = random_jacobian(rng, m, int(rng.choice([2, m, m + 3])))
        J[1] = -factor * J[0]
        weights, _ = UPGrad().weigh(J @ J.T, np.ones(m))
        assert (J @ (weights @ J)).min() >= -1e-12 * (J**2).sum(axis=1).max()
