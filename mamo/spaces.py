"""Search spaces: a backbone split into shared cells, plus one head per task.

One contract for every backbone (:class:`SearchSpace`), one name -> factory table (:data:`SPACES`) and one
create function (:func:`create_space`), in the manner of timm. A space is fully described by a plain dict
(:meth:`SearchSpace.spec`), which the architecture graph stores so a model can be rebuilt from the graph alone.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mamo.config import ModelConfig
from mamo.errors import MamoError, first_line
from mamo.pooling import MaxPool2d
from mamo.tasks import TASK_TYPES, TaskSpec, head_name
from mamo.timm_cells import check_timm_name, create_timm_cells, fixed_input_size

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


class SearchSpace:
    """Builds cell ``index`` of the shared trunk (a GMK is a copy of one) and task heads.

    A family also says, before any data is loaded, which ``model`` settings it needs (:meth:`check_config`,
    :meth:`spec_from_config`) and whether it takes image inputs (``needs_images``); ``named`` families take a
    model name after a colon (``timm:resnet18``)."""

    needs_images = True
    named = False
    # The model settings only this family reads: model.weights elsewhere is refused (check_model_config), the
    # others noted as unused (mamo.session.unused_settings_notes).
    reads: tuple[str, ...] = ()
    smaller = "a smaller model.backbone"  # the model settings that shrink this family's cells, for a memory error
    # For a cell that fails on the input size.
    size_advice = "use larger inputs or a backbone that downsamples less (model.backbone=cnn fits any size)"

    @classmethod
    def check_config(cls, config: ModelConfig, name: str) -> None:
        """Refuse this family's settings in ``config`` that cannot work, whatever the data."""

    @classmethod
    def spec_from_config(cls, config: ModelConfig, name: str) -> dict:
        """This family's entries of the spec, from ``config``."""
        return {}

    def __init__(self, spec: dict):
        self._spec = dict(spec)
        self.input_shape = tuple(spec["input_shape"])

    @property
    def backbone(self) -> str:
        """The ``model.backbone`` name this space was made from."""
        timm_name = self._spec.get("timm_name")
        return f"{self._spec['family']}:{timm_name}" if timm_name else self._spec["family"]

    @property
    def num_cells(self) -> int:
        raise NotImplementedError

    def build_cell(self, index: int) -> nn.Module:
        raise NotImplementedError

    def spec(self) -> dict:
        """A JSON-able dict from which :func:`space_from_spec` rebuilds this space."""
        return dict(self._spec)

    def cell_shapes(self) -> list[tuple[int, ...]]:
        """Output shape (without batch) of every cell, found by a dry run on a zero input."""
        shapes = []
        with torch.no_grad():
            x = torch.zeros(2, *self.input_shape)
            for index in range(self.num_cells):
                try:
                    x = self.build_cell(index).eval()(x)
                except (RuntimeError, AssertionError, ValueError, ZeroDivisionError, MemoryError) as exc:  # bad sizes
                    reason = memory_failure(exc)
                    if reason is not None:  # too large a model, not too small an input: say which setting shrinks it
                        raise MamoError(
                            f"backbone '{self.backbone}' needs more memory than this machine can give at cell {index} "
                            f"({reason}); use a smaller model: "
                            f"{self.smaller}."
                        ) from exc
                    raise MamoError(
                        f"backbone '{self.backbone}' fails at cell {index} "
                        f"on inputs of shape {list(self.input_shape)} ({first_line(exc)}); {self.size_advice}."
                    ) from exc
                if not isinstance(x, torch.Tensor):  # selecsls hands (features, skip) lists between its stages
                    raise MamoError(f"backbone '{self.backbone}' passes a {type(x).__name__} from cell {index} to the "
                                    "next, not one feature map, which a cell's output must be; pick another backbone.")
                shapes.append(tuple(x.shape[1:]))
        return shapes

    def build_head(self, task: TaskSpec, feature_shape: tuple[int, ...]) -> nn.Module:
        """Task ``task``'s head on the last cell's features; ``head: default`` takes its type's default head."""
        name = head_name(task)
        if name not in HEADS:
            raise MamoError(f"task '{task.name}' asks for unknown head '{task.head}'; use one of "
                            f"{', '.join(sorted(HEADS))}.")
        hidden = int(self._spec.get("head_hidden", 50))
        with memory_failures_named(f"the head of task '{task.name}'", f"use a smaller model.head_hidden than {hidden}"):
            return HEADS[name](task, feature_shape, hidden)


def memory_failure(exc: BaseException) -> str | None:
    """The reason to show when ``exc`` is an allocation failure (torch's CPU allocator raises a plain RuntimeError
    for one, and for a tensor whose byte count overflows 64 bits); None for any other error."""
    text = str(exc)
    failed = isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (isinstance(exc, RuntimeError) and any(
        words in text for words in ("can't allocate memory", "not enough memory", "out of memory",
                                    "Storage size calculation overflowed")))
    return (text.splitlines()[0] if text else type(exc).__name__) if failed else None


