"""Search spaces: every backbone trains on every built-in dataset it fits; heads; channels; timm weights; errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

from mamo import digits
from mamo.config import DataConfig, ModelConfig, load_config
from mamo.data import MultiTaskData, load_data
from mamo.errors import MamoError
from mamo.graph import build_hps_graph
from mamo.model import MamoNet, compile_model
from mamo.spaces import SearchSpace, check_model_config, create_space
from mamo.tasks import TaskSpec, parse_tasks, task_loss

TINY = {"train_size": 4, "val_size": 2, "test_size": 2}
HAS_FASHION = (Path(digits.DEFAULT_FASHION_ROOT) / "t10k-labels-idx1-ubyte.gz").is_file()
FASHION = {"multifashion", "multi_fashion_mnist"}
TIMM = {"head_hidden": 8}

# (backbone, dataset, model settings): every pairing the issue asks for. logic and concave use their presets' nets.
FITS = [
    ("mlp", "logic", None),
    ("mlp", "concave", None),
    ("mlp", "multimnist", {"hidden": [16, 8]}),
    ("lenet", "multimnist", {}),
    ("lenet", "multimnist_recon", {}),
    ("lenet", "multifashion", {}),
    ("lenet", "multi_fashion_mnist", {}),
    ("timm:resnet18", "multimnist", TIMM),
    ("timm:regnetx_002", "multimnist_recon", TIMM),
    ("timm:mobilenetv3_small_050", "multimnist", TIMM),
]


@pytest.fixture(scope="module")
def datasets():
    cache: dict[str, MultiTaskData] = {}

    def get(name: str) -> MultiTaskData:
        if name in FASHION and not HAS_FASHION:
            pytest.skip(f"Fashion-MNIST is not installed in {digits.DEFAULT_FASHION_ROOT}")
        if name not in cache:
            cache[name] = load_data(load_config(name).data if name in ("logic", "concave") else
                                    DataConfig(name=name, **TINY))
        return cache[name]

    return get


def model_config(backbone: str, dataset: str, settings: dict | None) -> ModelConfig:
    if settings is None:
        return load_config(dataset).model
    return ModelConfig(backbone=backbone, **settings)


def first_batch(data: MultiTaskData, size: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    n = min(size, len(data.train))
    samples = [data.train[i] for i in range(n)]
    x = torch.stack([s[0] for s in samples])
    targets = {task: torch.stack([s[1][task] for s in samples]) for task in data.tasks}
    return x, targets


def network(space: SearchSpace, tasks) -> MamoNet:
    return compile_model(build_hps_graph(space, tasks), seed=0)


def parameters_without_gradient(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


# ------------------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize(("backbone", "dataset", "settings"), FITS, ids=[f"{b}-{d}" for b, d, _ in FITS])
def test_backbone_trains_on_dataset(datasets, backbone: str, dataset: str, settings: dict | None) -> None:
    data = datasets(dataset)
    space = create_space(model_config(backbone, dataset, settings), data.input_shape)
    model = network(space, data.tasks)
    x, targets = first_batch(data)
    outputs = model(x)
    assert set(outputs) == set(data.tasks)
    for task, spec in data.tasks.items():
        assert outputs[task].shape[0] == x.shape[0]
        assert outputs[task][0].numel() == spec.output_size
    loss = sum(task_loss(data.tasks[t], outputs[t], targets[t]) for t in data.tasks)
    assert torch.isfinite(loss)
    loss.backward()
    assert parameters_without_gradient(model) == []
    assert sum(p.numel() for p in model.parameters()) > 0


def test_mlp_flattens_images(datasets) -> None:
    data = datasets("multimnist")
    space = create_space(ModelConfig(backbone="mlp", hidden=[16, 8]), data.input_shape)
    assert space.cell_shapes() == [(16,), (8,)]
    assert space.build_cell(0)[1].in_features == 28 * 28


def test_logic_net_is_two_shared_neurons(datasets) -> None:
    data = datasets("logic")
    space = create_space(load_config("logic").model, data.input_shape)
    assert space.num_cells == 1
    assert sum(p.numel() for p in space.build_cell(0).parameters()) == 2 * 2 + 2


def test_lenet_is_sener_and_koltun_shape(datasets) -> None:
    space = create_space(ModelConfig(backbone="lenet"), datasets("multimnist").input_shape)
    assert space.cell_shapes() == [(10, 12, 12), (20, 4, 4), (50,)]


@pytest.mark.parametrize(("shape", "cells"), [
    ((1, 8, 8), [(16, 4, 4), (32, 2, 2), (8, 1, 1)]),  # scikit-learn's digits, where lenet does not fit
    ((3, 28, 28), [(16, 14, 14), (32, 7, 7), (8, 3, 3)]),
    ((2, 1, 5), [(16, 1, 5), (32, 1, 5), (8, 1, 5)]),  # a map below 2 × 2 is not pooled: any size fits
])
def test_the_cnn_pools_each_cell_by_two_while_it_can(shape: tuple, cells: list) -> None:
    space = create_space(ModelConfig(backbone="cnn", hidden=[16, 32, 8], activation="tanh"), shape)
    assert space.cell_shapes() == cells
    first = space.build_cell(0)
    assert first[0].in_channels == shape[0] and first[0].padding == (1, 1) and isinstance(first[1], torch.nn.Tanh)


def test_lenet_on_inputs_too_small_points_to_the_cnn() -> None:
    with pytest.raises(MamoError, match=r"^backbone 'lenet' fails at cell 1 on inputs of shape \[1, 8, 8\] .*; use "
                                        r"larger inputs or a backbone that downsamples less \(model.backbone=cnn"):
        create_space(ModelConfig(backbone="lenet"), (1, 8, 8)).cell_shapes()


# ----------------------------------------------------------------------------------------------------- heads

HEAD_TASKS = {
    "digit": {"type": "classification", "classes": 7},
    "pose": {"type": "regression", "dim": 3},
    "image": {"type": "reconstruction", "shape": [1, 28, 28]},
}


@pytest.mark.parametrize("backbone", ["mlp", "cnn", "lenet", "timm:test_efficientnet"])
@pytest.mark.parametrize("head_hidden", [0, 8])
def test_heads_per_task_type(backbone: str, head_hidden: int) -> None:
    space = create_space(ModelConfig(backbone=backbone, hidden=[16], head_hidden=head_hidden), (1, 28, 28))
    model = network(space, parse_tasks(HEAD_TASKS, "test"))
    out = model(torch.randn(2, 1, 28, 28) * 10)
    assert out["digit"].shape == (2, 7)
    assert out["pose"].shape == (2, 3)
    assert out["image"].shape == (2, 1, 28, 28)
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    # Each head is its own module, fed by the shared trunk.
    assert {f"head_{t}" for t in HEAD_TASKS} <= set(model.blocks)


def test_identity_head_passes_the_trunk_through_and_checks_width() -> None:
    tasks = parse_tasks({"f": {"type": "regression", "dim": 3, "head": "identity"}}, "test")
    model = network(create_space(ModelConfig(backbone="mlp", hidden=[3], activation="identity"), (1,)), tasks)
    x = torch.ones(1, 1)
    assert torch.equal(model(x)["f"], model.blocks["cell0"](x))
    with pytest.raises(MamoError, match="'f' asks for an identity head.*width 3"):
        network(create_space(ModelConfig(backbone="mlp", hidden=[4]), (1,)), tasks)


def test_identity_heads_on_map_tasks_shape_the_trunk_without_squashing_it() -> None:
    tasks = parse_tasks({"depth": {"type": "depth", "shape": [1, 4, 4], "head": "identity"},
                         "picture": {"type": "reconstruction", "shape": [1, 4, 4], "head": "identity"}}, "test")
    model = network(create_space(ModelConfig(backbone="mlp", hidden=[16], activation="identity"), (3,)), tasks)
    x = torch.randn(2, 3)
    trunk = model.blocks["cell0"](x)
    for task in tasks:  # the losses read maps; before, a flat (2, 16) prediction failed them
        assert torch.equal(model(x)[task], trunk.view(2, 1, 4, 4))  # no sigmoid, unlike the mlp head's


def test_unknown_head_is_named() -> None:
    tasks = parse_tasks({"f": {"type": "regression", "dim": 3, "head": "fancy"}}, "test")
    with pytest.raises(MamoError, match="unknown head 'fancy'"):
        network(create_space(ModelConfig(backbone="mlp", hidden=[3]), (1,)), tasks)


# --------------------------------------------------------------------------------------------- input channels


@pytest.mark.parametrize("backbone", ["cnn", "lenet", "timm:test_resnet", "timm:test_efficientnet"])
@pytest.mark.parametrize("channels", [1, 3])
def test_input_channels_follow_the_data(backbone: str, channels: int) -> None:
    space = create_space(ModelConfig(backbone=backbone, head_hidden=0), (channels, 32, 32))
    first_conv = next(m for m in space.build_cell(0).modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == channels
    tasks = parse_tasks({"c": {"type": "classification", "classes": 3}}, "test")
    assert network(space, tasks)(torch.zeros(2, channels, 32, 32))["c"].shape == (2, 3)


def test_input_channels_follow_a_plugin_dataset() -> None:
    # A three-channel dataset through the same path a plugin takes.
    from mamo.data import TensorTaskDataset

    dataset = TensorTaskDataset(torch.rand(4, 3, 28, 28), {"c": torch.tensor([0, 1, 2, 0])})
    tasks = parse_tasks({"c": {"type": "classification", "classes": 3}}, "test")
    space = create_space(ModelConfig(backbone="lenet"), tuple(dataset.x.shape[1:]))
    loss = task_loss(tasks["c"], network(space, tasks)(dataset.x)["c"], dataset.targets["c"])
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backbone", ["vgg", "timm", "timm:", "mlp:resnet18", "Lenet"])
def test_unknown_backbone_is_named(backbone: str) -> None:
    with pytest.raises(MamoError) as info:
        create_space(ModelConfig(backbone=backbone), (1, 28, 28))
    assert f"'{backbone}'" in str(info.value)
    assert "mlp, cnn, lenet or timm:<model name>" in str(info.value)


def test_unknown_timm_name_is_named() -> None:
    with pytest.raises(MamoError, match="unknown timm model 'resnet_does_not_exist'.*timm.list_models"):
        create_space(ModelConfig(backbone="timm:resnet_does_not_exist"), (1, 28, 28))


def test_timm_model_without_sequential_stages_is_refused() -> None:
    with pytest.raises(MamoError, match="'test_vit' has no sequential stages"):
        create_space(ModelConfig(backbone="timm:test_vit"), (1, 32, 32))


def test_input_too_small_for_the_backbone_is_explained() -> None:
    # ConvNeXt downsamples 32x: 28 px inputs end below its last downsampling kernel, 32 px inputs fit.
    with pytest.raises(MamoError, match="'timm:test_convnext' fails at cell .* on inputs of shape \\[1, 28, 28\\]"):
        create_space(ModelConfig(backbone="timm:test_convnext"), (1, 28, 28)).cell_shapes()
    assert create_space(ModelConfig(backbone="timm:test_convnext"), (1, 32, 32)).cell_shapes()[-1] == (64, 1, 1)
    with pytest.raises(MamoError, match="'lenet' fails at cell 1"):
        create_space(ModelConfig(backbone="lenet"), (1, 8, 8)).cell_shapes()


@pytest.mark.skipif("test_coatnet" not in timm.list_models("test_coatnet"),
                    reason=f"timm {timm.__version__} has no test_coatnet (1.0.29 lacks it, 1.0.31 has it)")
def test_a_fixed_size_timm_model_is_built_for_the_datas_size() -> None:
    # Before: built at its own 160 px (timm's default), it failed at any other size and mamo said "use larger
    # inputs", which could not help. Built with img_size = the data's, and rebuilt from its spec the same way.
    space = create_space(ModelConfig(backbone="timm:test_coatnet"), (1, 64, 64))
    assert space.cell_shapes()[-1] == (128, 2, 2)
    model = network(space, parse_tasks({"c": {"type": "classification", "classes": 3}}, "test")).eval()
    rebuilt = compile_model(model.graph, seed=1).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(rebuilt(x)["c"], model(x)["c"])
    with pytest.raises(MamoError, match=r"'timm:test_maxvit' fails at cell 1 on inputs of shape \[1, 28, 28\] "
                                        r"\(integer modulo by zero\); timm model 'test_maxvit' is made for 160×160 "
                                        r"inputs and built here for the data's size, which its patches and windows "
                                        r"must divide; use inputs of its own size"):
        create_space(ModelConfig(backbone="timm:test_maxvit"), (1, 28, 28)).cell_shapes()


class _OddCells(SearchSpace):
    """Cells that fail the dry run the ways some timm models do."""

    def __init__(self, fault: str):
        super().__init__({"family": "odd", "input_shape": [1, 4, 4]})
        self.fault = fault

    @property
    def num_cells(self) -> int:
        return 2

    def build_cell(self, index: int) -> torch.nn.Module:
        fault = self.fault

        class Cell(torch.nn.Module):
            def forward(self, x: torch.Tensor):
                if fault == "empty assert":  # timm's halo attention: _assert(H % block == 0, '')
                    raise AssertionError("")
                return [x, x]  # selecsls: (features, skip) between stages

        return Cell()


def test_a_dry_run_fault_without_a_message_is_still_one_sentence() -> None:
    # Before: an IndexError from the empty message's first line, with a traceback.
    with pytest.raises(MamoError, match=r"^backbone 'odd' fails at cell 0 on inputs of shape \[1, 4, 4\] "
                                        r"\(AssertionError\); use larger inputs"):
        _OddCells("empty assert").cell_shapes()


def test_cells_that_pass_lists_between_them_are_refused() -> None:
    # Before: an AttributeError ('list' object has no attribute 'shape').
    with pytest.raises(MamoError, match=r"^backbone 'odd' passes a list from cell 0 to the next, not one feature "
                                        r"map, which a cell's output must be; pick another backbone\.$"):
        _OddCells("list").cell_shapes()


@pytest.mark.parametrize(("settings", "setting", "said"), [
    ({"backbone": "mlp", "hidden": [4, 10**17]}, "model.hidden", "can't allocate memory"),
    ({"backbone": "lenet", "latent": 10**15}, "model.latent", "can't allocate memory"),
    ({"backbone": "mlp", "hidden": [10**18]}, "model.hidden", "Storage size calculation overflowed"),
])
def test_a_model_too_large_to_allocate_asks_for_a_smaller_model(settings: dict, setting: str, said: str) -> None:
    # Over 1e18 bytes: more than any machine can map, so the allocator refuses at once. This was blamed on the
    # input size ("use larger inputs or a backbone that downsamples less").
    with pytest.raises(MamoError, match=f"needs more memory than this machine can give at cell .*{said}"
                                        f".*; use a smaller model: lower (the widths in )?{setting}\\.$") as info:
        create_space(ModelConfig(**settings), (1, 28, 28)).cell_shapes()
    assert "larger inputs" not in str(info.value)


def test_a_head_too_large_to_allocate_asks_for_a_smaller_head_hidden() -> None:
    # Crashed with the allocator's RuntimeError (no folder was left: the network is built before it).
    space = create_space(ModelConfig(backbone="mlp", hidden=[8], head_hidden=10**17), (4,))
    with pytest.raises(MamoError, match=r"^the head of task 'a' needs more memory than this machine can give \(.*"
                                        r"can't allocate memory.*\); use a smaller model.head_hidden than "
                                        r"100000000000000000\.$"):
        space.build_head(TaskSpec("a", "classification", classes=3), (8,))


@pytest.mark.parametrize("error", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")])
def test_other_allocation_failures_ask_for_a_smaller_model(error: BaseException,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    space = create_space(ModelConfig(backbone="timm:test_resnet"), (1, 32, 32))

    def fail(index: int) -> torch.nn.Module:
        raise error

    monkeypatch.setattr(space, "build_cell", fail)
    with pytest.raises(MamoError, match="needs more memory .*; use a smaller model: pick a smaller timm model"):
        space.cell_shapes()


@pytest.mark.parametrize("backbone", ["cnn", "lenet", "timm:resnet18"])
def test_image_backbones_refuse_vector_inputs(backbone: str) -> None:
    with pytest.raises(MamoError, match=f"'{backbone}' needs image inputs.*model.backbone=mlp"):
        create_space(ModelConfig(backbone=backbone), (4,))


@pytest.mark.parametrize(
    ("settings", "key"),
    [({"hidden": []}, "model.hidden"), ({"hidden": [4, 0]}, "model.hidden"), ({"activation": "gelu2"}, "activation"),
     ({"head_hidden": -1}, "model.head_hidden")],
)
def test_bad_mlp_settings_are_named(settings: dict, key: str) -> None:
    with pytest.raises(MamoError, match=key):
        create_space(ModelConfig(backbone="mlp", **settings), (4,))


@pytest.mark.parametrize(
    "name", ["test_resnet", "regnetx_002", "test_efficientnet", "mobilenetv3_small_050", "test_mambaout"]
)
def test_timm_cells_reproduce_the_features_model(tmp_path: Path, name: str) -> None:
    # The cells run in sequence give exactly timm's features_only outputs, channels first (MambaOut is channels-last
    # inside). The weights go through a file so that both sides hold the same values.
    source = timm.create_model(name, pretrained=False, features_only=True, in_chans=1).eval()
    torch.save(source.state_dict(), tmp_path / "w.pt")
    space = create_space(ModelConfig(backbone=f"timm:{name}", weights=str(tmp_path / "w.pt")), (1, 32, 32))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = source(x)
        if name == "test_mambaout":
            expected = [feature.permute(0, 3, 1, 2) for feature in expected]
        assert len(expected) == space.num_cells
        for index, feature in enumerate(expected):
            x = space.build_cell(index).eval()(x)
            assert torch.allclose(x, feature, atol=1e-5), f"cell {index}"


# ----------------------------------------------------------------------------------------------- timm weights


def test_timm_weights_load_from_a_local_torch_file(tmp_path: Path) -> None:
    # A full ImageNet-style model: 3 input channels and a classifier the features model does not have.
    source = timm.create_model("resnet18", pretrained=False, num_classes=5)
    torch.nn.init.normal_(source.conv1.weight)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    config = ModelConfig(backbone="timm:resnet18", weights=str(path))
    space = create_space(config, (1, 28, 28))
    # The first convolution is adapted to one channel by summing its RGB filters; everything else is copied.
    assert torch.allclose(space.build_cell(0)[0].weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(space.build_cell(4)[0][1].conv2.weight, source.layer4[1].conv2.weight)
    # The compiled network's trunk starts from those weights.
    model = network(space, parse_tasks({"c": {"type": "classification", "classes": 3}}, "test"))
    assert torch.equal(model.blocks["cell4"][0][1].conv2.weight, source.layer4[1].conv2.weight)
    fresh = create_space(ModelConfig(backbone="timm:resnet18"), (1, 28, 28))
    assert not torch.equal(fresh.build_cell(4)[0][1].conv2.weight, source.layer4[1].conv2.weight)


def test_timm_weights_load_from_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = timm.create_model("regnetx_002", pretrained=False, features_only=True, in_chans=1)
    path = tmp_path / "regnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    space = create_space(ModelConfig(backbone="timm:regnetx_002", weights=str(path)), (1, 28, 28))
    loaded = [p for k in range(space.num_cells) for p in space.build_cell(k).parameters()]
    assert len(loaded) == len(list(source.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(loaded, source.parameters(), strict=True))


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pt"
    with pytest.raises(MamoError, match=f"timm weights file {path} does not exist.*model.weights"):
        create_space(ModelConfig(backbone="timm:resnet18", weights=str(path)), (1, 28, 28))
    # A folder was said not to exist.
    with pytest.raises(MamoError, match=f"timm weights file {tmp_path} is a folder \\(model.weights\\); point it at"):
        create_space(ModelConfig(backbone="timm:resnet18", weights=str(tmp_path)), (1, 28, 28))


@pytest.mark.parametrize(("model", "message"), [
    # Each was accepted and dropped without a word by the backbone that ran.
    (ModelConfig(backbone="lenet", weights="/nowhere.pt"), "model.weights is read by timm backbones only, and "
     "backbone 'lenet' would ignore it; remove model.weights or pick a timm:<name> backbone."),
    (ModelConfig(backbone="lenet", hidden=[]),
     "model.hidden is []; give at least one positive width (the mlp's layer widths, the cnn's channels)"),
    (ModelConfig(backbone="lenet", hidden=[-1]), "model.hidden is [-1]; give at least one positive width"),
    (ModelConfig(backbone="mlp", latent=-5), "model.latent is -5; give the lenet a positive latent width"),
])
def test_settings_of_another_backbone_are_checked_too(model: ModelConfig, message: str) -> None:
    with pytest.raises(MamoError, match=re.escape(message)):
        check_model_config(model)


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(timm.create_model("regnetx_002", pretrained=False).state_dict(), path)
    with pytest.raises(MamoError, match="does not fit timm model 'resnet18'.*missing"):
        create_space(ModelConfig(backbone="timm:resnet18", weights=str(path)), (1, 28, 28))


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_unreadable_weights_file_is_refused(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    with pytest.raises(MamoError, match=f"timm weights file {path}"):
        create_space(ModelConfig(backbone="timm:resnet18", weights=str(path)), (1, 28, 28))


def test_a_weights_file_with_a_list_where_the_model_needs_a_tensor_is_refused(tmp_path: Path) -> None:
    # Before: weights_only loads lists, and the first-convolution check read .ndim from it (an AttributeError).
    state = {**timm.create_model("regnetx_002", pretrained=False, features_only=True).state_dict(), "epoch": 3}
    key = next(iter(state))
    state[key] = state[key].tolist()
    path = tmp_path / "listed.pt"
    torch.save(state, path)
    with pytest.raises(MamoError, match=rf"^timm weights file {path} holds a list under '{re.escape(key)}', where "
                                        r"timm model 'regnetx_002' needs a tensor; save the model's state_dict\(\)\.$"):
        create_space(ModelConfig(backbone="timm:regnetx_002", weights=str(path)), (1, 28, 28))
    state[key] = torch.tensor(state[key])  # the epoch count beside the weights is no tensor and is not read
    torch.save(state, path)
    create_space(ModelConfig(backbone="timm:regnetx_002", weights=str(path)), (1, 28, 28))


def test_weights_saved_from_the_whole_model_load_into_flattened_stages(tmp_path: Path) -> None:
    # Before: the features wrapper names ConvNeXt's stages stages_0.., the whole model stages.0..; ImageNet weights
    # (saved from the whole model) were refused as "missing" for ConvNeXt, DenseNet, Swin, FastViT, CoAtNet.
    torch.manual_seed(0)
    source = timm.create_model("test_convnext", pretrained=False).eval()
    for parameter in source.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    path = tmp_path / "convnext.pt"
    torch.save(source.state_dict(), path)
    space = create_space(ModelConfig(backbone="timm:test_convnext", weights=str(path)), (1, 32, 32))
    x = torch.rand(2, 1, 32, 32)
    out = x
    for index in range(space.num_cells):
        out = space.build_cell(index).eval()(out)
    # One channel: the stem's RGB filters summed (stem_0 here, stem.0 in the file), as if the gray image were RGB.
    with torch.no_grad():
        expected = source.forward_features(x.repeat(1, 3, 1, 1))
    assert torch.allclose(out, expected, atol=1e-5)
