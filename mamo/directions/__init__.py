"""Multi-task descent directions, each a weighting of the task gradients computed from their m×m Gramian.

``create_direction(config)`` builds the method named by ``direction.name`` from :data:`DIRECTIONS` and wraps
it in a :class:`Tensioner` unless ``direction.tensioner.formulation`` is ``off``. Calling a direction with the
Gramian and the losses gives weights ``w``; the shared parameters' update direction is ``wᵀ J``
(:func:`combine`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mamo.config import DirectionConfig
from mamo.directions.aligned import AlignedMTL
from mamo.directions.base import Direction, DirectionOutput
from mamo.directions.cagrad import CAGrad
from mamo.directions.central import Central
from mamo.directions.equal import Equal
from mamo.directions.imtl import IMTLG
from mamo.directions.mgda import MGDA, NORMALIZERS
from mamo.directions.min_norm import min_norm_weights
from mamo.directions.pcgrad import PCGrad
from mamo.directions.tensioner import FORMULATIONS, Tensioner, tension_factors
from mamo.directions.upgrad import UPGrad
from mamo.errors import MamoError

__all__ = [
    "DIRECTIONS",
    "FORMULATIONS",
    "NORMALIZERS",
    "TENSIONER_FORMULATIONS",
    "AlignedMTL",
    "CAGrad",
    "Central",
    "Direction",
    "DirectionOutput",
    "Equal",
    "IMTLG",
    "MGDA",
    "PCGrad",
    "Tensioner",
    "UPGrad",
    "combine",
    "create_direction",
    "direction_label",
    "min_norm_weights",
    "tension_factors",
    "METHOD_SETTINGS",
    "THESIS_BASES",
]

Factory = Callable[[DirectionConfig, torch.Generator | None], Direction]

DIRECTIONS: dict[str, Factory] = {
    "equal": lambda config, generator: Equal(),
    "mgda": lambda config, generator: MGDA(config.normalization),
    "central": lambda config, generator: Central(),
    "pcgrad": lambda config, generator: PCGrad(generator),
    "cagrad": lambda config, generator: CAGrad(config.cagrad_c),
    "upgrad": lambda config, generator: UPGrad(),
    "imtl-g": lambda config, generator: IMTLG(),
    "aligned-mtl": lambda config, generator: AlignedMTL(),
}

TENSIONER_FORMULATIONS: tuple[str, ...] = ("off", *FORMULATIONS)

# The settings a method reads beyond its name, as a report shows them ("" when at their plain default).
_LABEL_SETTINGS: dict[str, Callable[[DirectionConfig], str]] = {
    "mgda": lambda config: "" if config.normalization == "none" else f"({config.normalization})",
    "cagrad": lambda config: f"(c={config.cagrad_c:g})",
}


# The direction settings only some methods read, by method: a run that changes one under another method is told
# it has no effect (mamo.session.unused_settings_notes; each was ignored without a word, under every method).
METHOD_SETTINGS: dict[str, tuple[str, ...]] = {"mgda": ("normalization",), "cagrad": ("cagrad_c",)}

# The base directions the thesis wraps in its tensioner (Algorithms 1–2); a run that wraps another is told so.
THESIS_BASES = ("mgda", "central")


def create_direction(config: DirectionConfig, generator: torch.Generator | None = None) -> Direction:
    """The direction named by ``config.name``, wrapped in the tensioner unless its formulation is ``off``.

    ``generator`` seeds the methods that draw random numbers (pcgrad's projection order).
    """
    factory = DIRECTIONS.get(config.name)
    if factory is None:
        raise MamoError(f"unknown direction '{config.name}' (direction.name); use one of {', '.join(DIRECTIONS)}.")
    tensioner = config.tensioner
    if tensioner.formulation not in TENSIONER_FORMULATIONS:
        raise MamoError(
            f"unknown tensioner formulation '{tensioner.formulation}' (direction.tensioner.formulation); "
            f"use one of {', '.join(TENSIONER_FORMULATIONS)}."
        )
    base = factory(config, generator)
    if tensioner.formulation == "off":
        return base
    return Tensioner(base, tensioner.formulation, tensioner.T, tensioner.alpha)


def direction_label(config: DirectionConfig, gradients: str = "exact") -> str:
    """How reports and logs name a run's direction, e.g. ``mgda+tensioner(thesis)`` or
    ``cagrad(c=0.5), ub``: the method with the settings it reads, the tensioner's formulation, and ``ub`` when
    the task gradients were taken on the shared representation (``train.gradients``). Runs that differ in
    any of these never share a row label."""
    settings = _LABEL_SETTINGS.get(config.name)
    label = config.name + (settings(config) if settings else "")
    if config.tensioner.formulation != "off":
        label += f"+tensioner({config.tensioner.formulation})"
    return label + (", ub" if gradients == "ub" else "")


def combine(weights: Tensor, jacobian: Tensor) -> Tensor:
    """The direction ``weightsᵀ J`` for an m×d matrix ``J``, in J's dtype and on its device."""
    return weights.to(dtype=jacobian.dtype, device=jacobian.device) @ jacobian
