"""Linear scalarisation: d = Σ_t g_t (the hard-parameter-sharing baseline)."""

from __future__ import annotations

import numpy as np

from mamo.directions.base import Direction, Info


class Equal(Direction):
    """All weights 1: the gradient of the summed loss."""

    non_conflicting = False

    def weigh(self, gramian: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, Info]:
        return np.ones(gramian.shape[0]), {}
