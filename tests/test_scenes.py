"""NYUv2 and Cityscapes in MTAN's .npy layout, read from small files written here in that exact layout, and the
dense-prediction tasks they bring: masked losses, split-level metrics, the dense head, a search end to end."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from step_cases import needs_cuda

from mamo import dense
from mamo.config import DataConfig, DirectionConfig, ModelConfig, load_config
from mamo.data import iterate_batches, load_data
from mamo.errors import MamoError
from mamo.graph import build_hps_graph
from mamo.model import compile_model
from mamo.scoring import MetricAccumulator
from mamo.session import make_trainer, open_session
from mamo.spaces import create_space
from mamo.tasks import parse_tasks, task_loss

H, W = 32, 48


def write_split(folder: Path, count: int, rng: np.random.Generator, targets: dict[str, str]) -> None:
    """``count`` samples in MTAN's layout (float64 here; the loader converts any float dtype)."""
    for sub in ("image", *targets):
        (folder / sub).mkdir(parents=True)
    for n in range(count):
        np.save(folder / "image" / f"{n}.npy", rng.random((H, W, 3)))
        missing = rng.random((H, W)) < 0.2
        for sub, kind in targets.items():
            if kind == "segmentation":
                classes = 7 if sub == "label_7" else 19 if sub == "label_19" else 13
                label = rng.integers(0, classes, (H, W)).astype(np.float64)
                label[missing] = -1.0
                np.save(folder / sub / f"{n}.npy", label)
            elif kind == "depth":
                depth = rng.uniform(0.5, 5.0, (H, W, 1))
                depth[missing] = 0.0
                np.save(folder / sub / f"{n}.npy", depth)
            else:
                normal = rng.normal(size=(H, W, 3))
                normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
                normal[missing] = 0.0
                np.save(folder / sub / f"{n}.npy", normal)


NYU = {"label": "segmentation", "depth": "depth", "normal": "normal"}


@pytest.fixture(scope="module")
def nyuv2_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nyuv2")
    rng = np.random.default_rng(0)
    write_split(root / "train", 20, rng, NYU)
    write_split(root / "val", 6, rng, NYU)
    return root


# ------------------------------------------------------------------------------------------------------ loading


def test_nyuv2_loads_three_dense_tasks_from_mtan_files(nyuv2_root):
    data = load_data(DataConfig(name="nyuv2", root=str(nyuv2_root)))
    assert (len(data.train), len(data.val), len(data.test)) == (18, 2, 6)  # a tenth of train held out
    assert data.input_shape == (3, H, W)
    assert {name: spec.to_dict() for name, spec in data.tasks.items()} == {
        "segmentation": {"type": "segmentation", "classes": 13, "shape": [H, W]},
        "depth": {"type": "depth", "shape": [1, H, W]},
        "normal": {"type": "normal", "shape": [3, H, W]},
    }
    x, targets = data.test[0]
    assert x.dtype == torch.float32 and x.shape == (3, H, W)
    label = np.load(nyuv2_root / "val" / "label" / "0.npy")
    assert targets["segmentation"].dtype == torch.long
    assert torch.equal(targets["segmentation"], torch.from_numpy(label).long())  # -1 kept: unlabelled
    depth = np.load(nyuv2_root / "val" / "depth" / "0.npy")
    torch.testing.assert_close(targets["depth"], torch.from_numpy(np.moveaxis(depth, -1, 0)).float())
    assert targets["normal"].shape == (3, H, W)


def test_validation_is_a_seeded_hold_out_of_the_train_folder(nyuv2_root):
    def numbers(seed, **sizes):
        data = load_data(DataConfig(name="nyuv2", root=str(nyuv2_root), seed=seed, **sizes))
        return data.train.indices, data.val.indices, data.test.indices

    train, val, test = numbers(0, val_size=5, train_size=10, test_size=3)
    assert len(val) == 5 and len(train) == 10 and test == [0, 1, 2]
    assert not set(train) & set(val)
    assert numbers(0, val_size=5, train_size=10, test_size=3) == (train, val, test)
    assert numbers(1, val_size=5)[1] != val


