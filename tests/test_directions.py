"""Descent directions: shared properties of every method in the table, then each method's own guarantees."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch

from mamo.config import DirectionConfig, TensionerConfig
from mamo.directions import (
    DIRECTIONS,
    MGDA,
    CAGrad,
    Central,
    Direction,
    Equal,
    PCGrad,
    Tensioner,
    combine,
    create_direction,
    min_norm_weights,
    tension_factors,
)
from mamo.directions.cagrad import _solve as _cagrad_solve
from mamo.errors import MamoError

# Every base method alone, plus both tensioner formulations around the bases the thesis uses.
CASES = [(name, "off") for name in DIRECTIONS] + [
    (name, formulation) for name in ("mgda", "central") for formulation in ("thesis", "relative")
]
T = 2  # short tensioner memory, so the property tests exercise the active tensioner too
CALLS = T + 3


def build(name: str, formulation: str = "off", alpha: float = 0.5, seed: int = 0, **kwargs) -> Direction:
    config = DirectionConfig(name=name, tensioner=TensionerConfig(formulation=formulation, T=T, alpha=alpha), **kwargs)
    return create_direction(config, generator=torch.Generator().manual_seed(seed))


def random_jacobian(rng: np.random.Generator, m: int, d: int, spread: float = 20.0) -> torch.Tensor:
    """m gradients of dimension d, random directions, norms spread log-uniformly over [1, spread]."""
    J = rng.standard_normal((m, d))
    J *= np.exp(rng.uniform(0.0, math.log(spread), m))[:, None] / np.linalg.norm(J, axis=1, keepdims=True)
    return torch.from_numpy(J)


def random_losses(rng: np.random.Generator, m: int) -> torch.Tensor:
    return torch.from_numpy(np.exp(rng.uniform(-3.0, 2.0, m)))


def sequence(seed: int, m: int, d: int, calls: int = CALLS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [(random_jacobian(rng, m, d), random_losses(rng, m)) for _ in range(calls)]


def assert_non_conflicting(J: torch.Tensor, v: torch.Tensor) -> None:
    """g_t · v ≥ 0 for every task, up to rounding on the scale of the largest squared gradient norm."""
    assert (J @ v >= -1e-9 * J.norm(dim=1).max() ** 2).all()


def run(direction: Direction, J: torch.Tensor, losses: torch.Tensor):
    return direction(J @ J.T, losses)


# --- shared properties -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,formulation", CASES)
@pytest.mark.parametrize("m", [2, 3, 4, 6])
def test_output_is_finite_float64_of_shape_m(name, formulation, m):
    direction = build(name, formulation)
    for J, losses in sequence(m, m, 3 * m):
        out = direction(J.float() @ J.float().T, losses.float())  # float32 input is accepted
        assert out.weights.shape == (m,) and out.weights.dtype == torch.float64
        assert out.weights.device.type == "cpu"
        assert torch.isfinite(out.weights).all()
        assert torch.equal(out.info["weights"], out.weights)
        assert all(torch.isfinite(value).all() for value in out.info.values())


@pytest.mark.parametrize("name,formulation", CASES)
@pytest.mark.parametrize("m", [2, 3, 5, 6])
def test_permuting_tasks_permutes_weights(name, formulation, m):
    """PCGrad draws a random projection order per task, so relabelling the tasks changes which order each
    task gets: for m = 2 there is only one order and the property is exact; for m > 2 it is checked on
    gradients that do not conflict at all, where no projection happens in any order."""
    rng = np.random.default_rng(100 + m)
    perm = torch.from_numpy(rng.permutation(m))
    steps = sequence(200 + m, m, m + 2)
    if name == "pcgrad" and m > 2:
        steps = [(J.abs(), losses) for J, losses in steps]  # non-negative entries: no pair conflicts
    original, permuted = build(name, formulation), build(name, formulation)
    tol = 1e-5 if name == "cagrad" else 1e-9  # cagrad's SLSQP path depends on the task order
    for J, losses in steps:
        w = run(original, J, losses).weights
        w_perm = run(permuted, J[perm], losses[perm]).weights
        torch.testing.assert_close(w_perm, w[perm], rtol=tol, atol=tol)


@pytest.mark.parametrize("name,formulation", [case for case in CASES if build(*case).non_conflicting])
@pytest.mark.parametrize("m", [2, 3, 4, 6])
@pytest.mark.parametrize("d", [2, 3, 20])
def test_non_conflicting_methods_never_oppose_a_task(name, formulation, m, d):
    direction = build(name, formulation, alpha=1.0)
    for J, losses in sequence(300 + 7 * m + d, m, d, calls=T + 6):
        w = run(direction, J, losses * 50.0).weights  # large losses: strong pulls from the tensioner
        v = combine(w, J)
        assert_non_conflicting(J, v)


def test_table_non_conflicting_flags():
    assert {name for name in DIRECTIONS if build(name).non_conflicting} == {"mgda", "central"}
    assert not build("mgda", normalization="l2").non_conflicting  # raw gradients, normalised solve


# --- min-norm solver and MGDA ------------------------------------------------------------------------------


def brute_force_min_norm(G: np.ndarray) -> float:
    """Minimum of wᵀGw over the simplex by enumerating every support and solving its affine problem."""
    m = G.shape[0]
    best = math.inf
    for k in range(1, m + 1):
        for support in itertools.combinations(range(m), k):
            idx = list(support)
            K = np.zeros((k + 1, k + 1))
            K[:k, :k] = G[np.ix_(idx, idx)]
            K[:k, k] = K[k, :k] = 1.0
            rhs = np.zeros(k + 1)
            rhs[k] = 1.0
            lam = np.linalg.lstsq(K, rhs, rcond=None)[0][:k]
            if lam.min() < -1e-12:
                continue
            lam = np.clip(lam, 0.0, None)
            lam /= lam.sum()
            best = min(best, float(lam @ G[np.ix_(idx, idx)] @ lam))
    return best


def gramian_instances():
    rng = np.random.default_rng(7)
    for m in range(2, 11):
        for kind in ("generic", "low-dimensional", "duplicated", "zero", "collinear", "near-orthogonal"):
            d = {"low-dimensional": 2, "near-orthogonal": 200}.get(kind, m + 1)
            J = random_jacobian(rng, m, d).numpy()
            if kind == "duplicated":
                J[1] = J[0]
                J[-1] = J[0]
            elif kind == "zero":
                J[rng.integers(m)] = 0.0
            elif kind == "collinear":
                J[1] = 2.5 * J[0]
                J[-1] = -0.3 * J[0]
            yield pytest.param(J @ J.T, id=f"m{m}-{kind}")


@pytest.mark.parametrize("G", list(gramian_instances()))
def test_min_norm_is_exact(G):
    w = min_norm_weights(G)
    scale = G.diagonal().max()
    value = float(w @ G @ w)
    assert w.dtype == np.float64 and (w >= 0).all() and abs(w.sum() - 1.0) < 1e-12
    best = brute_force_min_norm(G)
    assert abs(value - best) <= 1e-9 * abs(best) + 1e-12 * scale
    # KKT: every gradient's inner product with d is at least ||d||², with equality on the support.
    Gw = G @ w
    tol = 1e-9 * scale
    assert (Gw >= value - tol).all()
    assert np.allclose(Gw[w > 1e-9], value, rtol=0, atol=tol)


@pytest.mark.parametrize(
    "G,expected",
    [
        (np.array([[4.0, 0.0], [0.0, 1.0]]), [0.2, 0.8]),  # orthogonal, norms 2 and 1: w1 = 1/(4 + 1)
        (np.array([[1.0, 2.0], [2.0, 5.0]]), [1.0, 0.0]),  # g1·g2 ≥ ||g1||²: g1 itself (no 0.999 clipping)
    ],
)
def test_min_norm_two_tasks_closed_form(G, expected):
    np.testing.assert_array_equal(min_norm_weights(G), expected)


def test_mgda_normalisations_follow_sener_and_koltun():
    rng = np.random.default_rng(3)
    J = random_jacobian(rng, 4, 6)
    losses = random_losses(rng, 4)
    norms = J.norm(dim=1)
    for normalization, n in {"none": torch.ones(4), "l2": norms, "loss": losses, "loss+": losses * norms}.items():
        scaled = J / n[:, None].double()
        expected = min_norm_weights((scaled @ scaled.T).numpy())  # solved on normalised gradients ...
        w = MGDA(normalization)(J @ J.T, losses).weights  # ... and applied to the raw ones
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-9, atol=1e-12)


# --- central -----------------------------------------------------------------------------------------------


def test_central_bisects_two_gradients_at_120_degrees():
    angle = math.radians(120.0)
    J = torch.tensor([[1.0, 0.0], [5.0 * math.cos(angle), 5.0 * math.sin(angle)]], dtype=torch.float64)
    out = Central()(J @ J.T, torch.ones(2))
    v = combine(out.weights, J)
    cosines = (J @ v) / (J.norm(dim=1) * v.norm())
    torch.testing.assert_close(cosines, torch.full((2,), 0.5, dtype=torch.float64))
    assert abs(out.weights.sum().item() - 1.0) < 1e-12  # γ puts v in the convex hull


def test_central_gives_equal_angles_in_the_interior():
    J = random_jacobian(np.random.default_rng(5), 5, 40)
    w = Central()(J @ J.T, torch.ones(5)).weights
    assert (w > 0).all()
    v = combine(w, J)
    cosines = (J @ v) / (J.norm(dim=1) * v.norm())
    torch.testing.assert_close(cosines, cosines.mean().expand(5), rtol=1e-9, atol=1e-12)


def test_central_equals_mgda_for_equal_norms():
    J = random_jacobian(np.random.default_rng(6), 5, 4, spread=1.0) * 3.0
    torch.testing.assert_close(Central()(J @ J.T, torch.ones(5)).weights, MGDA()(J @ J.T, torch.ones(5)).weights)


def test_central_ignores_zero_gradients():
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    w = Central()(J @ J.T, torch.ones(3)).weights
    assert w[1] == 0.0
    torch.testing.assert_close(Central()(torch.zeros(3, 3), torch.ones(3)).weights, torch.zeros(3, dtype=torch.float64))


# --- equal, pcgrad, cagrad ---------------------------------------------------------------------------------


def test_equal_weights_are_ones():
    J = random_jacobian(np.random.default_rng(8), 4, 5)
    assert torch.equal(Equal()(J @ J.T, torch.ones(4)).weights, torch.ones(4, dtype=torch.float64))


def test_pcgrad_matches_hand_computed_projection():
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)  # g1·g2 = -1 < 0
    # g1' = g1 + ½ g2 = (0.5, 0.5); g2' = g2 + g1 = (0, 1); d = g1' + g2' = (0.5, 1.5) = 2 g1 + 1.5 g2
    w = PCGrad(torch.Generator().manual_seed(0))(J @ J.T, torch.ones(2)).weights
    torch.testing.assert_close(w, torch.tensor([2.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(combine(w, J), torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_pcgrad_is_reproducible_from_the_generator_seed():
    steps = sequence(9, 5, 3, calls=4)
    first, second = PCGrad(torch.Generator().manual_seed(4)), PCGrad(torch.Generator().manual_seed(4))
    for J, losses in steps:
        assert torch.equal(run(first, J, losses).weights, run(second, J, losses).weights)


def test_pcgrad_state_dict_restores_the_projection_order():
    steps = sequence(10, 6, 2, calls=3)
    direction = PCGrad(torch.Generator().manual_seed(1))
    run(direction, *steps[0])
    state = direction.state_dict()
    expected = [run(direction, *step).weights for step in steps[1:]]
    restored = PCGrad(torch.Generator().manual_seed(99))
    restored.load_state_dict(state)
    for step, weights in zip(steps[1:], expected, strict=True):
        assert torch.equal(run(restored, *step).weights, weights)


@pytest.mark.parametrize("seed", range(10))
def test_pcgrad_never_opposes_either_of_two_tasks(seed):
    J = random_jacobian(np.random.default_rng(seed), 2, 3)
    v = combine(PCGrad()(J @ J.T, torch.ones(2)).weights, J)
    assert_non_conflicting(J, v)


def test_cagrad_with_zero_alpha_is_the_mean_gradient():
    J = random_jacobian(np.random.default_rng(11), 4, 3)
    assert torch.equal(CAGrad(0.0)(J @ J.T, torch.ones(4)).weights, torch.full((4,), 0.25, dtype=torch.float64))


def official_cagrad(J: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Liu et al.'s cagrad(grads, alpha, rescale=1), transcribed on an m×d matrix (their grads is d×m).

    Also returns the objective value its SLSQP run (default tolerance) reached."""
    from scipy.optimize import minimize

    m = J.shape[0]
    GG = J @ J.T
    g0_norm = math.sqrt(GG.mean() + 1e-8)
    x_start = np.ones(m) / m
    c = alpha * g0_norm + 1e-8

    def objfn(x):
        return float(x @ GG @ x_start + c * math.sqrt(x @ GG @ x + 1e-8))

    cons = {"type": "eq", "fun": lambda x: 1 - sum(x)}
    res = minimize(objfn, x_start, bounds=[(0, 1)] * m, constraints=cons)
    gw = res.x @ J
    return (J.mean(axis=0) + c / (np.linalg.norm(gw) + 1e-8) * gw) / (1 + alpha**2), objfn(res.x)


