"""Direction test cases shared by tests/test_directions.py and tests/test_tensioner.py: the (method,
tensioner) pairs every property runs on, and random gradients, losses and call sequences."""

from __future__ import annotations

import math

import numpy as np
import torch

from mamo.config import DirectionConfig, TensionerConfig
from mamo.directions import DIRECTIONS, Direction, create_direction

# Every base method alone, plus both tensioner formulations around the bases the thesis uses and the three
# Gramian methods (UPGrad the other non-conflicting base; IMTL-G and Aligned-MTL, whose weights leave the simplex
# where the thesis pull's unit vectors stop cancelling).
CASES = [(name, "off") for name in DIRECTIONS] + [
    (name, formulation) for name in ("mgda", "central", "upgrad", "imtl-g", "aligned-mtl")
    for formulation in ("thesis", "relative")
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


def far_apart_jacobians(seed: int, m: int, count: int):
    """``count`` float64 numpy Jacobians of m gradients in m + 2 dimensions, random directions, norms 1 to 1e-7
    (geometrically spaced, in a random order): where a solver that loses the short gradients' digits sends tasks
    uphill."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        J = rng.standard_normal((m, m + 2))
        J *= (np.geomspace(1.0, 1e-7, m)[rng.permutation(m)] / np.linalg.norm(J, axis=1))[:, None]
        yield J


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
