"""TensorBoard events written by the logger during real training and a real 2-round search, read back with
tensorboard's own event reader: tags, step counts, image sizes, histograms, text and hparams."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginEventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from mamo.board import TensorBoardLogger
from mamo.config import DirectionConfig, TensionerConfig, load_config
from mamo.errors import MamoError
from mamo.hparams import write_hparams
from mamo.search import run_search
from mamo.session import build_network, make_trainer, open_session
from mamo.train import run_train
from mamo.trainer import Callback

TINY = [
    "data.train_size=256", "data.val_size=64", "data.test_size=64", "train.batch_size=64", "train.epochs=1",
    "search.pretrain_epochs=1", "search.round_epochs=1", "search.final_epochs=1", "search.rounds=2",
]
STEPS_PER_EPOCH = 4  # 256 / 64
TASKS = ("left", "right")
CELLS = 3  # LeNet
# Round records sit at the global step of the round's end: pretraining then each round takes one epoch.
ROUND_STEPS = [2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]


def read_events(directory) -> EventAccumulator:
    events = EventAccumulator(str(directory), size_guidance={"images": 0, "scalars": 0, "histograms": 0,
                                                             "tensors": 0})
    events.Reload()
    return events


def served_steps(directory, tag: str) -> list[int]:
    """The steps of ``tag`` as TensorBoard's Python server reads them (plugin_event_accumulator: every record a
    tensor, and only a START after the run's first one purges), beside the legacy reader above."""
    served = PluginEventAccumulator(str(directory), size_guidance={"tensors": 0})
    served.Reload()
    return [e.step for e in served.Tensors(tag)]