@pytest.mark.parametrize("seed", range(6))
def test_cagrad_matches_the_official_code_and_keeps_the_mean_descending(seed):
    rng = np.random.default_rng(20 + seed)
    m = 2 + seed % 4
    J = random_jacobian(rng, m, 3)
    G = (J @ J.T).numpy()
    d = combine(CAGrad(0.5)(J @ J.T, torch.ones(m)).weights, J)
    expected, official_value = official_cagrad(J.numpy(), 0.5)
    # The official SLSQP stops at ftol 1e-6, on a flat objective; ours solves tighter, so the directions agree
    # to about 1e-3 and our objective is never worse.
    torch.testing.assert_close(d, torch.from_numpy(expected), rtol=0, atol=1e-2 * np.linalg.norm(expected))
    scale = G.diagonal().max()
    c = 0.5 * math.sqrt(G.mean() / scale)
    w = _cagrad_solve(G / scale, G.mean(axis=1) / scale, c)
    value = scale * (float(w @ G.mean(axis=1)) / scale + c * math.sqrt(w @ G @ w / scale))
    assert value <= official_value + 1e-9 * scale
    assert float(d @ J.mean(dim=0)) > 0.0


# --- tensioner ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("formulation", ["thesis", "relative"])
@pytest.mark.parametrize("base", ["mgda", "central", "equal"])
def test_tensioner_is_inert_for_the_first_T_calls(formulation, base):
    tensioned, plain = build(base, formulation, alpha=0.9), build(base)
    steps = sequence(12, 4, 3, calls=T + 1)
    for call, (J, losses) in enumerate(steps):
        out = run(tensioned, J, losses)
        if call < T:
            assert torch.equal(out.weights, run(plain, J, losses).weights)
            assert out.info["active"] == 0.0 and out.info["shrink"] == 0.0
        else:
            assert out.info["active"] == 1.0
            assert not torch.equal(out.weights, run(plain, J, losses).weights)


