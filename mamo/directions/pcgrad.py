"""PCGrad (Yu et al. 2020), "gradient surgery", carried out on coefficients instead of P-vectors."""

from __future__ import annotations

import numpy as np
import torch

from mamo.directions.base import Direction, Info


class PCGrad(Direction):
    """Each task's gradient is projected off the normal plane of every other task it conflicts with, in a
    random order; the direction is the sum of the projected gradients.

    Row i of the coefficient matrix C holds the projected ``g_i`` as a combination of the raw gradients, so
    its dot product with ``g_j`` is ``(C_i G)_j``; a conflict (< 0) subtracts ``dot/G_jj`` from ``C_ij``.
    The weights are ``C.sum(0)``. The order comes from ``generator`` (seeded from ``torch.initial_seed()``
    when none is given, so runs are reproducible without consuming the global random stream); its state is
    part of :meth:`state_dict`. PCGrad only guarantees ``g_t · d ≥ 0`` for two tasks, hence
    ``non_conflicting = False``.
    """

    non_conflicting = False

    def __init__(self, generator: torch.Generator | None = None) -> None:
        if generator is None:
            generator = torch.Generator().manual_seed(torch.initial_seed())
        self.generator = generator

    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        m = gramian.shape[0]
        coefficients = np.eye(m)
        sq_norms = gramian.diagonal()
        for i in range(m):
            others = [j for j in range(m) if j != i]
            order = torch.randperm(m - 1, generator=self.generator, device=self.generator.device).tolist()
            row = coefficients[i]
            for position in order:
                j = others[position]
                dot = float(row @ gramian[:, j])
                if dot < 0.0 and sq_norms[j] > 0.0:
                    row[j] -= dot / sq_norms[j]
        return coefficients.sum(axis=0), {}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