@pytest.mark.parametrize("seed", [-1, 2**32, 2**63 - 1])
def test_a_seed_wider_than_the_split_generator_is_refused(nyuv2_root, seed):
    # torch's CPU generator keeps the low 32 bits: 2**32 would draw seed 0's split, -1 that of 2**32 - 1.
    with pytest.raises(MamoError, match=rf"^dataset 'nyuv2' draws its validation split with a 32-bit seed, but "
                                        rf"data.seed is {seed}; set data.seed to an integer in \[0, 2\*\*32\)"):
        load_data(DataConfig(name="nyuv2", root=str(nyuv2_root), seed=seed))


def test_batches_stack_dense_targets(nyuv2_root):
    data = load_data(DataConfig(name="nyuv2", root=str(nyuv2_root)))
    x, targets = next(iterate_batches(data.train, 4, shuffle=False, generator=None))
    assert x.shape == (4, 3, H, W)
    assert targets["segmentation"].shape == (4, H, W) and targets["depth"].shape == (4, 1, H, W)


def test_cityscapes_reads_the_label_folder_of_its_class_count(tmp_path):
    rng = np.random.default_rng(1)
    for split, count in (("train", 6), ("val", 2)):
        write_split(tmp_path / split, count, rng, {"label_19": "segmentation", "depth": "depth"})
    data = load_data(DataConfig(name="cityscapes", root=str(tmp_path), options={"classes": 19}))
    assert set(data.tasks) == {"segmentation", "depth"} and data.tasks["segmentation"].classes == 19
    with pytest.raises(MamoError, match="label_7"):  # the default 7 classes: that folder is missing
        load_data(DataConfig(name="cityscapes", root=str(tmp_path)))
    with pytest.raises(MamoError, match="7 or 19"):
        load_data(DataConfig(name="cityscapes", root=str(tmp_path), options={"classes": 8}))
    # Before: 19.0 passed the check and then looked for a label_19.0 folder.
    data = load_data(DataConfig(name="cityscapes", root=str(tmp_path), options={"classes": 19.0}))
    assert data.tasks["segmentation"].classes == 19
    with pytest.raises(MamoError, match=r"^data.options.classes is True for cityscapes"):
        load_data(DataConfig(name="cityscapes", root=str(tmp_path), options={"classes": True}))


@pytest.mark.parametrize("root, message", [
    (None, "set data.root"),
    ("missing", "point data.root at the folder that holds train/ and val/"),
])
def test_a_missing_root_names_the_setting_to_fix(tmp_path, root, message):
    with pytest.raises(MamoError, match=message):
        load_data(DataConfig(name="nyuv2", root=None if root is None else str(tmp_path / root)))


def test_a_missing_target_file_is_named(tmp_path):
    rng = np.random.default_rng(2)
    write_split(tmp_path / "train", 4, rng, NYU)
    write_split(tmp_path / "val", 3, rng, NYU)
    (tmp_path / "val" / "normal" / "1.npy").unlink()  # in the middle: found before training starts
    with pytest.raises(MamoError, match=r"normal/1\.npy"):
        load_data(DataConfig(name="nyuv2", root=str(tmp_path)))