@pytest.mark.parametrize("base", ["mgda", "central", "equal", "pcgrad"])
def test_relative_with_zero_alpha_is_exactly_the_base(base):
    tensioned, plain = build(base, "relative", alpha=0.0, seed=3), build(base, seed=3)
    for J, losses in sequence(13, 5, 4, calls=3 * T):
        assert torch.equal(run(tensioned, J, losses).weights, run(plain, J, losses).weights)


def test_thesis_with_zero_alpha_is_off():
    tensioned, plain = build("mgda", "thesis", alpha=0.0), build("mgda")
    for J, losses in sequence(14, 3, 4, calls=2 * T + 1):
        assert torch.equal(run(tensioned, J, losses).weights, run(plain, J, losses).weights)


def test_thesis_formula_matches_a_direct_vector_computation_of_eq_4_12():
    alpha = 0.6
    direction = Tensioner(Central(), "thesis", T=2, alpha=alpha)
    base = torch.tensor([[1.0, 0.2, 0.1, 0.0], [0.3, 2.0, 0.0, 0.5], [0.2, 0.1, 0.5, 0.3]], dtype=torch.float64)
    scales = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 1.0, 0.5]), torch.tensor([3.0, 0.5, 0.5])]
    jacobians = [base * s[:, None].double() for s in scales]
    losses = torch.tensor([2.0, 0.5, 0.05], dtype=torch.float64)
    for J in jacobians:
        out = direction(J @ J.T, losses)
    # By hand: norm history n_t(0..2) = s_t(k)·||base_t||; ζ(i) = mean of the last 2, ζ(i−1) = of the first 2.
    norms = torch.stack([J.norm(dim=1) for J in jacobians], dim=1)
    delta = norms[:, 1:].mean(1) / norms[:, :-1].mean(1) + torch.log10(losses)
    c = alpha / (1.0 + torch.exp(-delta * math.e + math.e)) + 1.0 - alpha
    J = jacobians[-1]
    v = combine(Central()(J @ J.T, losses).weights, J)
    v_n = v + sum(c[t] * (J[t] - v) / (J[t] - v).norm() for t in range(3))
    assert (J @ v_n >= 0).all()  # so no shrink is needed and Eq 4.12 applies as is
    torch.testing.assert_close(out.info["c"], c)
    torch.testing.assert_close(out.info["delta"], delta)
    assert out.info["shrink"] == 1.0
    torch.testing.assert_close(combine(out.weights, J), v_n)
    cos = (J @ v_n) / (J.norm(dim=1) * v_n.norm())
    torch.testing.assert_close(out.info["angle"], torch.rad2deg(torch.arccos(cos)))