def steps(events: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def png_size(data: bytes) -> tuple[int, int]:
    import io

    with Image.open(io.BytesIO(data)) as image:
        return image.size


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A 2-round quick search with its default logger (and cached STL, so Δ is logged)."""
    root = tmp_path_factory.mktemp("board")
    metrics = run_search(load_config("quick", TINY), root / "search", progress=False, quiet=True,
                         cache_root=root / "cache")
    return root / "search", metrics, read_events(root / "search")


def test_a_search_logs_every_step_and_epoch_scalar(searched):
    run_dir, metrics, events = searched
    total = 4 * STEPS_PER_EPOCH  # pretrain + 2 rounds + final, one epoch each
    every_step = list(range(1, total + 1))
    every_epoch = list(range(STEPS_PER_EPOCH, total + 1, STEPS_PER_EPOCH))
    for task in TASKS:
        for prefix in ("train/loss", "train/grad_norm", "direction/weight", "direction/base_weight", "tensioner/c",
                       "tensioner/delta", "tensioner/angle_deg"):
            assert steps(events, f"{prefix}/{task}") == every_step, prefix
        for prefix in ("val/loss", "val/accuracy", "train/epoch_loss"):
            assert steps(events, f"{prefix}/{task}") == every_epoch, prefix
        assert events.Scalars(f"test/accuracy/{task}")[0].value == pytest.approx(metrics["tasks"][task]["accuracy"])
    assert steps(events, "tensioner/shrink") == every_step
    assert steps(events, "val/delta_vs_stl") == every_epoch
    assert events.Scalars("test/delta")[0].value == pytest.approx(metrics["delta"])
    weights = [events.Scalars(f"direction/weight/{t}")[-1].value for t in TASKS]
    assert all(w >= 0 for w in weights) and sum(weights) > 0
    norms = [e.value for e in events.Scalars("train/grad_norm/left")]
    assert all(math.isfinite(v) and v > 0 for v in norms)


def test_ub_norms_have_their_own_tag_so_neither_changes_meaning_between_phases(tmp_path):
    # Under train.gradients=ub the Gramian is over the representation; the detection rounds are exact.
    config = load_config("quick", [*TINY, "search.rounds=1", "search.baselines=false", "train.gradients=ub"])
    run_search(config, tmp_path / "run", progress=False, quiet=True, pictures=False)
    events = read_events(tmp_path / "run")
    round_steps = list(range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))  # pretrain, round 1, final
    ub_steps = [s for s in range(1, 3 * STEPS_PER_EPOCH + 1) if s not in round_steps]
    for task in TASKS:
        assert steps(events, f"train/grad_norm/{task}") == round_steps
        assert steps(events, f"train/grad_norm_representation/{task}") == ub_steps


class StopAfterSecondEpoch(Callback):
    def on_epoch_end(self, trainer, metrics):
        if trainer.epoch == 2:
            raise KeyboardInterrupt


def test_a_resumed_train_run_shows_each_step_once(tmp_path):
    # Only the first epoch is checkpointed (a long interval), so the second epoch's events are written twice:
    # once before the stop and again after --resume; TensorBoard must show the second copy only.
    config = load_config("quick", [*TINY, "train.epochs=3", "train.checkpoint_seconds=1e9"])
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_train(config, run, progress=False, quiet=True, callbacks=[StopAfterSecondEpoch()])
    run_train(config, run, progress=False, quiet=True, resume=True)
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    events = read_events(run)
    total = 3 * STEPS_PER_EPOCH
    for task in TASKS:
        assert steps(events, f"train/loss/{task}") == list(range(1, total + 1))
        assert steps(events, f"val/loss/{task}") == list(range(STEPS_PER_EPOCH, total + 1, STEPS_PER_EPOCH))
        assert served_steps(run, f"train/loss/{task}") == list(range(1, total + 1))


def test_a_train_stopped_right_after_an_epochs_checkpoint_keeps_that_epochs_scalars(tmp_path, monkeypatch):
    # The checkpoint was written before the logger recorded the epoch, and a resume starts after it: the
    # epoch's validation scalars were lost for good (a helper's SIGKILL right after the checkpoint).
    from mamo.checkpoint import EpochCheckpoint

    save = EpochCheckpoint.on_epoch_end

    def saved_then_stopped(self, trainer, metrics):
        save(self, trainer, metrics)
        if trainer.epoch == 2:
            raise KeyboardInterrupt

    config = load_config("quick", [*TINY, "train.epochs=3", "train.checkpoint_seconds=0"])
    run = tmp_path / "run"
    monkeypatch.setattr(EpochCheckpoint, "on_epoch_end", saved_then_stopped)
    with pytest.raises(KeyboardInterrupt):
        run_train(config, run, progress=False, quiet=True, pictures=False)
    monkeypatch.undo()
    run_train(config, run, progress=False, quiet=True, pictures=False, resume=True)
    events = read_events(run)
    total = 3 * STEPS_PER_EPOCH
    assert steps(events, "val/loss/left") == list(range(STEPS_PER_EPOCH, total + 1, STEPS_PER_EPOCH))


class StopAtThirdStep(Callback):
    def on_step(self, trainer, result):
        if trainer.global_step == 3:
            raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["train", "search"])
def test_a_resumed_run_without_a_checkpoint_starts_again_and_drops_what_the_stopped_one_logged(tmp_path, command):
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    run_command = {"train": run_train, "search": run_search}[command]
    config = load_config("quick", [*TINY, "search.baselines=false"])
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # in the first epoch: before the first checkpoint
        run_command(config, run, progress=False, quiet=True, pictures=False, callbacks=[StopAtThirdStep()])
    assert not list((run / "checkpoints").iterdir())
    first = next(run.glob("events.out.tfevents.*"))
    run_command(config, run, progress=False, quiet=True, pictures=False, resume=True)
    assert "yet: the " in (run / "log.txt").read_text() and (run / "metrics.json").exists()
    (second,) = set(run.glob("events.out.tfevents.*")) - {first}
    # The new file starts by telling TensorBoard to drop every step the stopped process wrote (a SessionLog START
    # at step 0, as purge_step=0 would), then logs the run from its start.
    written = [Event.FromString(data) for data in RawEventFileLoader(str(second)).Load()]
    assert written[0].HasField("file_version")
    assert written[1].session_log.status == SessionLog.START and written[1].step == 0
    events = read_events(run)
    assert steps(events, "train/loss/left")[:4] == [1, 2, 3, 4]
    phases = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("run/phases/text_summary")]
    assert phases[0] == f"{'train' if command == 'train' else 'pretrain'} starts after step 0"
    assert not any("resumes" in phase for phase in phases)


def test_a_resumed_search_shows_each_step_once(tmp_path):
    config = load_config("quick", [*TINY, "search.pretrain_epochs=2", "search.baselines=false",
                                   "train.checkpoint_seconds=1e9"])
    run = tmp_path / "search"
    with pytest.raises(KeyboardInterrupt):  # in pretraining; only its first epoch is checkpointed
        run_search(config, run, progress=False, quiet=True, callbacks=[StopAfterSecondEpoch()])
    run_search(config, run, progress=False, quiet=True, resume=True)
    events = read_events(run)
    total = 5 * STEPS_PER_EPOCH  # pretrain 2 + 2 rounds + final, one epoch each
    assert steps(events, "train/loss/left") == list(range(1, total + 1))
    assert steps(events, "val/loss/left") == list(range(STEPS_PER_EPOCH, total + 1, STEPS_PER_EPOCH))
    # Before growth, then after each round (pretraining took two epochs here).
    assert [e.step for e in events.Images("architecture")] == [0, 3 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH]
    assert len(events.Tensors("config/text_summary")) == 1  # each process wrote it at step 0
    phases = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("run/phases/text_summary")]
    assert phases == [(0, "pretrain starts after step 0"),
                      (STEPS_PER_EPOCH + 1, f"pretrain resumes from a checkpoint after step {STEPS_PER_EPOCH}"),
                      (8, "round1 starts after step 8"), (12, "round2 starts after step 12"),
                      (16, "final starts after step 16")]


class StopAtRoundCheckpoint:
    """A stop at round ``name``'s checkpoint, right ``before`` or right after it is written, as a kill there would
    be."""

    def __init__(self, checkpoint, name: str, before: bool):
        self.checkpoint, self.name, self.before = checkpoint, name, before

    def __call__(self, directory, phase, *args, **kwargs):
        if phase.name == self.name and self.before:
            raise KeyboardInterrupt
        self.checkpoint(directory, phase, *args, **kwargs)
        if phase.name == self.name:
            raise KeyboardInterrupt


def stopped_and_resumed(tmp_path, monkeypatch, name: str, before: bool):
    """A quick search stopped at round ``name``'s checkpoint, then resumed: its folder and the events the stopped
    process had written."""
    import mamo.search_phases

    config = load_config("quick", [*TINY, "search.baselines=false"])
    run = tmp_path / "search"
    monkeypatch.setattr(mamo.search_phases, "save_phase_checkpoint",
                        StopAtRoundCheckpoint(mamo.search_phases.save_phase_checkpoint, name, before))
    with pytest.raises(KeyboardInterrupt):
        run_search(config, run, progress=False, quiet=True)
    stopped = read_events(run)
    monkeypatch.undo()
    run_search(config, run, progress=False, quiet=True, resume=True)
    return run, stopped


def test_a_search_stopped_right_after_a_rounds_checkpoint_keeps_that_rounds_record(tmp_path, monkeypatch):
    # The round was logged after its checkpoint, and a resume starts after it: round 1's pictures, scalars and
    # PNGs were lost for good (a helper's SIGKILL sweep; with SIGINT a 0.9 ms window).
    run, _ = stopped_and_resumed(tmp_path, monkeypatch, "round1", before=False)
    events = read_events(run)
    assert [e.step for e in events.Images("conflicts/overview")] == ROUND_STEPS
    assert [e.step for e in events.Images("architecture")] == [0, *ROUND_STEPS]
    assert steps(events, "search/gmk_modules") == ROUND_STEPS
    assert {p.name for p in (run / "plots").iterdir()} >= {"conflicts-round1.png", "architecture-round1.png"}


def test_a_round_logged_but_not_checkpointed_shows_once_after_the_resume(tmp_path, monkeypatch):
    # The resume repeats round 2; its restart marker drops the stopped process's copy of round 2's record only
    # because that record sits at a global step after the checkpoint (at the round number it stayed, twice).
    run, stopped = stopped_and_resumed(tmp_path, monkeypatch, "round2", before=True)
    assert [e.step for e in stopped.Images("conflicts/overview")] == ROUND_STEPS  # logged before the stop
    events = read_events(run)
    for tag in ("conflicts/overview", "conflicts/histograms", "conflicts/counts/cell1"):
        assert [e.step for e in events.Images(tag)] == ROUND_STEPS, tag
    assert [e.step for e in events.Images("architecture")] == [0, *ROUND_STEPS]
    for tag in ("search/gmk_modules", "conflicts/Q/left+right/cell1"):
        assert steps(events, tag) == ROUND_STEPS, tag
    assert [h.step for h in events.Histograms("conflicts/cosine/left+right/cell1")] == ROUND_STEPS
    # Texts: the legacy reader above never purges tensors; TensorBoard's server-side reader does.
    assert served_steps(run, "search/activated/text_summary") == ROUND_STEPS
    assert served_steps(run, "architecture") == [0, *ROUND_STEPS]


def test_a_search_logs_each_round(searched):
    run_dir, metrics, events = searched
    assert steps(events, "search/gmk_modules") == ROUND_STEPS
    logged = [e.value for e in events.Scalars("search/gmk_modules")]
    assert logged == [r["gmk_modules"] for r in metrics["rounds"]]
    assert [e.value for e in events.Scalars("search/params")][-1] == metrics["params"]
    assert steps(events, "search/val_delta_vs_stl") == ROUND_STEPS
    for cell in range(CELLS):
        counts = [e.value for e in events.Scalars(f"conflicts/Q/left+right/cell{cell}")]
        assert counts == [r["conflicts"]["counts"][cell][0][1] for r in metrics["rounds"]]
        histograms = events.Histograms(f"conflicts/cosine/left+right/cell{cell}")
        assert [h.step for h in histograms] == ROUND_STEPS
        assert [h.histogram_value.num for h in histograms] == [STEPS_PER_EPOCH] * 2
        assert sum(histograms[0].histogram_value.bucket) == STEPS_PER_EPOCH
        first = histograms[0].histogram_value
        assert -1.0 <= first.min < first.max <= 1.0 and first.sum_squares > 0 and len(first.bucket_limit) == 20


def test_a_search_logs_heatmaps_overview_and_architecture_images(searched):
    run_dir, metrics, events = searched
    tags = set(events.Tags()["images"])
    per_cell = {f"conflicts/{kind}/cell{c}" for kind in ("counts", "cosine") for c in range(CELLS)}
    assert tags == per_cell | {"conflicts/overview", "conflicts/histograms", "architecture"}
    assert [e.step for e in events.Images("conflicts/histograms")] == ROUND_STEPS
    overview = events.Images("conflicts/overview")
    assert [e.step for e in overview] == ROUND_STEPS
    saved = Image.open(run_dir / "plots" / "conflicts-round1.png").size
    assert {(e.width, e.height) for e in overview} == {saved}
    assert png_size(overview[0].encoded_image_string) == saved
    for tag in per_cell:
        images = events.Images(tag)
        assert [e.step for e in images] == ROUND_STEPS
        # Cut out of the overview: one panel and its colour bar, about a third of three cells side by side.
        assert all(100 < e.width < saved[0] / 2 and 100 < e.height < saved[1] / 2 + 60 for e in images)
    architecture = events.Images("architecture")
    assert [e.step for e in architecture] == [0, *ROUND_STEPS]  # the HPS network, then after each round
    assert all(e.width > 600 and e.height > 200 for e in architecture)
    for z, event in enumerate(architecture):  # the same PNG exported to the run folder
        assert (run_dir / "plots" / f"architecture-round{z}.png").read_bytes() == event.encoded_image_string
    assert (run_dir / "plots" / "conflicts-round2.png").read_bytes() == overview[1].encoded_image_string


def test_a_search_logs_its_config_and_rounds_as_text(searched):
    run_dir, metrics, events = searched
    assert {"config/text_summary", "search/activated/text_summary"} <= set(events.Tags()["tensors"])
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "rounds: 2" in config and "name: quick" in config
    rounds = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("search/activated/text_summary")]
    assert rounds[0].startswith("round 1: ")
    layout = events.Tensors("custom_scalars__config__")
    assert layout, "the per-task chart layout is missing"
    # Built from tensorboard's protos (not torch's helpers): what its TEXT and CUSTOM SCALARS plugins read.
    from tensorboard.plugins.custom_scalar import layout_pb2

    from mamo.board import PER_TASK_CHARTS

    parsed = layout_pb2.Layout.FromString(layout[0].tensor_proto.string_val[0])
    assert [category.title for category in parsed.category] == ["mamo: per task"]
    assert {chart.title: list(chart.multiline.tag) for chart in parsed.category[0].chart} == {
        title: [f"^{prefix}"] for title, prefix in PER_TASK_CHARTS.items()}
    assert events.SummaryMetadata("config/text_summary").plugin_data.plugin_name == "text"
    assert events.SummaryMetadata("custom_scalars__config__").plugin_data.plugin_name == "custom_scalars"


def test_training_without_a_gramian_logs_losses_and_weights_only(tmp_path):
    """Equal weighting on the step's one-backward path (no Gramian, no tensioner), as the train command runs
    it: an HPS network, then an STL network of one task, whose steps continue after the first's."""
    config = load_config("quick", TINY)
    session = open_session(config, None, progress=False, quiet=True, cache_root=tmp_path / "cache")
    equal = DirectionConfig(name="equal", tensioner=TensionerConfig(formulation="off"))
    with TensorBoardLogger(tmp_path / "run", config, session.data.tasks, background=False) as logger:
        for name, tasks in (("hps", None), ("stl:right", ["right"])):
            model = build_network(session, tasks)
            logger.on_phase_start(name, model)
            trainer = make_trainer(session, model, equal, [logger])
            trainer.step.direction.needs_gramian = False  # the summed step TrainStep takes for such directions
            trainer.fit(1)
    events = read_events(tmp_path / "run")
    scalars = set(events.Tags()["scalars"])
    assert steps(events, "train/loss/left") == list(range(1, STEPS_PER_EPOCH + 1))
    assert steps(events, "train/loss/right") == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert steps(events, "val/loss/right") == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert steps(events, "val/loss/left") == [STEPS_PER_EPOCH]
    assert {e.value for e in events.Scalars("direction/weight/left")} == {1.0}
    assert not [tag for tag in scalars if tag.startswith(("train/grad_norm", "tensioner/", "val/delta"))]
    # The HPS network, then the one-task network as it starts (before, only the first network was drawn).
    assert [e.step for e in events.Images("architecture")] == [0, STEPS_PER_EPOCH]
    assert sorted(p.name for p in (tmp_path / "run" / "plots").iterdir()) == [
        "architecture-round0.png", "architecture-stl-task1.png"]


def test_an_stl_train_run_draws_each_tasks_network(tmp_path):
    # The baseline cache is beside the run folder, so both networks train here.
    run_train(load_config("quick", [*TINY, "train.mode=stl"]), tmp_path / "run", progress=False, quiet=True)
    events = read_events(tmp_path / "run")
    assert [e.step for e in events.Images("architecture")] == [0, STEPS_PER_EPOCH]
    for index in range(2):
        with Image.open(tmp_path / "run" / "plots" / f"architecture-stl-task{index}.png") as picture:
            assert picture.format == "PNG"


def test_step_scalars_match_the_step_result(tmp_path):
    config = load_config("quick", TINY)
    session = open_session(config, None, progress=False, quiet=True, cache_root=tmp_path / "cache")
    model = build_network(session)
    logger = TensorBoardLogger(tmp_path / "run", config, session.data.tasks, background=False)
    trainer = make_trainer(session, model, config.direction, [])
    result = trainer.step(*trainer._to_device(*next(iter(
        torch.utils.data.DataLoader(session.data.train, batch_size=64, collate_fn=_collate)))))
    trainer.global_step = 7
    logger.on_step(trainer, result)
    logger.close()
    events = read_events(tmp_path / "run")
    losses = [events.Scalars(f"train/loss/{t}")[0] for t in TASKS]
    assert [e.step for e in losses] == [7, 7]
    assert [e.value for e in losses] == pytest.approx(result.losses.tolist())
    norms = [events.Scalars(f"train/grad_norm/{t}")[0].value for t in TASKS]
    assert norms == pytest.approx(result.gramian.diagonal().sqrt().tolist(), rel=1e-5)
    weights = [events.Scalars(f"direction/weight/{t}")[0].value for t in TASKS]
    assert weights == pytest.approx(result.weights.tolist())
    c = [events.Scalars(f"tensioner/c/{t}")[0].value for t in TASKS]
    assert c == pytest.approx(result.info["c"].tolist())
    # info["weights"] repeats the weights above: logged once, not again under direction/weights.
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("direction/weights")]