def _every(root: Path, sub: str, change) -> None:
    """Rewrite every file of ``sub`` in both splits with ``change`` applied."""
    for path in (root / "train" / sub).glob("*.npy"):
        np.save(path, change(np.load(path)))
    for path in (root / "val" / sub).glob("*.npy"):
        np.save(path, change(np.load(path)))


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(("damage", "message"), [
    # Not the first sample of a split: those alone used to be read before training.
    (lambda root: _cut(root / "val" / "normal" / "2.npy"),
     r"val/normal/2\.npy is not a readable \.npy file \(.*\); replace it with the original file\."),
    (lambda root: np.save(root / "train" / "depth" / "3.npy", np.ones((H // 2, W, 1))),
     rf"train/depth/3\.npy has shape \({H // 2}, {W}, 1\) where the first training sample's depth/ file has "
     rf"\({H}, {W}, 1\); give every depth/ file that shape"),
    (lambda root: np.save(root / "val" / "image" / "1.npy", np.ones((H, W))),
     r"val/image/1\.npy has shape"),
    (lambda root: np.save(root / "train" / "label" / "0.npy", np.full((H, W), 255.0)),
     r"train/label/0\.npy has labels from 255 to 255, outside \[-1, 13\) for 13 classes; map unlabelled pixels"),
    # Accepted before and trained on inputs 255 times the scale of MTAN's.
    (lambda root: np.save(root / "val" / "image" / "2.npy", np.zeros((H, W, 3), dtype=np.uint8)),
     r"val/image/2\.npy holds uint8 values where MTAN's layout has float RGB in \[0, 1\]; save the images as"),
    # All four trained silently, exit 0: a (3, H, W) image as 48 channels of 3 × 32 pixels, ...
    (lambda root: _every(root, "image", lambda a: a.transpose(2, 0, 1)),
     rf"train/image/\d+\.npy has shape \(3, {H}, {W}\) where MTAN's layout has \(H, W, 3\) float RGB; save each "
     r"image channels last"),
    (lambda root: _every(root, "depth", lambda a: a[..., 0]),
     rf"train/depth/\d+\.npy has shape \({H}, {W}\) where MTAN's layout has \({H}, {W}, 1\) beside a {H} × {W} "
     r"image; save every depth/ file in that shape\."),
    (lambda root: _every(root, "label", lambda a: a[..., None]),
     rf"train/label/\d+\.npy has shape \({H}, {W}, 1\) where MTAN's layout has \({H}, {W}\)"),
    (lambda root: _every(root, "image", lambda a: a[..., 0]),
     rf"train/image/\d+\.npy has shape \({H}, {W}\) where MTAN's layout has \(H, W, 3\)"),
    (lambda root: (root / "train" / "image" / "3.npy").rename(root / "train" / "image" / "03.npy"),
     r"train/image/03\.npy is numbered with a leading zero; MTAN's files are named 0\.npy, 1\.npy, \.\.\., so "
     r"rename it to 3\.npy"),
], ids=["cut file", "depth shape", "image shape", "first label", "integer image", "channels first",
        "depth without its axis", "label with an axis", "grey image", "leading zero"])
def test_a_bad_file_is_named_before_training(tmp_path, damage, message):
    rng = np.random.default_rng(3)
    write_split(tmp_path / "train", 5, rng, NYU)
    write_split(tmp_path / "val", 3, rng, NYU)
    damage(tmp_path)
    with pytest.raises(MamoError, match=message):
        load_data(DataConfig(name="nyuv2", root=str(tmp_path), val_size=1, seed=0))


def test_a_later_out_of_range_label_is_named_when_read(tmp_path):
    rng = np.random.default_rng(4)
    write_split(tmp_path / "train", 4, rng, NYU)
    write_split(tmp_path / "val", 3, rng, NYU)
    label = np.load(tmp_path / "val" / "label" / "2.npy")
    label[0, :5] = 255.0  # "void" in some label sets; MTAN's files use -1
    np.save(tmp_path / "val" / "label" / "2.npy", label)
    data = load_data(DataConfig(name="nyuv2", root=str(tmp_path)))  # label values are read lazily
    with pytest.raises(MamoError, match=r"val/label/2\.npy has labels from -1 to 255, outside \[-1, 13\)"):
        list(iterate_batches(data.test, 2, shuffle=False, generator=None))


def _set(path: Path, change) -> None:
    array = np.load(path)
    change(array)
    np.save(path, array)


@pytest.mark.parametrize(("damage", "message"), [
    # Each went through: NaN made every test metric NaN (exit 0), 0..255 floats trained on 255 times MTAN's input
    # scale, and fractional labels were truncated to classes.
    (lambda p: _set(p / "depth" / "2.npy", lambda a: a.__setitem__((0, 0, 0), np.nan)),
     r"val/depth/2\.npy holds NaN or infinite values; replace it with the original file"),
    (lambda p: _set(p / "image" / "1.npy", lambda a: a.__setitem__((3, 4, 0), np.inf)),
     r"val/image/1\.npy holds NaN or infinite values"),
    (lambda p: _set(p / "label" / "2.npy", lambda a: a.__setitem__((0, 0), np.nan)),
     r"val/label/2\.npy holds NaN or infinite values"),
    (lambda p: _set(p / "image" / "2.npy", lambda a: a.__imul__(255.0)),
     r"val/image/2\.npy holds values up to 2\d\d(\.\d+)? where MTAN's layout has float RGB in \[0, 1\]; divide the "
     r"images by 255\."),
    (lambda p: _set(p / "label" / "1.npy", lambda a: a.__iadd__(0.5 * (a >= 0))),
     r"val/label/1\.npy has fractional labels; labels are class indices, so resize label maps with "
     r"nearest-neighbour interpolation\."),
], ids=["NaN depth", "infinite pixel", "NaN label", "0..255 image", "fractional labels"])
def test_bad_values_in_a_later_file_are_named_when_read(tmp_path, damage, message):
    rng = np.random.default_rng(6)
    write_split(tmp_path / "train", 4, rng, NYU)
    write_split(tmp_path / "val", 3, rng, NYU)
    damage(tmp_path / "val")
    data = load_data(DataConfig(name="nyuv2", root=str(tmp_path)))  # values are checked as each file is read
    with pytest.raises(MamoError, match=message):
        list(iterate_batches(data.test, 2, shuffle=False, generator=None))


@pytest.mark.parametrize(("task", "marker"), [("segmentation", -1.0), ("depth", 0.0), ("normal", 0.0)])
def test_a_split_without_one_valid_pixel_has_no_metrics(tmp_path, task, marker):
    # All-missing depth scored abs_err 0 and rel_err 0, a perfect model; normals a mean angle of 0.
    rng = np.random.default_rng(7)
    write_split(tmp_path / "train", 4, rng, NYU)
    write_split(tmp_path / "val", 2, rng, NYU)
    sub = {"segmentation": "label"}.get(task, task)
    for path in (tmp_path / "val" / sub).glob("*.npy"):
        np.save(path, np.full_like(np.load(path), marker))
    data = load_data(DataConfig(name="nyuv2", root=str(tmp_path)))
    accumulator = MetricAccumulator(data.tasks)
    for x, targets in iterate_batches(data.test, 2, shuffle=False, generator=None):
        accumulator.update({name: torch.ones((len(x), *spec.shape)) if spec.type != "segmentation" else
                            torch.ones((len(x), spec.classes, *spec.shape)) for name, spec in data.tasks.items()},
                           targets)
    with pytest.raises(MamoError, match=rf"no pixel of the evaluated split has a {task} target .*, so its {task} "
                                        rf"metrics are undefined; check that split's {task} files\."):
        accumulator.compute()
    trainer = make_trainer(open_session(load_config("quick", ["train.device=cpu"]), None, False, True),
                           compile_model(build_hps_graph(create_space(ModelConfig(backbone="timm:test_resnet"),
                                                                      data.input_shape), data.tasks)),
                           DirectionConfig(), [], "train")
    with pytest.raises(MamoError, match=rf"no pixel of the 'test' split has a {task} target"):  # names the split
        trainer.evaluate(data.test, "test")


# ------------------------------------------------------------------------------------------------------- losses


def test_losses_ignore_unlabelled_and_missing_pixels():
    torch.manual_seed(0)
    logits, label = torch.randn(2, 5, 4, 4), torch.randint(0, 5, (2, 4, 4))
    label[:, 0] = dense.IGNORE
    changed = logits.clone()
    changed[:, :, 0] += 10.0  # only where the label is -1
    assert torch.equal(dense.segmentation_loss(logits, label), dense.segmentation_loss(changed, label))
    torch.testing.assert_close(dense.segmentation_loss(logits, label),
                               torch.nn.functional.cross_entropy(logits, label, ignore_index=dense.IGNORE))
    assert dense.segmentation_loss(logits, torch.full_like(label, dense.IGNORE)).item() == 0.0  # not NaN

    depth, target = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4) + 0.5
    target[:, :, :2] = 0.0
    valid = target != 0
    torch.testing.assert_close(dense.depth_loss(depth, target), (depth - target).abs()[valid].mean())

    normal = torch.nn.functional.normalize(torch.randn(2, 3, 4, 4), dim=1)
    pred = torch.randn(2, 3, 4, 4, requires_grad=True)
    normal[:, :, 3] = 0.0
    mask = normal.abs().sum(dim=1) > 0
    cosine = (torch.nn.functional.normalize(pred, dim=1) * normal).sum(dim=1)[mask]
    loss = dense.normal_loss(pred, normal)
    torch.testing.assert_close(loss, 1.0 - cosine.mean())
    loss.backward()
    assert torch.isfinite(pred.grad).all()


# ------------------------------------------------------------------------------------------------------ metrics


def test_segmentation_metrics_from_the_confusion_matrix_over_the_split():
    specs = parse_tasks({"seg": {"type": "segmentation", "classes": 3, "shape": [1, 4]}}, "test")
    label = torch.tensor([[[0, 0, 1, -1]], [[2, 2, 2, 1]]])
    guess = torch.tensor([[[0, 1, 1, 2]], [[2, 2, 0, 1]]])
    logits = torch.nn.functional.one_hot(guess, 3).permute(0, 3, 1, 2).float()
    whole, halves = MetricAccumulator(specs), MetricAccumulator(specs)
    whole.update({"seg": logits}, {"seg": label})
    for k in range(2):  # the same pixels in two batches: the same numbers (no per-batch averaging)
        halves.update({"seg": logits[k : k + 1]}, {"seg": label[k : k + 1]})
    confusion = np.zeros((3, 3))  # the reference: labelled pixels only
    for true, pred in zip(label.flatten().tolist(), guess.flatten().tolist(), strict=True):
        if true >= 0:
            confusion[true, pred] += 1
    ious = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    expected = {"miou": ious.mean(), "pixel_accuracy": np.trace(confusion) / confusion.sum()}
    for result in (whole.compute()["seg"], halves.compute()["seg"]):
        assert result["miou"] == pytest.approx(expected["miou"])
        assert result["pixel_accuracy"] == pytest.approx(5 / 7)


def test_depth_and_normal_metrics_on_known_errors():
    specs = parse_tasks({"d": {"type": "depth", "shape": [1, 1, 4]}, "n": {"type": "normal", "shape": [3, 1, 4]}},
                        "test")
    depth_target = torch.tensor([[[[1.0, 2.0, 4.0, 0.0]]]])
    depth_pred = torch.tensor([[[[1.5, 2.0, 3.0, 9.0]]]])  # the last pixel has no depth: ignored
    degrees = [0.0, 10.0, 20.0, 45.0]
    radians = torch.deg2rad(torch.tensor(degrees))
    normal_target = torch.tensor([[0.0, 0.0, 1.0]]).repeat(4, 1).T.reshape(1, 3, 1, 4)
    normal_pred = torch.stack([torch.sin(radians), torch.zeros(4), torch.cos(radians)]).reshape(1, 3, 1, 4) * 2.0
    accumulator = MetricAccumulator(specs)
    accumulator.update({"d": depth_pred, "n": normal_pred}, {"d": depth_target, "n": normal_target})
    metrics = accumulator.compute()
    assert metrics["d"]["abs_err"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert metrics["d"]["rel_err"] == pytest.approx((0.5 / 1 + 0.0 + 1.0 / 4) / 3)
    n = metrics["n"]
    assert n["mean_angle"] == pytest.approx(np.mean(degrees), abs=1e-3)
    assert n["median_angle"] == pytest.approx(15.0, abs=dense.ANGLE_BIN)  # between 10 and 20
    assert n["within_11_25"] == pytest.approx(0.5) and n["within_22_5"] == pytest.approx(0.75)
    assert n["within_30"] == pytest.approx(0.75)


@pytest.mark.parametrize("kind", ["segmentation", "depth", "normal"])
def test_a_splits_dense_loss_is_the_mean_over_its_valid_pixels_whatever_the_batches(kind):
    shape = {"segmentation": [4, 5], "depth": [1, 4, 5], "normal": [3, 4, 5]}[kind]
    specs = parse_tasks({"t": {"type": kind, "classes": 3, "shape": shape}}, "test")
    generator = torch.Generator().manual_seed(0)
    channels = 3 if kind != "depth" else 1
    pred = torch.randn(6, channels, 4, 5, generator=generator)
    if kind == "segmentation":
        target = torch.randint(0, 3, (6, 4, 5), generator=generator)
        target[:2] = dense.IGNORE  # two samples without a labelled pixel, one with a single one
        target[2] = dense.IGNORE
        target[2, 0, 0] = 1
    else:
        target = torch.rand(6, channels, 4, 5, generator=generator) + 0.5
        target[:2] = 0.0  # as above: no valid pixel, then one
        target[2] = 0.0
        target[2, :, 0, 0] = 1.0
    whole = task_loss(specs["t"], pred, target)  # one batch: the mean over every valid pixel
    for sizes in ([6], [2, 4], [3, 3], [1, 1, 1, 1, 1, 1]):
        accumulator, start = MetricAccumulator(specs), 0
        for size in sizes:
            accumulator.update({"t": pred[start : start + size]}, {"t": target[start : start + size]})
            start += size
        assert accumulator.compute()["t"]["loss"] == pytest.approx(float(whole), rel=1e-6), sizes


def test_dense_task_specs_need_their_shapes():
    with pytest.raises(MamoError, match=r"needs positive shape \[3, H, W\]"):
        parse_tasks({"n": {"type": "normal", "shape": [1, 4, 4]}}, "a plugin")
    with pytest.raises(MamoError, match="needs positive classes and shape"):
        parse_tasks({"s": {"type": "segmentation", "shape": [4, 4]}}, "a plugin")


# ------------------------------------------------------------------------------------------------ model and run


def test_dense_heads_predict_full_resolution_maps_and_need_feature_maps(nyuv2_root):
    data = load_data(DataConfig(name="nyuv2", root=str(nyuv2_root)))
    space = create_space(ModelConfig(backbone="timm:test_resnet", head_hidden=8), data.input_shape)
    model = compile_model(build_hps_graph(space, data.tasks))
    x, targets = next(iterate_batches(data.train, 2, shuffle=False, generator=None))
    outputs = model(x)
    assert outputs["segmentation"].shape == (2, 13, H, W)
    assert outputs["depth"].shape == (2, 1, H, W) and outputs["normal"].shape == (2, 3, H, W)
    losses = [task_loss(data.tasks[t], outputs[t], targets[t]) for t in data.tasks]
    assert all(math.isfinite(loss.item()) for loss in losses)
    with pytest.raises(MamoError, match="needs a backbone whose last cell gives a feature map"):
        compile_model(build_hps_graph(create_space(ModelConfig(backbone="lenet"), data.input_shape), data.tasks))


def test_mlp_heads_on_dense_tasks_predict_maps(nyuv2_root):
    # An mlp head's flat output is reshaped to the map each dense loss and metric reads.
    data = load_data(DataConfig(name="nyuv2", root=str(nyuv2_root)))
    tasks = parse_tasks({name: {**spec.to_dict(), "head": "mlp"} for name, spec in data.tasks.items()}, "test")
    space = create_space(ModelConfig(backbone="timm:test_resnet", head_hidden=4), data.input_shape)
    model = compile_model(build_hps_graph(space, tasks))
    x, targets = next(iterate_batches(data.train, 2, shuffle=False, generator=None))
    outputs = model(x)
    assert outputs["segmentation"].shape == (2, 13, H, W)
    assert outputs["depth"].shape == (2, 1, H, W) and outputs["normal"].shape == (2, 3, H, W)
    sum(task_loss(tasks[t], outputs[t], targets[t]) for t in tasks).backward()
    accumulator = MetricAccumulator(tasks)
    accumulator.update(outputs, targets)
    assert all(math.isfinite(value) for metrics in accumulator.compute().values() for value in metrics.values())


def test_a_search_on_nyuv2_files_reports_dense_metrics(nyuv2_root, tmp_path):
    from mamo.search import run_search

    overrides = [f"data.root={nyuv2_root}", "model.backbone=timm:test_resnet", "model.head_hidden=8",
                 "train.batch_size=6", "train.epochs=1", "train.device=cpu", "search.pretrain_epochs=1",
                 "search.round_epochs=1", "search.final_epochs=1", "search.rounds=1"]
    metrics = run_search(load_config("nyuv2", overrides), tmp_path / "run", progress=False, quiet=True,
                         loggers=False)
    assert set(metrics["tasks"]["segmentation"]) >= {"miou", "pixel_accuracy"}
    assert set(metrics["tasks"]["normal"]) >= {"mean_angle", "median_angle", "within_11_25"}
    assert math.isfinite(metrics["delta"])
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["tasks"]["depth"]["abs_err"] == pytest.approx(metrics["tasks"]["depth"]["abs_err"])


@needs_cuda
@pytest.mark.usefixtures("deterministic_cudnn")
def test_dense_tasks_train_the_same_from_cuda_graphs(nyuv2_root, tmp_path):
    # Masked losses (unlabelled and missing pixels) recorded in a graph: over the final phase's four epochs
    # both batch shapes (full, and an epoch's smaller last one) are recorded and replayed.
    from mamo.search import run_search

    results = {}
    for graphs in ("false", "true"):
        overrides = [f"data.root={nyuv2_root}", "model.backbone=timm:test_resnet", "model.head_hidden=8",
                     "train.batch_size=6", "train.epochs=5", "train.device=cuda", f"train.cuda_graphs={graphs}",
                     "search.rounds=0", "search.pretrain_epochs=1", "search.baselines=false"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[graphs] = run_search(load_config("nyuv2", overrides), tmp_path / graphs, progress=False,
                                         quiet=True, loggers=False)["tasks"]
        assert not [w for w in caught if "CUDA graph" in str(w.message)]  # nothing fell back to eager steps
    # The continuous metrics: bilinear upsampling's backward adds with atomics on CUDA (no deterministic
    # kernel), so the runs differ by rounding, which flips pixels across the thresholds of the counted ones
    # (within_11_25 moved by 1.4% in one run on an H200, the losses by far less).
    for task, metrics in results["false"].items():
        for name in ("loss", "abs_err", "rel_err", "mean_angle"):
            if name in metrics:
                assert results["true"][task][name] == pytest.approx(metrics[name], rel=1e-3), (task, name)


def test_a_bad_test_file_found_at_the_final_evaluation_is_fixed_and_resumed(nyuv2_root, tmp_path):
    # The test split's values are read only at the end: the run must keep everything and finish once the file
    # is fixed, with what an uninterrupted run on the good file gives.
    import shutil

    from mamo.search import run_search

    root = tmp_path / "nyuv2"
    shutil.copytree(nyuv2_root, root)
    overrides = [f"data.root={root}", "model.backbone=timm:test_resnet", "model.head_hidden=8",
                 "train.batch_size=6", "train.epochs=1", "train.device=cpu", "search.pretrain_epochs=1",
                 "search.round_epochs=1", "search.final_epochs=1", "search.rounds=1", "search.baselines=false"]
    quiet = {"progress": False, "quiet": True, "loggers": False}
    whole = run_search(load_config("nyuv2", overrides), tmp_path / "whole", **quiet)
    good = np.load(root / "val" / "depth" / "4.npy")
    bad = good.copy()
    bad[3, 3, 0] = np.nan
    np.save(root / "val" / "depth" / "4.npy", bad)
    with pytest.raises(MamoError, match=r"val/depth/4\.npy holds NaN or infinite values"):
        run_search(load_config("nyuv2", overrides), tmp_path / "cut", **quiet)
    assert "holds NaN" in (tmp_path / "cut" / "log.txt").read_text().splitlines()[-1]
    np.save(root / "val" / "depth" / "4.npy", good)
    resumed = run_search(None, tmp_path / "cut", resume=True, **quiet)
    assert resumed["tasks"] == whole["tasks"]