def test_relative_formula_matches_a_direct_vector_computation():
    alpha = 0.8
    direction = Tensioner(MGDA(), "relative", T=1, alpha=alpha)
    rng = np.random.default_rng(15)
    jacobians = [random_jacobian(rng, 3, 6).abs() for _ in range(2)]  # all pairs agree: no shrink
    losses = torch.tensor([3.0, 0.2, 1.0], dtype=torch.float64)
    for J in jacobians:
        out = direction(J @ J.T, losses)
    J = jacobians[-1]
    c, _ = tension_factors(np.stack([jacobians[0].norm(dim=1), J.norm(dim=1)], axis=1), losses.numpy(), alpha)
    v = combine(MGDA()(J @ J.T, losses).weights, J)
    v_n = v + sum((c[t] - (1 - alpha)) * (J[t] - v) for t in range(3))
    assert out.info["shrink"] == 1.0
    torch.testing.assert_close(combine(out.weights, J), v_n)


@pytest.mark.parametrize("formulation", ["thesis", "relative"])
@pytest.mark.parametrize("base", ["mgda", "central"])
def test_shrink_keeps_every_task_non_conflicting_on_adversarial_inputs(formulation, base):
    shrunk = 0
    for m in (3, 4, 6):
        direction = build(base, formulation, alpha=3.0)
        rng = np.random.default_rng(40 + m)
        for _ in range(T + 8):
            J = random_jacobian(rng, m, 2, spread=50.0)  # many tasks in a plane: heavy conflicts
            losses = torch.from_numpy(np.exp(rng.uniform(-6.0, 6.0, m)))
            out = run(direction, J, losses)
            v = combine(out.weights, J)
            assert_non_conflicting(J, v)
            shrunk += out.info["shrink"] < 1.0
    assert shrunk > 0  # the inputs really needed the shrink