def _collate(items):
    xs, targets = zip(*items, strict=True)
    return torch.stack(xs), {t: torch.stack([y[t] for y in targets]) for t in targets[0]}


def test_write_hparams_records_a_trial(tmp_path):
    write_hparams(tmp_path / "trial-0003", {"T": 8, "alpha": 0.25, "threshold": "topk:2", "lr": None},
                  {"val_delta": 1.5, "gmk_modules": 4})
    events = read_events(tmp_path / "trial-0003")
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert values["T"].number_value == 8 and values["alpha"].number_value == 0.25
    assert values["threshold"].string_value == "topk:2" and values["lr"].string_value == "none"
    assert events.Scalars("val_delta")[0].value == 1.5
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert {m.name.tag for m in experiment.experiment.metric_infos} == {"val_delta", "gmk_modules"}


def test_the_hparams_records_use_the_plugins_own_names_and_types(tmp_path):
    # Built from the protos, without torch's helper (and tensorboard's metadata module, 0.12 s to import).
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import metadata as plugin

    from mamo import hparams

    assert (hparams.PLUGIN, hparams.VERSION) == (plugin.PLUGIN_NAME, plugin.PLUGIN_DATA_VERSION)
    assert (hparams.EXPERIMENT_TAG, hparams.START_TAG, hparams.END_TAG) == (
        plugin.EXPERIMENT_TAG, plugin.SESSION_START_INFO_TAG, plugin.SESSION_END_INFO_TAG)
    write_hparams(tmp_path, {"Z": 2, "flag": True, "mode": "gmk"}, {"val_delta": 0.5}, state="failed")
    content = read_events(tmp_path).PluginTagToContent("hparams")
    infos = plugin_data_pb2.HParamsPluginData.FromString(content[plugin.EXPERIMENT_TAG]).experiment.hparam_infos
    assert {info.name: api_pb2.DataType.Name(info.type) for info in infos} == {
        "Z": "DATA_TYPE_FLOAT64", "flag": "DATA_TYPE_BOOL", "mode": "DATA_TYPE_STRING", "state": "DATA_TYPE_STRING"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content[plugin.SESSION_START_INFO_TAG])
    assert start.session_start_info.hparams["flag"].bool_value is True  # torch's helper made bools numbers
    end = plugin_data_pb2.HParamsPluginData.FromString(content[plugin.SESSION_END_INFO_TAG])
    assert api_pb2.Status.Name(end.session_end_info.status) == "STATUS_FAILURE" and end.version == 0