@contextlib.contextmanager
def memory_failures_named(what: str, fix: str) -> Iterator[None]:
    """Inside, an allocation failure (:func:`memory_failure`) becomes the one sentence "``what`` needs more memory
    than this machine can give (reason); ``fix``."; any other error passes unchanged."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        reason = memory_failure(exc)
        if reason is None:
            raise
        raise MamoError(f"{what} needs more memory than this machine can give ({reason}); {fix}.") from exc


def _flatten_features(feature_shape: tuple[int, ...]) -> tuple[list[nn.Module], int]:
    # Feature maps are pooled first so heads stay small whatever the input resolution.
    if len(feature_shape) > 1:
        return [nn.AdaptiveAvgPool2d(1), nn.Flatten()], feature_shape[0]
    return [nn.Flatten()], feature_shape[0]


def _mlp_head(task: TaskSpec, feature_shape: tuple[int, ...], hidden: int) -> nn.Module:
    layers, width = _flatten_features(feature_shape)
    if hidden > 0:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, task.output_size))
    return nn.Sequential(*layers, *TASK_TYPES[task.type].mlp_output(task))


def _identity_head(task: TaskSpec, feature_shape: tuple[int, ...], hidden: int) -> nn.Module:
    if math.prod(feature_shape) != task.output_size:
        raise MamoError(
            f"task '{task.name}' asks for an identity head but the trunk gives {math.prod(feature_shape)} "
            f"features for {task.output_size} outputs; make the last cell's width {task.output_size}."
        )
    # The trunk's features are the prediction: shaped as the task's loss reads it (a map for dense and
    # reconstruction tasks), but not squashed as an mlp head's output is.
    reshape = [layer for layer in TASK_TYPES[task.type].mlp_output(task) if isinstance(layer, nn.Unflatten)]
    return nn.Sequential(nn.Flatten(), *reshape)


def _dense_head(task: TaskSpec, feature_shape: tuple[int, ...], hidden: int) -> nn.Module:
    """A light decoder for per-pixel targets: 3×3 conv + ReLU, 1×1 conv to the target's channels, then bilinear
    upsampling to the target's (H, W). Deliberately small, so that the shared trunk carries the features."""
    if len(feature_shape) != 3:
        raise MamoError(
            f"task '{task.name}' predicts a {task.type} map, which needs a backbone whose last cell gives a feature "
            f"map (C, H, W), but it gives {tuple(feature_shape)}; use model.backbone=timm:<model> (e.g. "
            "timm:resnet18) or cnn."
        )
    size = tuple(task.shape[-2:])
    channels = task.output_size // math.prod(size)
    width = hidden if hidden > 0 else feature_shape[0]
    return nn.Sequential(
        nn.Conv2d(feature_shape[0], width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, channels, 1),
        nn.Upsample(size=size, mode="bilinear", align_corners=False),
    )


HEADS: dict[str, Callable[[TaskSpec, tuple[int, ...], int], nn.Module]] = {
    "mlp": _mlp_head,
    "dense": _dense_head,
    "identity": _identity_head,
}


class MLPSpace(SearchSpace):
    """Fully connected cells: Linear + activation per entry of ``hidden`` (the thesis' logic net is [2])."""

    needs_images = False
    reads = ("hidden", "activation")
    smaller = "lower the widths in model.hidden"

    @classmethod
    def check_config(cls, config: ModelConfig, name: str) -> None:
        if not config.hidden or any(width < 1 for width in config.hidden):
            raise MamoError(f"model.hidden is {config.hidden}; give at least one positive width (the mlp's layer "
                            "widths, the cnn's channels), e.g. [64].")

    @classmethod
    def spec_from_config(cls, config: ModelConfig, name: str) -> dict:
        return {"hidden": list(config.hidden), "activation": config.activation}

    @property
    def num_cells(self) -> int:
        return len(self._spec["hidden"])

    def build_cell(self, index: int) -> nn.Module:
        widths = [math.prod(self.input_shape), *self._spec["hidden"]]
        layers: list[nn.Module] = [nn.Flatten()] if index == 0 and len(self.input_shape) > 1 else []
        layers += [nn.Linear(widths[index], widths[index + 1]), ACTIVATIONS[self._spec["activation"]]()]
        return nn.Sequential(*layers)


class LeNetSpace(SearchSpace):
    """The MultiMNIST LeNet of Sener & Koltun: two conv cells and a fully connected cell to ``latent``."""

    reads = ("latent",)
    smaller = "lower model.latent"

    @classmethod
    def check_config(cls, config: ModelConfig, name: str) -> None:
        if config.latent < 1:
            raise MamoError(f"model.latent is {config.latent}; give the lenet a positive latent width, e.g. 50.")

    @classmethod
    def spec_from_config(cls, config: ModelConfig, name: str) -> dict:
        return {"latent": config.latent}

    @property
    def num_cells(self) -> int:
        return 3

    def build_cell(self, index: int) -> nn.Module:
        channels = self.input_shape[0]
        if index == 0:
            return nn.Sequential(nn.Conv2d(channels, 10, 5), MaxPool2d(2), nn.ReLU())
        if index == 1:
            return nn.Sequential(nn.Conv2d(10, 20, 5), MaxPool2d(2), nn.ReLU())
        with torch.no_grad():
            probe = self.build_cell(1)(self.build_cell(0)(torch.zeros(1, *self.input_shape)))
        return nn.Sequential(nn.Flatten(), nn.Linear(probe.numel(), self._spec["latent"]), nn.ReLU())