def test_shrink_leaves_tasks_the_base_already_opposes_unconstrained():
    direction = Tensioner(Equal(), "relative", T=1, alpha=1.0)
    J = torch.tensor([[1.0, 0.0], [-3.0, 0.1], [0.0, 1.0]], dtype=torch.float64)  # Σg opposes g_1
    for _ in range(2):
        out = direction(J @ J.T, torch.tensor([1.0, 1.0, 10.0], dtype=torch.float64))
    base_dots = J @ combine(out.info["base_weights"], J)
    dots = J @ combine(out.weights, J)
    assert base_dots[0] < 0
    assert (dots[base_dots >= 0] >= -1e-12).all()


def test_tension_factor_is_clipped_at_zero_for_alpha_above_one():
    history = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 4.0]])
    losses = np.array([1e-6, 10.0])
    c, delta = tension_factors(history, losses, alpha=3.0)
    raw = 3.0 / (1.0 + np.exp(-delta * math.e + math.e)) + 1.0 - 3.0
    assert raw[0] < 0 and c[0] == 0.0
    np.testing.assert_allclose(c[1], raw[1])


def test_tension_factor_guards_zero_norms_and_non_positive_losses():
    history = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    c, delta = tension_factors(history, np.array([0.0, -1.0]), alpha=0.5)
    assert np.isfinite(c).all() and np.isfinite(delta).all()