def test_write_hparams_needs_an_objective(tmp_path):
    with pytest.raises(MamoError, match="no metric values"):
        write_hparams(tmp_path, {"T": 4}, {"val_delta": None})


def test_metrics_json_rounds_feed_the_growth_plot(searched):
    from mamo import report_plots

    run_dir, metrics, _ = searched
    saved = json.loads((run_dir / "metrics.json").read_text())
    figure = report_plots.growth_figure(saved["rounds"])
    assert len(figure.axes[0].patches) == len(saved["rounds"])


def test_search_command_with_no_tensorboard_writes_the_run_but_no_events(tmp_path):
    from mamo.cli import main

    overrides = [arg for item in TINY for arg in ("--set", item)]
    run_dir = tmp_path / "search"
    assert main(["search", "quick", *overrides, "--set", "train.device=cpu", "--no-progress", "--no-tensorboard",
                 "--run-dir", str(run_dir)]) == 0
    assert not list(run_dir.rglob("events.out.tfevents.*"))
    assert not list(run_dir.glob("plots/*-round*.png"))  # round pictures belong to the logger
    for name in ("report.md", "report_metrics.png", "report_growth.png", "architecture.png", "metrics.json"):
        assert (run_dir / name).is_file(), name


def test_search_command_with_no_pictures_logs_every_scalar_and_histogram_but_no_image(tmp_path, searched):
    from mamo.cli import main

    overrides = [arg for item in TINY for arg in ("--set", item)]
    run_dir = tmp_path / "search"
    assert main(["search", "quick", *overrides, "--set", "train.device=cpu", "--no-progress", "--no-pictures",
                 "--run-dir", str(run_dir)]) == 0
    events, full = read_events(run_dir), searched[2]
    assert events.Tags()["images"] == []
    assert not (run_dir / "plots").exists()
    for kind in ("scalars", "histograms"):  # everything but the pictures, at the same steps
        assert set(events.Tags()[kind]) == set(full.Tags()[kind]), kind
    for tag in ("train/loss/left", "search/gmk_modules", "val/delta_vs_stl", "test/delta"):
        assert steps(events, tag) == steps(full, tag), tag
    assert (run_dir / "report.md").is_file()