class CNNSpace(MLPSpace):
    """Small images (8 × 8 digits and up), where LeNet's two unpadded 5 × 5 convolutions do not fit: per entry of
    ``hidden`` a cell of a 3 × 3 convolution (padding 1) to that many channels and the activation, then a 2 × 2
    max-pooling while the map is at least 2 × 2, so any input size works and each cell halves it."""

    needs_images = True
    smaller = "lower the channels in model.hidden"

    def _map_size(self, index: int) -> tuple[int, int]:
        """(H, W) of cell ``index``'s input."""
        height, width = self.input_shape[1:]
        for _ in range(index):
            if min(height, width) >= 2:
                height, width = height // 2, width // 2
        return height, width

    def build_cell(self, index: int) -> nn.Module:
        channels = [self.input_shape[0], *self._spec["hidden"]]
        activation = ACTIVATIONS[self._spec["activation"]]
        layers = [nn.Conv2d(channels[index], channels[index + 1], 3, padding=1), activation()]
        if min(self._map_size(index)) >= 2:
            layers.append(MaxPool2d(2))
        return nn.Sequential(*layers)


class TimmSpace(SearchSpace):
    """Any timm model whose ``features_only`` wrapper runs its stages in sequence: each stage is a cell."""

    named = True
    reads = ("weights",)
    smaller = "pick a smaller timm model in model.backbone=timm:<name>"

    @classmethod
    def check_config(cls, config: ModelConfig, name: str) -> None:
        check_timm_name(name)

    @classmethod
    def spec_from_config(cls, config: ModelConfig, name: str) -> dict:
        return {"timm_name": name, "weights": config.weights}

    def __init__(self, spec: dict):
        super().__init__(spec)
        self._template = create_timm_cells(spec["timm_name"], self.input_shape, spec.get("weights"))

    @property
    def size_advice(self) -> str:
        native = fixed_input_size(self._spec["timm_name"])
        if native is None:
            return SearchSpace.size_advice
        return (f"timm model '{self._spec['timm_name']}' is made for {native[0]}×{native[1]} inputs and built here for "
                "the data's size, which its patches and windows must divide; use inputs of its own size or a "
                "backbone without a fixed one")

    @property
    def num_cells(self) -> int:
        return len(self._template)

    def build_cell(self, index: int) -> nn.Module:
        return copy.deepcopy(self._template[index])


SPACES: dict[str, type[SearchSpace]] = {"mlp": MLPSpace, "cnn": CNNSpace, "lenet": LeNetSpace, "timm": TimmSpace}


def space_from_spec(spec: dict) -> SearchSpace:
    return SPACES[spec["family"]](spec)


def check_model_config(config: ModelConfig) -> None:
    """Everything about ``model`` that does not depend on the data (names, widths), so that a typo is found
    before the data loads or anything trains."""
    family, _, name = config.backbone.partition(":")
    if family not in SPACES or SPACES[family].named != bool(name):
        raise MamoError(
            f"unknown backbone '{config.backbone}' (model.backbone); use mlp, cnn, lenet or timm:<model name>."
        )
    if config.activation not in ACTIVATIONS:
        raise MamoError(f"unknown activation '{config.activation}' (model.activation); use one of "
                        f"{', '.join(ACTIVATIONS)}.")
    if config.head_hidden < 0:
        raise MamoError(f"model.head_hidden is {config.head_hidden}; use 0 (a linear head) or a positive width.")
    if config.weights is not None and "weights" not in SPACES[family].reads:  # was dropped without a word
        raise MamoError(f"model.weights is read by timm backbones only, and backbone '{config.backbone}' would "
                        "ignore it; remove model.weights or pick a timm:<name> backbone.")
    # Every family's own widths, also where another family runs: a bad value is a mistake, used or not.
    for space in {SPACES[family], *(other for other in SPACES.values() if not other.named)}:
        space.check_config(config, name)


def create_space(config: ModelConfig, input_shape: tuple[int, ...]) -> SearchSpace:
    """The search space for ``model.backbone`` on inputs of ``input_shape`` (channels first)."""
    check_model_config(config)  # a wrong name is the first thing to fix, whatever the data
    family, _, name = config.backbone.partition(":")
    space = SPACES[family]
    if space.needs_images and len(input_shape) != 3:
        raise MamoError(
            f"backbone '{config.backbone}' needs image inputs (C, H, W) but the data gives {tuple(input_shape)}; "
            "use model.backbone=mlp for vector inputs."
        )
    return space_from_spec({"family": family, "input_shape": list(input_shape), "head_hidden": config.head_hidden,
                            **space.spec_from_config(config, name)})
