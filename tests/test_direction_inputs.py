"""What a direction refuses and how it reads its inputs: bad settings, non-finite values, matrices that cannot
be a Gramian, float16 Gramians, and gradients too short for a float32 Gramian to resolve."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from direction_cases import CASES, T, build

from mamo.config import DirectionConfig, TensionerConfig, load_config
from mamo.directions import DIRECTIONS, create_direction
from mamo.directions.base import gramian_fault
from mamo.errors import MamoError


@pytest.mark.parametrize(
    "config,key",
    [
        (DirectionConfig(name="sgd"), "direction.name"),
        (DirectionConfig(tensioner=TensionerConfig(formulation="strong")), "direction.tensioner.formulation"),
        (DirectionConfig(name="mgda", normalization="l1"), "direction.normalization"),
        (DirectionConfig(name="mgda", tensioner=TensionerConfig(T=0)), "direction.tensioner.T"),
        (DirectionConfig(name="mgda", tensioner=TensionerConfig(T=10**20)), "direction.tensioner.T"),  # overflowed
        (DirectionConfig(name="mgda", tensioner=TensionerConfig(alpha=-1.0)), "direction.tensioner.alpha"),
        (DirectionConfig(name="cagrad", cagrad_c=-0.5), "direction.cagrad_c"),
        (DirectionConfig(name="cagrad", cagrad_c=1e308), "direction.cagrad_c"),  # c² overflowed in the first step
        # From Python, a string or a bool was math's TypeError naming no key.
        (DirectionConfig(name="mgda", tensioner=TensionerConfig(alpha="0.3")), "direction.tensioner.alpha"),
        (DirectionConfig(name="mgda", tensioner=TensionerConfig(alpha=True)), "direction.tensioner.alpha"),
        (DirectionConfig(name="mgda", tensioner=TensionerConfig(T=2.0)), "direction.tensioner.T"),
        (DirectionConfig(name="cagrad", cagrad_c="0.5"), "direction.cagrad_c"),
    ],
)
def test_bad_configuration_is_a_mamo_error_naming_the_key(config, key):
    with pytest.raises(MamoError, match=key.replace(".", r"\.")):
        create_direction(config)


@pytest.mark.parametrize("gramian,losses,problem", [
    ([[1.0, float("nan")], [float("nan"), 1.0]], [1.0, 1.0], "the task gradients are NaN or infinite at this step"),
    # Finite losses and gradients whose squared norms pass float32's 3.4e38 (a helper's data of scale 1e10):
    # the message said the losses or gradients were NaN or infinite, which neither was.
    ([[float("inf"), 1.0], [1.0, 1.0]], [1.0, 1.0], r"the task gradients' squared norms overflow at this step \("
                                                     r"the Gramian holds inf: a gradient norm above ~1.8e19"),
    ([[1.0, 0.0], [0.0, 1.0]], [1.0, float("nan")], "the task losses are NaN or infinite at this step"),
    ([[float("inf"), 0.0], [0.0, 1.0]], [float("-inf"), 1.0], "the task losses are NaN or infinite at this step"),
])
@pytest.mark.parametrize("name", ["mgda", "equal"])
def test_non_finite_inputs_are_a_mamo_error_saying_what(name, gramian, losses, problem):
    with pytest.raises(MamoError, match=problem) as info:
        build(name)(torch.tensor(gramian), torch.tensor(losses))
    # Also a FloatingPointError, which the trainer reports as a diverged run naming the step and the rate.
    assert isinstance(info.value, FloatingPointError)


def test_misused_directions_say_what_to_pass_instead():
    # A Python API audit: a Jacobian passed as the Gramian, or a tensioner reused for another number of tasks,
    # raised bare ValueErrors with no way out.
    jacobian = torch.randn(2, 100)
    with pytest.raises(MamoError, match=r"takes the 2×2 Gramian .* got shape \(2, 100\); pass jacobian @ jacobian.T"):
        build("mgda")(jacobian, torch.ones(2))
    tensioned = create_direction(DirectionConfig(name="mgda", tensioner=TensionerConfig(formulation="thesis", T=1)))
    tensioned(torch.eye(2), torch.ones(2))
    with pytest.raises(MamoError, match=r"history of 2 tasks, got 3; make a new direction \(or call its reset\(\)\)"):
        tensioned(torch.eye(3), torch.ones(3))
    tensioned.reset()
    assert tensioned(torch.eye(3), torch.ones(3)).weights.shape == (3,)


@pytest.mark.parametrize("matrix,fault", [
    ([[1.0, 0.0], [0.0, -1.0]], r"its diagonal entry \(1, 1\) is -1, and a squared gradient norm cannot be negative"),
    ([[1.0, 0.5], [-0.5, 1.0]], r"it is not symmetric \(entry \(1, 0\) is -0.5, \(0, 1\) is 0.5\)"),
    ([[1.0, 2.0], [2.0, 1.0]],
     r"its entry \(1, 0\) = 2 exceeds sqrt\(G\[1,1\]·G\[0,0\]\) = 1, which no pair of gradients can"),
    ([[1.0, 0.0, 0.0], [0.0, 0.0, 1e-3], [0.0, 1e-3, 1.0]], r"its entry \(2, 1\) = 0.001 exceeds sqrt"),
])
@pytest.mark.parametrize("name", [*DIRECTIONS, "mgda+tensioner"])
def test_a_matrix_that_is_no_gramian_is_refused_naming_why(name, matrix, fault):
    # A non-PSD matrix went into the solvers without a word (a Python API audit).
    direction = build("mgda", "thesis") if name == "mgda+tensioner" else build(name)
    with pytest.raises(MamoError, match=f"takes the Gramian J Jᵀ of the task gradients, but {fault}.*; pass jacobian"):
        direction(torch.tensor(matrix), torch.ones(len(matrix)))


def test_float32_and_bf16_gramians_of_near_parallel_zero_and_underflowing_gradients_pass():
    # The tests must never refuse a real Gramian: rounding of nearly parallel 1 M-long gradients, a zero gradient,
    # and a bf16 matmul all stay inside the slack.
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1_000_000, generator=generator)
    jacobian = torch.cat([base, base + 1e-4 * torch.randn(1, 1_000_000, generator=generator), torch.zeros(1, 1_000_000),
                          -base])
    # A gradient whose float32 squared norm underflows to 0 while its products with others do not (a task
    # classified with a huge margin): it was refused as "G_ij exceeds sqrt(G_ii·G_jj) = 0".
    underflowed = torch.stack([torch.full((1_000_000,), 1e-24), torch.ones(1_000_000)])
    assert (underflowed @ underflowed.T)[0, 0] == 0 and (underflowed @ underflowed.T)[0, 1] > 0
    assert gramian_fault((underflowed @ underflowed.T).tolist()) is None
    for gramian in (jacobian @ jacobian.T, (jacobian.bfloat16() @ jacobian.bfloat16().T).float()):
        assert gramian_fault(gramian.tolist()) is None
        assert build("mgda")(gramian, torch.ones(4)).weights.shape == (4,)


@pytest.mark.parametrize("name,formulation", CASES)
def test_a_gradient_below_1e_15_in_norm_counts_as_zero(name, formulation):
    # A helper's fuzz: two normal tasks, a tiny one (components 1e-22, as a saturated softmax gives) and one
    # anti-parallel to a normal task at 1e-20 of its length. Their float32 Gram entries (~1e-41) are subnormal,
    # keep a digit or two, and CAGrad weighted the last task 2.8e27: a step longer than any task's gradient.
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(2, 2000, generator=generator) * 1e-2
    jacobian = torch.cat([torch.randn(1, 2000, generator=generator) * 1e-22, normal, -1e-20 * normal[1:]])
    gramian, losses = jacobian @ jacobian.T, torch.tensor([1e-20, 0.5, 0.7, 1e-20])
    assert 0 < gramian[0, 0] < 1e-30 and 0 < gramian[3, 3] < 1e-30
    zeroed = gramian.clone()
    zeroed[[0, 3], :] = 0
    zeroed[:, [0, 3]] = 0
    given, reference = build(name, formulation), build(name, formulation)
    for _ in range(T + 2):  # past the tensioner's inert first T calls
        weights = given(gramian, losses).weights
        assert torch.equal(weights, reference(zeroed, losses).weights)
    if name == "cagrad" and formulation == "off":  # its step is (g0 + c·g_w/|g_w|)/(1 + c²): at most |g0|
        assert (weights @ jacobian.double()).norm() <= jacobian.double().mean(0).norm() * (1 + 1e-6)


@pytest.mark.parametrize("gramian", [torch.eye(2, dtype=torch.float16), np.eye(2, dtype=np.float16)])
def test_a_float16_gramian_is_refused_with_the_way_out(gramian):
    # A review: under fp16 autocast, jacobian @ jacobian.T comes out in float16, whose subnormal squared norms
    # failed the pairwise checks with a false "no pair of gradients can" (19 of 20 real ones).
    with pytest.raises(MamoError, match=r"got float16, .* compute jacobian @ jacobian.T in float32, outside autocast"):
        build("mgda")(gramian, torch.ones(2))


def test_a_tiny_negative_diagonal_entry_is_a_rounded_zero_not_a_fault():
    # Refused before, though the floor below zeroes such an entry anyway (a review: -1e-300).
    assert gramian_fault([[1.0, 0.0], [0.0, -1e-300]]) is None
    weights = build("mgda")(torch.tensor([[1.0, 0.0], [0.0, -1e-300]], dtype=torch.float64), torch.ones(2)).weights
    assert weights.tolist() == build("mgda")(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.ones(2)).weights.tolist()


@pytest.mark.parametrize("value", [torch.tensor(0.3), np.array(0.3), np.float32(0.3)])
def test_numbers_of_other_types_still_configure_a_direction(value):
    # The type check that names the key for "0.3" must not refuse what float() takes (0-d tensors and arrays).
    assert create_direction(DirectionConfig(tensioner=TensionerConfig(alpha=value))).alpha == pytest.approx(0.3)
    assert create_direction(DirectionConfig(name="cagrad", cagrad_c=value)).alpha == pytest.approx(0.3)


@pytest.mark.parametrize("name,formulation", CASES + [("mgda-l2", "thesis")])
@pytest.mark.parametrize("m", [2, 3])
def test_weights_of_floats_agrees_with_the_call_on_tensors(name, formulation, m):
    """The step hands a direction Python floats (``weights_of``): the same weights and diagnostics, to the bit,
    as a call on float32 tensors, a task whose gradient is too short to count (zeroed row) included."""
    kwargs = {"normalization": "l2"} if name == "mgda-l2" else {}
    on_tensors, on_floats = (build(name.removesuffix("-l2"), formulation, **kwargs) for _ in range(2))
    rng = np.random.default_rng(m)
    for call in range(T + 3):
        J = torch.from_numpy(rng.standard_normal((m, 7))).float()
        if call == T + 2:
            J[m - 1] = 1e-20  # a squared norm under 1e-30: its row and column count as zero
        gramian, losses = J @ J.T, torch.from_numpy(rng.uniform(0.1, 3.0, m)).float()
        a, b = on_tensors(gramian, losses), on_floats.weights_of(gramian.tolist(), losses.tolist())
        assert torch.equal(a.weights, b.weights)
        assert list(a.info) == list(b.info)
        for key in a.info:
            assert torch.equal(a.info[key], b.info[key]) and a.info.flat(key) == b.info.flat(key), key


def test_a_setting_only_another_method_reads_is_noted():
    # Ignored without a word for every method before: --set direction.normalization=l2 under upgrad trained as none.
    from mamo.session import unused_settings_notes

    def notes(*settings: str) -> list[str]:
        return unused_settings_notes(load_config("quick", list(settings)))

    assert notes("direction.name=mgda", "direction.normalization=l2") == []
    assert notes("direction.name=cagrad", "direction.cagrad_c=0.9") == []
    assert notes("direction.name=upgrad", "direction.normalization=none", "direction.cagrad_c=0.5") == []  # defaults
    assert notes("direction.name=upgrad", "direction.normalization=l2") == [
        "note: direction 'upgrad' does not use direction.normalization (mgda only), so it has no effect."]
    assert notes("direction.name=equal", "direction.normalization=loss", "direction.cagrad_c=0.9") == [
        "note: direction 'equal' does not use direction.normalization (mgda only) or direction.cagrad_c (cagrad "
        "only), so they have no effect."]


def test_a_tensioner_around_a_base_the_thesis_does_not_tension_is_noted():
    # The presets turn the tensioner on, and --set direction.name=pcgrad kept it without a word.
    from mamo.session import setting_notes

    def notes(*settings: str) -> list[str]:
        return [n for n in setting_notes(load_config("quick", list(settings))) if "tensioner (" in n]

    assert notes("direction.name=mgda") == [] and notes("direction.name=central") == []
    assert notes("direction.name=pcgrad", "direction.tensioner.formulation=off") == []
    assert notes("direction.name=pcgrad") == [
        "note: direction 'pcgrad' runs inside the 'thesis' tensioner (direction.tensioner), which the thesis applies "
        "to mgda and central; on other bases it changes the method (docs/directions.md, logic3); --set "
        "direction.tensioner.formulation=off runs pcgrad alone."]
    assert "'relative' tensioner" in notes("direction.name=upgrad", "direction.tensioner.formulation=relative")[0]
