"""Search spaces: a backbone split into shared cells, plus one head per task.

One contract for every backbone (:class:`SearchSpace`), one name -> factory table (:data:`SPACES`) and one
create function (:func:`create_space`), in the manner of timm. A space is fully described by a plain dict
(:meth:`SearchSpace.spec`), which the architecture graph stores so a model can be rebuilt from the graph alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mamo.config import ModelConfig
from mamo.errors import MamoError
from mamo.tasks import TaskSpec

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


class SearchSpace:
    """Builds cell ``index`` of the shared trunk (a GMK is a copy of one) and task heads."""

    def __init__(self, spec: dict):
        self._spec = dict(spec)
        self.input_shape = tuple(spec["input_shape"])

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
                except RuntimeError as exc:
                    raise MamoError(
                        f"backbone {self._spec['family']} {self._spec.get('timm_name', '')} fails at cell {index} "
                        f"on inputs of shape {list(self.input_shape)} ({str(exc).splitlines()[0]}); "
                        "use larger inputs or a backbone that downsamples less."
                    ) from exc
                shapes.append(tuple(x.shape[1:]))
        return shapes

    def build_head(self, task: TaskSpec, feature_shape: tuple[int, ...]) -> nn.Module:
        hidden = int(self._spec.get("head_hidden", 50))
        return HEADS[task.head](task, feature_shape, hidden)


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
    if task.type == "reconstruction":
        # Targets are intensities in [0, 1].
        layers += [nn.Sigmoid(), nn.Unflatten(1, task.shape)]
    return nn.Sequential(*layers)


def _identity_head(task: TaskSpec, feature_shape: tuple[int, ...], hidden: int) -> nn.Module:
    if math.prod(feature_shape) != task.output_size:
        raise MamoError(
            f"task '{task.name}' asks for an identity head but the trunk gives {math.prod(feature_shape)} "
            f"features for {task.output_size} outputs; make the last cell's width {task.output_size}."
        )
    return nn.Flatten()


HEADS: dict[str, Callable[[TaskSpec, tuple[int, ...], int], nn.Module]] = {
    "default": _mlp_head,
    "identity": _identity_head,
}


class MLPSpace(SearchSpace):
    """Fully connected cells: Linear + activation per entry of ``hidden`` (the thesis' logic net is [2])."""

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

    @property
    def num_cells(self) -> int:
        return 3

    def build_cell(self, index: int) -> nn.Module:
        channels = self.input_shape[0]
        if index == 0:
            return nn.Sequential(nn.Conv2d(channels, 10, 5), nn.MaxPool2d(2), nn.ReLU())
        if index == 1:
            return nn.Sequential(nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU())
        with torch.no_grad():
            probe = self.build_cell(1)(self.build_cell(0)(torch.zeros(1, *self.input_shape)))
        return nn.Sequential(nn.Flatten(), nn.Linear(probe.numel(), self._spec["latent"]), nn.ReLU())


class TimmSpace(SearchSpace):
    """Any timm model whose ``features_only`` wrapper runs its modules in sequence: each stage is a cell."""

    def __init__(self, spec: dict):
        super().__init__(spec)
        self._template = self._create_template()

    def _create_template(self) -> list[nn.Module]:
        import timm

        name = self._spec["timm_name"]
        if name not in timm.list_models():
            raise MamoError(f"unknown timm model '{name}' (model.backbone); pick a name from timm.list_models().")
        try:
            model = timm.create_model(name, pretrained=False, features_only=True, in_chans=self.input_shape[0])
        except Exception as exc:  # timm raises many types for models without features_only support
            raise MamoError(f"timm model '{name}' cannot give features_only stages ({exc}); pick another.") from exc
        if self._spec.get("weights"):
            self._load_weights(model, Path(self._spec["weights"]))
        from timm.models._features import FeatureListNet

        if not isinstance(model, FeatureListNet):
            raise MamoError(
                f"timm model '{name}' has no sequential stages ({type(model).__name__}); use a ResNet, ConvNeXt, "
                "RegNet or another model whose features_only wrapper is FeatureListNet."
            )
        cells, pending = [], []
        for layer_name, module in model.items():
            pending.append(module)
            if layer_name in model.return_layers:
                cells.append(nn.Sequential(*pending))
                pending = []
        return cells

    @staticmethod
    def _load_weights(model: nn.Module, path: Path) -> None:
        if not path.exists():
            raise MamoError(f"timm weights file {path} does not exist (model.weights); point it at a local file.")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=False)

    @property
    def num_cells(self) -> int:
        return len(self._template)

    def build_cell(self, index: int) -> nn.Module:
        import copy

        return copy.deepcopy(self._template[index])


SPACES: dict[str, type[SearchSpace]] = {"mlp": MLPSpace, "lenet": LeNetSpace, "timm": TimmSpace}


def space_from_spec(spec: dict) -> SearchSpace:
    return SPACES[spec["family"]](spec)


def create_space(config: ModelConfig, input_shape: tuple[int, ...]) -> SearchSpace:
    """The search space for ``model.backbone`` on inputs of ``input_shape`` (channels first)."""
    family, _, timm_name = config.backbone.partition(":")
    if family not in SPACES or (family == "timm") != bool(timm_name):
        raise MamoError(
            f"unknown backbone '{config.backbone}' (model.backbone); use mlp, lenet or timm:<model name>."
        )
    if config.activation not in ACTIVATIONS:
        raise MamoError(f"unknown activation '{config.activation}' (model.activation); use one of {list(ACTIVATIONS)}.")
    spec: dict = {"family": family, "input_shape": list(input_shape), "head_hidden": config.head_hidden}
    if family == "mlp":
        spec |= {"hidden": list(config.hidden), "activation": config.activation}
    elif family == "lenet":
        if len(input_shape) != 3:
            raise MamoError(f"backbone 'lenet' needs image inputs (C, H, W) but the data gives {input_shape}.")
        spec |= {"latent": config.latent}
    else:
        spec |= {"timm_name": timm_name, "weights": config.weights}
    return space_from_spec(spec)