def test_the_conflict_heatmap_boxes_the_modules_a_round_created_not_its_activated_positions(tmp_path, monkeypatch):
    from mamo import graph as g
    from mamo import plots
    from mamo.config import ModelConfig
    from mamo.conflicts import ConflictStats
    from mamo.search_phases import RoundRecord
    from mamo.spaces import create_space
    from mamo.tasks import parse_tasks

    tasks = parse_tasks({t: {"type": "classification", "classes": 10} for t in ("seg", "depth", "normal")}, "test")
    graph = g.build_hps_graph(create_space(ModelConfig(backbone="lenet"), (1, 28, 28)), tasks)
    assert g.num_cells(graph) == 3 and all(graph.graph["cell_params"])
    # What the search does with a round's activated positions: shallowest first, skipping covered ones. seg+depth
    # at cell 0 grows cells 0-2, so its cell-2 activation grows nothing; depth+normal at cell 1 grows cells 1-2.
    activated = [(("seg", "depth"), 0), (("seg", "depth"), 2), (("depth", "normal"), 1)]
    new_modules = []
    for position in sorted(activated, key=lambda p: p[1]):
        if not g.is_grown(graph, position, "gmk"):
            new_modules += g.grow(graph, position, "gmk", round_index=1)
    record = RoundRecord(round=1, stats=ConflictStats.for_graph(graph), activated=activated, new_modules=new_modules,
                         gmk_modules=len(new_modules), params=0, val={}, val_delta=None, graph=graph, model=None,
                         run_dir=tmp_path)
    drawn = []
    overview_images = plots.overview_images
    monkeypatch.setattr(plots, "overview_images", lambda stats, grown=None, title=None: (
        drawn.append(grown) or overview_images(stats, grown, title)))
    with TensorBoardLogger(tmp_path, load_config("quick"), tasks, background=False) as logger:
        logger.on_round_end(record)
    expected = [[["seg", "depth"], 0], [["depth", "normal"], 1], [["seg", "depth"], 1], [["depth", "normal"], 2],
                [["seg", "depth"], 2]]
    assert drawn == [expected]  # before: the activated positions, without seg+depth@cell1 and depth+normal@cell2
    figure, panels, _ = plots._overview(record.stats, drawn[0], None)
    names = list(tasks)
    for cell, pairs in ((0, [("seg", "depth")]), (1, [("seg", "depth"), ("depth", "normal")]),
                        (2, [("seg", "depth"), ("depth", "normal")])):
        boxes = [p for p in panels["counts", cell].patches if not p.get_fill()]
        centres = {(round(p.get_y() + p.get_height() / 2), round(p.get_x() + p.get_width() / 2)) for p in boxes}
        assert centres == {rc for a, b in pairs for rc in ((names.index(a), names.index(b)),
                                                           (names.index(b), names.index(a)))}, cell
    assert "Boxed: the pair got a new module at that cell this round" in figure.texts[-1].get_text()