@pytest.mark.parametrize("base", ["mgda", "pcgrad"])
def test_tensioner_state_dict_round_trip(base):
    steps = sequence(16, 4, 3, calls=8)
    direction = build(base, "thesis", alpha=0.7, seed=5)
    for step in steps[:3]:
        run(direction, *step)
    buffer = io.BytesIO()
    torch.save(direction.state_dict(), buffer)  # plain lists (and pcgrad's generator state) go into a checkpoint
    buffer.seek(0)
    restored = build(base, "thesis", alpha=0.7, seed=123)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.iteration == direction.iteration == 3
    for step in steps[3:]:
        a, b = run(direction, *step), run(restored, *step)
        assert torch.equal(a.weights, b.weights)
        assert all(torch.equal(a.info[key], b.info[key]) for key in a.info)


def test_tensioner_reset_forgets_the_history():
    direction = build("mgda", "relative", alpha=0.9)
    steps = sequence(17, 3, 3, calls=T + 1)
    for step in steps:
        run(direction, *step)
    direction.reset()
    assert direction.iteration == 0 and direction.state_dict()["norms"] == []
    assert run(direction, *steps[-1]).info["active"] == 0.0


# --- construction and plumbing -----------------------------------------------------------------------------


def test_create_direction_builds_from_the_table_and_wraps_in_the_tensioner():
    for name in DIRECTIONS:
        assert not isinstance(build(name), Tensioner)
        wrapped = build(name, "relative")
        assert isinstance(wrapped, Tensioner) and wrapped.formulation == "relative"


@pytest.mark.parametrize(
    "config,key",
    [
        (DirectionConfig(name="sgd"), "direction.name"),
        (DirectionConfig(tensioner=TensionerConfig(formulation="strong")), "direction.tensioner.formulation"),
        (DirectionConfig(name="mgda", normalization="l1"), "direction.normalization"),
        (DirectionConfig(name="mgda", tensioner=TensionerConfig(T=0)), "direction.tensioner.T"),
        (DirectionConfig(name="mgda", tensioner=TensionerConfig(alpha=-1.0)), "direction.tensioner.alpha"),
        (DirectionConfig(name="cagrad", cagrad_c=-0.5), "direction.cagrad_c"),
    ],
)
def test_bad_configuration_is_a_mamo_error_naming_the_key(config, key):
    with pytest.raises(MamoError, match=key.replace(".", r"\.")):
        create_direction(config)


def test_non_finite_inputs_are_a_mamo_error():
    with pytest.raises(MamoError, match="NaN"):
        MGDA()(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), torch.ones(2))


def test_combine_is_the_weighted_sum_of_rows():
    J = torch.randn(3, 7)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(combine(w, J), 0.5 * J[0] + J[1] + 2.0 * J[2])
    assert combine(w, J).dtype == torch.float32
