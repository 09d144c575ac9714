"""``mamo train`` end to end on a tiny budget, the STL cache, repeatability, and every bad input of DESIGN §12."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from cli_errors import single_error

import mamo
from mamo.baselines import cached_baseline
from mamo.cache import ABANDONED_AFTER_SECONDS, BaselineCache, _pid_namespace, baseline_key
from mamo.cli import main
from mamo.config import PRESET_DIR, Config, DataConfig, ModelConfig, load_config
from mamo.data import load_data
from mamo.errors import MamoError
from mamo.report import delta, win_rate
from mamo.runs import free_run_dir, new_run_dir
from mamo.session import build_network, make_trainer, open_session
from mamo.yaml_core import load_yaml

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "train.epochs=1", "--set", "data.train_size=256", "--set", "data.val_size=64",
        "--set", "data.test_size=64", "--set", "train.device=cpu", "--no-progress"]
TINY_SETTINGS = [text for text in TINY if "=" in text]  # the same budget for load_config
RUN_FILES = ("metrics.json", "report.md", "report.csv", "config.yaml", "weights.safetensors", "checkpoints/best.pt")

PLUGIN = '''
import torch
from torch.utils.data import Dataset
from mamo.data import TensorTaskDataset


def build(*, seed, root, train_size=None, val_size=None, test_size=None):
    generator = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.randn(n, 6, generator=generator)
        return TensorTaskDataset(x, {"sign": (x[:, 0] > 0).long(), "total": x.sum(dim=1, keepdim=True)})

    return {"train": split(train_size or 64), "val": split(val_size or 16), "test": split(test_size or 16),
            "tasks": {"sign": {"type": "classification", "classes": 2}, "total": {"type": "regression", "dim": 1}}}


def narrow_images(*, seed, root, train_size=None, val_size=None, test_size=None):
    generator = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.randn(n, 3, 32, 8, generator=generator)
        return TensorTaskDataset(x, {"bright": (x.mean(dim=(1, 2, 3)) > 0).long(),
                                     "red": (x[:, 0].mean(dim=(1, 2)) > 0).long()})

    two = {"type": "classification", "classes": 2}
    return {"train": split(train_size or 16), "val": split(val_size or 8), "test": split(test_size or 8),
            "tasks": {"bright": two, "red": dict(two)}}


def standardised_images(*, seed, root, train_size=None, val_size=None, test_size=None, scale=1.0):
    generator = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.rand(n, 6, generator=generator)
        return TensorTaskDataset(x, {"sign": (x[:, 0] > 0.5).long(), "image": (x[:, :4] * scale).reshape(n, 1, 2, 2)})

    return {"train": split(16), "val": split(8), "test": split(8),
            "tasks": {"sign": {"type": "classification", "classes": 2},
                      "image": {"type": "reconstruction", "shape": [1, 2, 2]}}}


def raises(*, seed, root):
    raise ValueError("the data server is down")


def wrong_shape(*, seed, root):
    data = build(seed=seed, root=root)
    data["tasks"]["total"]["dim"] = 3
    return data


def unknown_type(*, seed, root):
    data = build(seed=seed, root=root)
    data["tasks"]["total"] = {"type": "keypoints", "classes": 3}
    return data


def not_a_dict(*, seed, root):
    return [1, 2, 3]


class LabelOutOfRangeAt40(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        x = torch.full((6,), float(i))
        return x, {"sign": torch.tensor(2 if i == 40 else 1), "total": x.sum(dim=0, keepdim=True)}


def late_fault(*, seed, root):
    data = build(seed=seed, root=root)
    data["train"] = LabelOutOfRangeAt40()
    return data
'''


def train(*args: str) -> int:
    return main(["train", *args])


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HPS run, then STL, then the same HPS run again, all in one runs folder (one baseline cache)."""
    root = tmp_path_factory.mktemp("runs")
    assert train("quick", *TINY, "--run-dir", str(root / "hps_first")) == 0
    assert train("quick", *TINY, "--set", "train.mode=stl", "--run-dir", str(root / "stl")) == 0
    assert train("quick", *TINY, "--run-dir", str(root / "hps_again")) == 0
    return root


# ------------------------------------------------------------------------------------------------ end to end


def test_train_writes_the_run_folder(runs: Path) -> None:
    run = runs / "hps_first"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    # The weights are as readable as the report beside them (safetensors' own writer made them 0600).
    assert (run / "weights.safetensors").stat().st_mode & 0o777 == (run / "metrics.json").stat().st_mode & 0o777
    metrics = read_metrics(run)
    assert set(metrics["tasks"]) == {"left", "right"}
    for task in ("left", "right"):
        assert 0.0 <= metrics["tasks"][task]["accuracy"] <= 1.0
    assert isinstance(metrics["params"], int) and metrics["params"] > 0
    assert "delta" not in metrics  # no STL was cached yet
    environment = metrics["environment"]  # what made the numbers, to compare runs across machines
    assert environment["mamo"] == mamo.__version__ and environment["torch"] == torch.__version__
    assert environment["device"] == "cpu" and environment["threads"] >= 1 and environment["hardware"]
    assert "--set train.mode=stl" in (run / "report.md").read_text()
    # The resolved config, overrides included, is the run's config.yaml, and it loads back as a preset.
    written = load_config(str(run / "config.yaml"))
    assert written.train.epochs == 1 and written.data.train_size == 256 and written.name == "quick"
    checkpoint = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    assert set(checkpoint) >= {"model", "graph"}
    # Its last line names the folder, as a search's does (it ended on the table's footnote).
    assert re.search(rf"train finished in [0-9.]+ s; run folder {re.escape(str(run))}$",
                     (run / "log.txt").read_text().rstrip())


def test_train_writes_every_architecture_file_a_search_writes(runs: Path) -> None:
    # DESIGN §11: a run folder holds architecture.json/.graphml/.dot/.png; a train run wrote no drawing.
    run = runs / "hps_first"
    for suffix in ("json", "graphml", "dot", "png"):
        assert (run / f"architecture.{suffix}").is_file(), suffix
    assert (run / "architecture.png").read_bytes().startswith(b"\x89PNG")


def test_no_tensorboard_writes_no_events_and_keeps_the_run_folder(runs: Path) -> None:
    assert list((runs / "hps_first").glob("events.out.tfevents.*"))  # the default writes events
    run = runs / "quiet"
    assert train("quick", *TINY, "--no-tensorboard", "--run-dir", str(run)) == 0
    assert not list(run.rglob("events.out.tfevents.*"))
    for name in RUN_FILES:
        assert (run / name).is_file(), name


@pytest.mark.parametrize("progress", [False, True])
def test_each_epoch_is_a_line_in_the_log_and_on_the_terminal_when_no_bar_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, progress: bool
) -> None:
    from mamo.train import run_train

    config = load_config("quick", [*TINY_SETTINGS, "train.epochs=3"])
    run_train(config, tmp_path / "run", progress=progress, loggers=False)
    logged = [line.split(" ", 1)[1] for line in (tmp_path / "run" / "log.txt").read_text().splitlines()
              if " train epoch " in line]
    assert [line.split(":")[0] for line in logged] == ["train epoch 1/3", "train epoch 2/3", "train epoch 3/3"]
    assert all("val left loss " in line and " accuracy " in line and ", right loss " in line for line in logged)
    assert ["left in this phase" in line for line in logged] == [True, True, False]  # none after the last
    shown = [line for line in capsys.readouterr().err.splitlines() if ": val " in line]
    assert shown == ([] if progress else logged)  # the bar replaces them on the terminal


def test_the_progress_bar_counts_a_phases_epochs_as_its_lines_do(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The bar said "final epoch 10" where the log said "final epoch 4/4" (the trainer's count runs across
    # phases; a helper's terminal audit).
    import mamo.trainer
    from mamo.search import run_search

    described = []
    real = mamo.trainer.tqdm
    monkeypatch.setattr(mamo.trainer, "tqdm", lambda *args, **kwargs: described.append(kwargs["desc"]) or real(
        *args, **{**kwargs, "disable": True}))
    config = load_config("quick", [*TINY_SETTINGS, "train.epochs=4", "search.baselines=false"])
    run_search(config, tmp_path / "run", progress=True, quiet=True, loggers=False)
    epochs = [text for text in described if " epoch " in text]
    assert epochs == ["pretrain epoch 1/1", "round1 epoch 1/1", "round2 epoch 1/1", "final epoch 1/1"]
    assert [text for text in described if " epoch " not in text] == [  # the evaluations' bars name their split
        "pretrain val", "round1 val", "round2 val", "final val", "final test", "final val"]


@pytest.mark.parametrize("command", ["train", "search"])
def test_a_run_holds_its_train_threads_throughout_and_restores_torchs_after(tmp_path: Path, command: str) -> None:
    # CPU results depend slightly on the thread count; a tune worker's trial records its count so best.yaml repeats it.
    from mamo.search import run_search
    from mamo.train import run_train
    from mamo.trainer import Callback

    seen = set()

    class Threads(Callback):
        def on_step(self, trainer, result) -> None:
            seen.add(torch.get_num_threads())

    run = {"train": run_train, "search": run_search}[command]
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    settings = [*TINY_SETTINGS, "search.rounds=1", "search.pretrain_epochs=1", "search.final_epochs=1",
                "search.baselines=false"]
    run(load_config("quick", [*settings, f"train.threads={wanted}"]), tmp_path / "run", progress=False, quiet=True,
        loggers=False, callbacks=[Threads()])
    assert seen == {wanted} and torch.get_num_threads() == before
    assert load_config(str(tmp_path / "run" / "config.yaml")).train.threads == wanted
    if command == "train":  # the thread count is part of the baseline's key: the advice says to set it
        assert ("No cached STL baseline for this data, backbone, budget, seed and thread count: run with --set "
                f"train.mode=stl --set train.threads={wanted} once") in (tmp_path / "run" / "report.md").read_text()
    # Too many crashed in torch's pool (RuntimeError, or OverflowError past a C long) and left the run folder.
    for bad in (0, 100_000, 99_999_999_999):
        with pytest.raises(MamoError, match=r"^train.threads must be an integer in \[1, 1024\] or null \(torch's "
                                            rf"default\), got {bad}; set e.g. train.threads=null.$"):
            run(load_config("quick", [*settings, f"train.threads={bad}"]), tmp_path / "bad", progress=False,
                quiet=True, loggers=False)
        assert not (tmp_path / "bad").exists()


def test_without_a_terminal_there_are_no_progress_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    from mamo.cli import build_parser, show_progress

    args = build_parser("train").parse_args(["train"])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress(args)
    assert not show_progress(build_parser("train").parse_args(["train", "--no-progress"]))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # a file or a pipe: carriage returns, not bars
    assert not show_progress(args)


@pytest.mark.parametrize(("seconds", "text"), [(0.04, "0.0 s"), (3.26, "3.3 s"), (42.4, "42 s"), (59.6, "1 min 00 s"),
                                               (185, "3 min 05 s"), (8040, "2 h 14 min")])
def test_durations_read_like_a_person_writes_them(seconds: float, text: str) -> None:
    from mamo.runs import format_duration

    assert format_duration(seconds) == text


@pytest.mark.parametrize(("number", "text"), [(0, "0 new modules"), (1, "1 new module"), (12000, "12000 new modules")])
def test_counts_take_their_nouns_plural_only_when_not_one(number: int, text: str) -> None:
    # The round line said "1 new modules, 1 in all" and show "1 GMK modules".
    from mamo.runs import counted

    assert counted(number, "new module") == text
    # "round 1: 1 mini-batches" in a tiny search's log.
    assert counted(number, "mini-batch", "mini-batches") == text.replace("new module", "mini-batch").replace(
        "mini-batchs", "mini-batches")


def test_weights_file_matches_the_best_checkpoint(runs: Path) -> None:
    from safetensors.torch import load_file

    run = runs / "hps_first"
    weights = load_file(str(run / "weights.safetensors"))
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=False)["model"]
    assert weights.keys() == best.keys()
    assert all(torch.equal(weights[k], best[k]) for k in weights)


def test_stl_run_trains_one_network_per_task_and_caches_it(runs: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs / "stl"
    metrics = read_metrics(run)
    assert set(metrics["tasks"]) == {"left", "right"}
    assert "delta" not in metrics
    # Its TensorBoard events show both networks' training, the second's steps after the first's.
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    steps = 256 // load_config("quick").train.batch_size  # one epoch of data.train_size=256
    assert [e.step for e in events.Scalars("train/loss/left")] == list(range(1, steps + 1))
    assert [e.step for e in events.Scalars("train/loss/right")] == list(range(steps + 1, 2 * steps + 1))
    assert [e.step for e in events.Scalars("val/accuracy/right")] == [2 * steps]
    assert {f"test/accuracy/{task}" for task in ("left", "right")} <= set(events.Tags()["scalars"])
    assert "| STL |" in (run / "report.md").read_text()
    log = (run / "log.txt").read_text()
    assert "STL 'left': training it alone" in log and "STL 'right': training it alone" in log
    config = load_config(str(run / "config.yaml"))
    cached = runs / ".baselines" / f"{baseline_key(config, 'stl', 1)}.json"
    assert json.loads(cached.read_text())["tasks"] == metrics["tasks"]
    # Two LeNets, one per task, each with one head: more parameters than the shared network.
    assert metrics["params"] > read_metrics(runs / "hps_first")["params"]
    assert not (run / "checkpoints").exists()  # its networks' checkpoints are the cache's (an empty folder stayed)


def test_show_on_an_stl_run_says_it_has_no_single_architecture(runs: Path, capsys: pytest.CaptureFixture) -> None:
    from mamo.cli import main

    assert main(["show", str(runs / "stl")]) == 2
    assert "holds an STL run (train.mode=stl: one network per task)" in single_error(capsys.readouterr().err)


def test_hps_after_stl_reports_delta_and_win_rate(runs: Path) -> None:
    metrics = read_metrics(runs / "hps_again")
    stl = read_metrics(runs / "stl")
    data = load_data(load_config(str(runs / "hps_again" / "config.yaml")).data)
    assert metrics["delta"] == pytest.approx(delta(metrics["tasks"], stl["tasks"], data.tasks))
    assert metrics["win_rate"] == pytest.approx(win_rate(metrics["tasks"], stl["tasks"], data.tasks))
    assert 0.0 <= metrics["win_rate"] <= 1.0
    report = (runs / "hps_again" / "report.md").read_text().splitlines()
    table = [line for line in report if line.startswith("| ")]
    assert table[0].startswith("| Method | left accuracy ↑ | right accuracy ↑ | Δ % ↑ | Win ↑")
    assert table[1].startswith(f"| STL | {stl['tasks']['left']['accuracy']:.4g} |")
    assert table[2].startswith("| HPS (mgda+tensioner(thesis)) | ")
    # The metric bars a search's report embeds, STL beside the trained network (a train report had none).
    assert "![report metrics](report_metrics.png)" in report
    # What s/epoch sums, as far as this table has it: no grown model in a train run (a train report said so).
    assert "s/epoch is the training time of one epoch (validation excluded); STL's adds its networks'." in report
    assert "s/epoch is the training time of one epoch (validation excluded)." in (
        runs / "hps_first" / "report.md").read_text().splitlines()  # no STL row either
    assert (runs / "hps_again" / "report_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cached_stl_is_reused_not_retrained(runs: Path, capsys: pytest.CaptureFixture) -> None:
    config = load_config(str(runs / "stl" / "config.yaml"))
    path = runs / ".baselines" / f"{baseline_key(config, 'stl', 1)}.json"
    before = path.read_text()
    session = open_session(config, None, progress=False, cache_root=runs / ".baselines")
    result = cached_baseline(session, "stl", 1)
    # A retrained STL would log its training and measure new epoch times; the cached one is returned as stored.
    assert result == json.loads(before)
    err = capsys.readouterr().err
    assert "STL baseline: reusing the cached result" in err and "training" not in err
    assert path.read_text() == before


def test_an_unknown_baseline_kind_is_refused_by_name(runs: Path) -> None:
    # Before the table, any kind but "stl" was trained and cached as an HPS network under its own name.
    config = load_config(str(runs / "stl" / "config.yaml"))
    session = open_session(config, None, progress=False, quiet=True, cache_root=runs / ".baselines")
    with pytest.raises(MamoError, match=r"unknown baseline kind 'hsp'; use one of stl, hps\."):
        cached_baseline(session, "hsp", 1)


def test_the_hps_baseline_trains_with_equal_weighting_whatever_the_direction(tmp_path: Path, monkeypatch) -> None:
    import mamo.baselines as baselines_module

    directions, real = [], baselines_module.train_network

    def spy(session, epochs, direction, *args, **kwargs):
        directions.append(direction)
        return real(session, epochs, direction, *args, **kwargs)

    monkeypatch.setattr(baselines_module, "train_network", spy)
    config = load_config("quick", [*TINY_SETTINGS, "direction.name=mgda", "direction.tensioner.formulation=thesis"])
    cached_baseline(open_session(config, None, progress=False, quiet=True, cache_root=tmp_path), "hps", 1)
    assert [(d.name, d.tensioner.formulation) for d in directions] == [("equal", "off")]


def test_evaluation_batches_shrink_for_large_inputs(tmp_path: Path, monkeypatch) -> None:
    # 256 NYUv2 images per evaluation batch peaked at 15 GB RSS (logits of 256 × 13 × 288 × 384).
    import mamo.data
    import mamo.trainer as trainer_module

    assert mamo.data.evaluation_batch_size(256, (1, 28, 28)) == 256
    assert mamo.data.evaluation_batch_size(4, (3, 288, 384)) == 12  # NYUv2
    assert mamo.data.evaluation_batch_size(64, (3, 288, 384)) == 64  # never below the training batch
    sizes, real = [], trainer_module.iterate_batches

    def spy(dataset, batch_size, **kwargs):
        sizes.append(batch_size)
        return real(dataset, batch_size, **kwargs)

    monkeypatch.setattr(trainer_module, "iterate_batches", spy)
    monkeypatch.setattr(mamo.data, "EVALUATION_INPUT_VALUES", 784 * 200)  # 200 digits, not 256
    session = open_session(load_config("quick", TINY_SETTINGS), None, progress=False, quiet=True,
                           cache_root=tmp_path)
    trainer = make_trainer(session, build_network(session), session.config.direction)
    trainer.evaluate(session.data.val)
    assert sizes == [200]



@pytest.mark.parametrize("progress", [True, False])
def test_an_evaluation_draws_a_bar_naming_its_split_when_progress_is_on(tmp_path, capsys, progress):
    # NYUv2's test split on a CPU is minutes of evaluation, which showed nothing.
    session = open_session(load_config("quick", TINY_SETTINGS), None, progress=progress, quiet=True,
                           cache_root=tmp_path)
    trainer = make_trainer(session, build_network(session), session.config.direction, description="stl left")
    capsys.readouterr()
    trainer.evaluate(session.data.test, "test")
    assert ("stl left test" in capsys.readouterr().err) == progress


def test_a_train_run_whose_cached_stl_scores_a_metric_next_to_zero_says_the_delta_hangs_on_it(tmp_path):
    # A search said so; a train run's report divided by the same STL without a word.
    from mamo.train import run_train

    run_train(load_config("quick", [*TINY_SETTINGS, "train.mode=stl"]), tmp_path / "stl", progress=False,
              quiet=True, loggers=False)
    config = load_config("quick", TINY_SETTINGS)
    cache = BaselineCache(tmp_path / ".baselines")
    key = baseline_key(config, "stl", config.train.epochs)
    stl = cache.get(key)
    stl["val"]["left"]["accuracy"] = 2e-5
    cache.put(key, stl)
    run_train(config, tmp_path / "mtl", progress=False, quiet=True, loggers=False)
    assert ("note: STL scores left.accuracy = 2.0e-05 on the validation split; the report's Δ divides by STL (Eq 15)"
            in (tmp_path / "mtl" / "log.txt").read_text())
    assert "note: STL scores" not in (tmp_path / "stl" / "log.txt").read_text()

BASELINE_INPUTS = ["train.seed=7", "train.lr=0.123", "train.batch_size=17", "train.optimizer=adamw",
                   "train.weight_decay=0.01", "train.precision=bf16", "data.seed=7",
                   "data.train_size=300", "model.latent=7", "train.threads=1"]
NOT_BASELINE_INPUTS = ["direction.name=pcgrad", "direction.tensioner.T=3", "search.rounds=5", "train.device=cpu",
                       "train.checkpoint_seconds=5", "train.gradients=ub", "name=other",
                       "train.momentum=0.5"]  # the quick preset's Adam reads no momentum (SGD's key: below)


@pytest.mark.parametrize("override", BASELINE_INPUTS + NOT_BASELINE_INPUTS)
def test_the_baseline_key_follows_data_backbone_budget_and_seed_only(override: str) -> None:
    # Dropping the seed from the key made a search with another train.seed reuse seed 0's baselines, unnoticed.
    base = load_config("quick")
    changed = load_config("quick", [override])
    assert changed.to_dict() != base.to_dict(), "the override must change the config for this test to mean anything"
    assert (baseline_key(changed, "stl", 3) != baseline_key(base, "stl", 3)) == (override in BASELINE_INPUTS)


def test_a_null_thread_count_keeps_the_keys_caches_were_written_with() -> None:
    # train.threads joined the key on 2026-11-25, only when set: the caches written before stay valid.
    payload = {"kind": "stl", "data": asdict(DataConfig()), "model": asdict(ModelConfig()), "seed": 0, "budget": {
        "epochs": 3, "batch_size": 256, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0,
        "precision": "fp32"}}
    before = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert baseline_key(Config(), "stl", 3) == before


def test_a_setting_the_optimizer_never_reads_leaves_the_baseline_key() -> None:
    # train.momentum changed under Adam retrained both baselines, which then scored the same to the last digit.
    adam = load_config("quick", ["train.optimizer=adam"])
    assert baseline_key(load_config("quick", ["train.optimizer=adam", "train.momentum=0.5"]), "stl", 3) == \
        baseline_key(adam, "stl", 3)
    assert baseline_key(load_config("quick", ["train.optimizer=sgd", "train.momentum=0.5"]), "stl", 3) != \
        baseline_key(load_config("quick", ["train.optimizer=sgd"]), "stl", 3)


def test_the_baseline_key_follows_the_kind_and_the_epochs() -> None:
    config = load_config("quick")
    assert len({baseline_key(config, "stl", 3), baseline_key(config, "stl", 4), baseline_key(config, "hps", 3)}) == 3


def test_editing_a_plugin_changes_the_baseline_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An edited plugin reused the STL results of its old data: a report with Δ of -5,557 %.
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN)
    config = load_config("logic", [f"data.name={path}:build"])
    before = baseline_key(config, "stl", 3)
    assert baseline_key(config, "stl", 3) == before  # the same source, the same key
    path.write_text(PLUGIN.replace("x[:, 0] > 0", "x[:, 1] > 0"))
    assert baseline_key(config, "stl", 3) != before
    # A module plugin is fingerprinted by its module's file.
    (tmp_path / "my_module.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = load_config("logic", ["data.name=my_module:build"])
    first = baseline_key(module, "stl", 3)
    (tmp_path / "my_module.py").write_text(PLUGIN + "\n# edited\n")
    assert baseline_key(module, "stl", 3) != first


def test_a_seeded_cpu_run_is_repeatable(runs: Path) -> None:
    first, again = read_metrics(runs / "hps_first"), read_metrics(runs / "hps_again")
    assert first["tasks"] == again["tasks"]
    assert first["val"] == again["val"]
    assert first["params"] == again["params"]


def test_console_script_is_the_same_cli() -> None:
    from mamo.cli import run

    (entry,) = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "mamo"]
    assert entry.load() is run  # main, then the quick exit (tests/test_cli_exit.py), as `python cli.py`
    wrapper = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True,
                             check=True)
    assert "train" in wrapper.stdout and "search" in wrapper.stdout
    script = shutil.which("mamo")
    if script is not None:
        installed = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
        assert installed.stdout == wrapper.stdout


def test_version_is_the_installed_packages_and_printed_by_the_cli(capsys: pytest.CaptureFixture) -> None:
    assert metadata.version("mamo") == mamo.__version__  # pyproject reads it from the package: one place
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"mamo {mamo.__version__}\n"


@pytest.mark.parametrize("command", ["train", "search", "tune"])
def test_the_help_names_the_shipped_presets_and_where_they_are(command: str, capsys: pytest.CaptureFixture) -> None:
    # An installed wheel keeps them inside the package, where no user would look for them to copy one.
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert f"a preset name in {PRESET_DIR} (" in shown
    assert ", ".join(sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))) in shown


def test_a_terminal_without_unicode_gets_question_marks_not_a_crash() -> None:
    # The ablation's help names MAMO §4.4; with an ASCII (or Latin-1) terminal printing it, or a run's summary,
    # raised UnicodeEncodeError.
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "bench", "ablation", "--help"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "MAMO ?4.4 ablations" in done.stdout


# ----------------------------------------------------------------------------------------------- plugins


@pytest.fixture()
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN)
    return path


def plugin_args(path: Path, function: str, run: Path) -> list[str]:
    # The logic preset: an MLP, with its dataset options dropped for the plugin.
    return ["logic", "--set", f"data.name={path}:{function}", "--set", "data.options={}", "--set", "train.epochs=2",
            "--set", "model.hidden=[8]", "--set", "train.device=cpu", "--no-progress", "--run-dir", str(run)]


def test_plugin_file_works_end_to_end(plugin: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "plugin"
    assert train(*plugin_args(plugin, "build", run), "--set", "data.train_size=32") == 0
    metrics = read_metrics(run)
    assert set(metrics["tasks"]) == {"sign", "total"}
    assert set(metrics["tasks"]["total"]) >= {"mse", "mae"}
    assert 0.0 <= metrics["tasks"]["sign"]["accuracy"] <= 1.0
    assert "| total mse ↓ |" in (run / "report.md").read_text()


# ---------------------------------------------------------------------------------------------- bad input


def test_wrong_key_exits_2_before_creating_anything(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert train("quick", "--set", "train.epoch=1", "--run-dir", str(run)) == 2
    message = single_error(capsys.readouterr().err)
    assert "'train.epoch'" in message and "epochs" in message
    assert not run.exists()


@pytest.mark.parametrize("budget", [["train.batch_size=1"], ["data.train_size=1"]])
def test_a_batch_of_one_sample_at_a_1x1_batch_norm_is_refused_before_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, budget: list[str]
) -> None:
    # timm's test ResNet shrinks the 36 × 36 digits to 1 × 1 before a batch norm: torch raised a bare ValueError;
    # then a sentence at the first step, which left a run folder behind (a scale audit).
    run = tmp_path / "run"
    settings = ["model.backbone=timm:test_resnet", "data.train_size=4", "data.val_size=4", "data.test_size=4",
                "train.epochs=1", *budget]
    assert train("quick", *(a for key in settings for a in ("--set", key)), "--no-progress", "--no-tensorboard",
                 "--run-dir", str(run)) == 2
    message = single_error(capsys.readouterr().err)
    assert message.startswith("a batch of one sample would reach the batch norm blocks.cell4.0.0.bn1 ")
    assert message.endswith("as one value per channel, which cannot train; set train.batch_size to 2 or more (now "
                            + ("1" if "batch" in budget[0] else "128") + ") and give the train split at least 2 "
                            "samples (now " + ("4" if "batch" in budget[0] else "1") + ").")
    assert not run.exists()


def test_batches_of_one_through_batch_norms_on_wider_maps_are_not_refused() -> None:
    # At 64 × 64 the test ResNet's last batch norm sees 2 × 2: four values per channel, which torch trains on.
    from mamo import graph as g
    from mamo.config import ModelConfig
    from mamo.model import compile_model
    from mamo.model_checks import check_batch_of_one
    from mamo.spaces import create_space
    from mamo.tasks import parse_tasks

    tasks = parse_tasks({t: {"type": "classification", "classes": 10} for t in ("a", "b")}, "test")
    for side, refused in ((64, False), (28, True)):
        space = create_space(ModelConfig(backbone="timm:test_resnet"), (1, side, side))
        model = compile_model(g.build_hps_graph(space, tasks)).train()
        if refused:  # the probe agrees with what torch does in training
            with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
                model(torch.zeros(1, 1, side, side))
            with pytest.raises(MamoError, match="would reach the batch norm blocks.cell4"):
                check_batch_of_one(model, 1, 100, torch.device("cpu"))
        else:
            model(torch.zeros(1, 1, side, side))
            check_batch_of_one(model, 1, 100, torch.device("cpu"))
        check_batch_of_one(model, 2, 100, torch.device("cpu"))  # no batch of one: nothing to probe
        assert model.training  # the probe runs in eval mode and gives the model back as it was


def test_bf16_on_the_cpu_with_a_strided_convolution_on_maps_one_wide_is_refused_before_the_folder(
    plugin: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # 32 × 8 images through timm's test_resnet: a stride-2 convolution sees 4 × 1 maps, where oneDNN's bf16
    # weight gradient holds garbage; refused with the other input checks, so no folder blocks the retry.
    run = tmp_path / "run"
    settings = [f"data.name={plugin}:narrow_images", "model.backbone=timm:test_resnet", "train.precision=bf16",
                "train.device=cpu", "train.epochs=1"]
    assert train("quick", *(a for key in settings for a in ("--set", key)), "--no-progress", "--run-dir", str(run)) == 2
    message = single_error(capsys.readouterr().err)
    assert message.startswith("train.precision=bf16 on the CPU would give wrong weight gradients in blocks.cell3.")
    assert message.endswith("use train.precision=fp32 on the CPU, or larger inputs.")
    assert not run.exists()


def log_of_a_train_whose_report_raises(error: Exception, run: Path, monkeypatch: pytest.MonkeyPatch,
                                       exits: int | None = None) -> str:
    """The log.txt of a train run stopped by ``error``, raised where it writes its report; the command exits with
    ``exits``, or (None) lets the error through."""

    def failing_report(*args: object, **kwargs: object) -> str:
        raise error

    monkeypatch.setattr("mamo.train.write_report", failing_report)
    arguments = ("quick", *TINY, "--no-tensorboard", "--run-dir", str(run))
    if exits is None:
        with pytest.raises(type(error), match=re.escape(str(error))):
            train(*arguments)
    else:
        assert train(*arguments) == exits
    return (run / "log.txt").read_text()


def test_a_crash_keeps_its_traceback_and_how_to_continue_in_the_run_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only MamoErrors reached log.txt: a bug's traceback went to the terminal alone, and the folder kept no reason.
    run = tmp_path / "run"
    log = log_of_a_train_whose_report_raises(RuntimeError("a bug in the report"), run, monkeypatch)
    assert f"crashed with RuntimeError, a bug in mamo (please report it with this log.txt); its checkpoints are " \
           f"kept for: python cli.py train --resume {run}\nTraceback (most recent call last):" in log
    assert log.rstrip().endswith("RuntimeError: a bug in the report")


def test_running_out_of_memory_is_the_machines_limit_in_one_sentence_and_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # The terminal showed torch's traceback, as for a bug in mamo.
    run = tmp_path / "run"
    allocation = RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")
    log = log_of_a_train_whose_report_raises(allocation, run, monkeypatch, exits=2)
    assert single_error(capsys.readouterr().err) == (
        "train ran out of memory ([enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory); "
        "free memory or make the run smaller (a smaller train.batch_size or model), then continue with --resume.")
    assert "stopped by RuntimeError: [enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate " \
           f"memory; its checkpoints are kept for: python cli.py train --resume {run}" in log
    assert "a bug in mamo" not in log and "Traceback" not in log


def test_wrong_key_in_a_preset_file_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text(yaml.safe_dump({"model": {"backbon": "mlp"}}))
    assert train(str(preset), "--run-dir", str(tmp_path / "run")) == 2
    message = single_error(capsys.readouterr().err)
    assert "'model.backbon'" in message and str(preset) in message and "backbone" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.name=imagenet", "unknown dataset 'imagenet'"),
        ("model.backbone=vgg", "unknown backbone 'vgg'"),
        ("model.backbone=timm:not_a_timm_model", "unknown timm model 'not_a_timm_model'"),
        ("direction.name=adam", "unknown direction 'adam'"),
        ("train.optimizer=lion", "unknown optimizer 'lion'"),
        ("train.mode=both", "unknown train.mode 'both'"),
    ],
)
def test_unknown_names_exit_2_with_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture, override: str, expected: str
) -> None:
    assert train("logic", "--set", override, "--set", "train.device=cpu", "--no-progress",
                 "--run-dir", str(tmp_path / "run")) == 2
    assert expected in single_error(capsys.readouterr().err)


def test_every_accepted_train_mode_has_a_way_to_train() -> None:
    # train.mode is checked in mamo.session (search and tune check it too); the train command reads the table.
    from mamo.session import MODES
    from mamo.train import TRAIN_MODES

    assert set(MODES) == set(TRAIN_MODES)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epochs=0", "train.epochs must be an integer ≥ 1, got 0"),
        ("train.batch_size=0", "train.batch_size must be an integer ≥ 1, got 0"),
        ("train.lr=-1", "train.lr must be a number in (0, 3.403e+38], got -1.0"),
        ("train.lr=.nan", "train.lr must be a number in (0, 3.403e+38], got nan"),
        # Above float32's range the optimizer crashed at the first step, logged as a bug in mamo.
        ("train.lr=1e39", "train.lr must be a number in (0, 3.403e+38], got 1e+39"),
        ("train.momentum=1", "train.momentum must be a number in [0, 1), got 1.0"),
        ("train.weight_decay=-0.1", "train.weight_decay must be a number in [0, 3.403e+38], got -0.1"),
        ("train.weight_decay=1e39", "train.weight_decay must be a number in [0, 3.403e+38], got 1e+39"),
        ("train.checkpoint_seconds=-1", "train.checkpoint_seconds must be a finite number ≥ 0, got -1.0"),
        ("train.seed=18446744073709551615", "train.seed must be an integer in [-2**63, 2**63 - 1), got 1844"),
        ("train.precision=fp16", "unknown precision 'fp16' (train.precision); use one of fp32, bf16"),
        ("train.gradients=approx", "unknown gradient mode 'approx' (train.gradients)"),
        ("train.gradient_path=vmap", "unknown gradient path 'vmap' (train.gradient_path)"),
        ("train.gradient_layout=dense", "unknown gradient layout 'dense' (train.gradient_layout); use auto, flat, "
         "parameters"),
    ],
)
def test_bad_training_settings_exit_2_before_a_folder_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture, override: str, expected: str
) -> None:
    # Before: batch_size=0 raised ZeroDivisionError, lr=-1 torch's ValueError, epochs=0 trained nothing, and
    # an unknown precision failed once training started, leaving a run folder behind.
    run = tmp_path / "run"
    assert train("logic", "--set", override, "--set", "train.device=cpu", "--no-progress", "--run-dir", str(run)) == 2
    assert expected in single_error(capsys.readouterr().err)
    assert not run.exists()


def test_a_diverged_loss_is_one_sentence_and_the_folder_keeps_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Before: a FloatingPointError traceback and exit 1 (DESIGN §12 asks for a sentence naming the fix).
    run = tmp_path / "run"
    assert train("quick", *TINY, "--set", "train.lr=1e30", "--no-tensorboard", "--run-dir", str(run)) == 2
    message = single_error(capsys.readouterr().err)
    assert message.startswith("training 'train' diverged at step ") and "became NaN or infinite" in message
    assert "lower train.lr (now 1e+30)" in message
    assert (run / "log.txt").read_text().splitlines()[-1].endswith(f"error: {message}")
    assert (run / "config.yaml").exists()  # what was written stays


@pytest.mark.parametrize(("settings", "named"), [
    (["train.optimizer=sgd", "train.weight_decay=1e30"], "lower train.lr (now 0.003) or train.weight_decay (now "
     "1e+30), or check"),
    (["direction.tensioner.formulation=relative", "direction.tensioner.alpha=1e308", "direction.tensioner.T=1"],
     "lower train.lr (now 0.003) or direction.tensioner.alpha (now 1e+308), or check"),
])
def test_a_divergence_names_a_high_weight_decay_or_tension_beside_the_learning_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture, settings: list[str], named: str
) -> None:
    # Only train.lr was named, while the weight decay or the tensioner's alpha blew the update up.
    arguments = [part for setting in settings for part in ("--set", setting)]
    assert train("quick", *TINY, "--set", "train.epochs=2", *arguments, "--no-tensorboard", "--run-dir",
                 str(tmp_path / "run")) == 2
    assert named in single_error(capsys.readouterr().err)


def test_a_divergence_under_cagrad_does_not_name_its_c_as_the_tensioners_alpha(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # CAGrad keeps its c as `alpha`, which the hint read as direction.tensioner.alpha (now 5).
    assert train("quick", *TINY, "--set", "train.lr=1e30", "--set", "direction.name=cagrad", "--set",
                 "direction.cagrad_c=5", "--set", "direction.tensioner.formulation=off", "--no-tensorboard",
                 "--run-dir", str(tmp_path / "run")) == 2
    message = single_error(capsys.readouterr().err)
    assert "lower train.lr (now 1e+30), or check" in message and "alpha" not in message


def test_an_lr_that_overflows_adams_first_step_is_a_diverged_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Below float32's largest value, but Adam's first step divides it by 1 - beta1 = 0.1: torch's RuntimeError
    # and a traceback, logged as a bug in mamo.
    assert train("quick", *TINY, "--set", "train.lr=1e38", "--no-tensorboard", "--run-dir", str(tmp_path / "run")) == 2
    message = single_error(capsys.readouterr().err)
    assert "diverged at step 1" in message and "the optimizer's update overflowed float32; lower train.lr (now " \
        "1e+38)" in message


def test_another_dataset_under_a_preset_with_sizes_trains_and_notes_the_unused_sizes(tmp_path: Path) -> None:
    # quick sets split sizes; logic has fixed splits. Refusing them broke `--set data.name=logic` on quick.
    run = tmp_path / "run"
    assert train("quick", "--set", "data.name=logic", "--set", "model.backbone=mlp", "--set", "model.hidden=[2]",
                 "--set", "train.epochs=1", "--no-progress", "--no-tensorboard", "--run-dir", str(run)) == 0
    assert ("note: dataset 'logic' has fixed splits (the four input pairs in each), so data.train_size and "
            "data.val_size and data.test_size are not used.") in (run / "log.txt").read_text()


def test_reconstruction_targets_its_sigmoid_head_cannot_reach_get_a_note(plugin: Path, tmp_path: Path) -> None:
    # Standardised images trained silently against a head that outputs [0, 1] (a user's audit).
    for scale, noted in ((1.0, False), (3.0, True)):
        run = tmp_path / f"scale{scale}"
        assert train(*plugin_args(plugin, "standardised_images", run), "--set", "train.epochs=1",
                     "--set", f"data.options={{scale: {scale}}}", "--no-tensorboard") == 0
        log = (run / "log.txt").read_text()
        note = re.search(r"note: task 'image' has training targets in \[(\S+), (\S+)\], but its mlp head outputs only "
                         r"\[0, 1\]; scale the targets into \[0, 1\] for it to reach them\.", log)
        assert bool(note) == noted, log
        if noted:
            assert 0 <= float(note[1]) < 1 < float(note[2]) <= 3


def test_more_threads_than_cores_and_an_alpha_above_one_get_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 threads on 2 cores made an epoch 23 times slower without a word (a helper's edge-case audit).
    import os

    from mamo.config import load_config
    from mamo.session import setting_notes

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert setting_notes(load_config("quick", ["train.threads=2"])) == []
    assert setting_notes(load_config("quick", ["train.threads=64"])) == [
        "note: train.threads = 64 is more than the 2 cores this process may use, so torch's threads wait on each "
        "other (64 on 2 cores made an epoch 23 times slower, measured); set at most 2."]
    # α above 1: under 'thesis' c_t clips to 0 and the run equals α = 0, without a word before.
    assert setting_notes(load_config("quick", ["direction.tensioner.alpha=1"])) == []
    off = ["direction.tensioner.alpha=100", "direction.tensioner.formulation=off"]
    assert setting_notes(load_config("quick", off)) == []
    (note,) = setting_notes(load_config("quick", ["direction.tensioner.alpha=100"]))
    assert note.startswith("note: direction.tensioner.alpha = 100 is above the thesis' range [0, 1]")


def test_model_and_optimizer_settings_the_run_does_not_read_are_noted(tmp_path: Path) -> None:
    # Accepted without a word before: a width for the mlp under lenet, SGD's momentum under Adam.
    from mamo.config import PRESET_DIR, load_config
    from mamo.session import unused_settings_notes

    presets = sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))
    assert len(presets) > 5 and all(unused_settings_notes(load_config(name)) == [] for name in presets)
    assert unused_settings_notes(load_config("quick", ["model.latent=20", "train.momentum=0.9"])) == []
    assert unused_settings_notes(load_config("logic", ["model.backbone=timm:resnet18", "model.latent=3",
                                                       "train.optimizer=adamw", "train.momentum=0"])) == [
        "note: backbone 'timm:resnet18' does not use model.hidden or model.activation (mlp or cnn only) or "
        "model.latent "
        "(lenet only), so they have no effect.",
        "note: optimizer 'adamw' does not use train.momentum (sgd only), so it has no effect."]
    # The mlp and the cnn read hidden and activation alike: neither was told the other's were unused.
    for family in ("mlp", "cnn"):
        changed = [f"model.backbone={family}", "model.hidden=[8, 4]", "model.activation=tanh"]
        assert unused_settings_notes(load_config("quick", changed)) == []
    run = tmp_path / "run"
    assert train("quick", *TINY, "--set", "model.hidden=[8, 4]", "--set", "train.momentum=0.5", "--no-progress",
                 "--no-tensorboard", "--run-dir", str(run)) == 0
    log = (run / "log.txt").read_text()
    assert "note: backbone 'lenet' does not use model.hidden (mlp or cnn only), so it has no effect." in log
    assert "note: optimizer 'adam' does not use train.momentum (sgd only), so it has no effect." in log


def test_a_stopped_train_run_closes_its_tensorboard_logger(tmp_path: Path) -> None:
    # Before: the train command left its logger open on an error (a search closes its own), so an in-process
    # caller that still held the trainer kept an open event file with unflushed steps and a drawing thread.
    from mamo.board import TensorBoardLogger
    from mamo.train import run_train
    from mamo.trainer import Callback

    class StopAtStepTwo(Callback):
        def on_step(self, trainer, result) -> None:
            self.trainer = trainer
            if trainer.global_step == 2:
                raise MamoError("stopped by the test")

    stopper = StopAtStepTwo()
    config = load_config("quick", TINY_SETTINGS)
    with pytest.raises(MamoError, match="stopped by the test"):
        run_train(config, tmp_path / "run", progress=False, quiet=True, callbacks=[stopper])
    logger = next(c for c in stopper.trainer.callbacks if isinstance(c, TensorBoardLogger))
    assert logger.events._file.closed


def test_gradients_a_direction_finds_non_finite_are_a_diverged_run_naming_the_fix_once(tmp_path: Path, capsys) -> None:
    # SGD at 1e8: the losses are still finite at step 2, the gradients are not; the direction's check catches
    # them. Before, its own fix and the trainer's were both in the sentence. On the GPU machine (torch 2.11, 16
    # cores, on its GPU and on its CPU alike) the same run's gradients were still finite at that step while
    # their squared norms overflowed, which the direction names in its own words.
    run = tmp_path / "run"
    assert train("quick", *TINY, "--set", "train.optimizer=sgd", "--set", "train.lr=1e8", "--no-tensorboard",
                 "--run-dir", str(run)) == 2
    message = single_error(capsys.readouterr().err)
    assert message.startswith("training 'train' diverged at step ")
    assert "gradients are NaN or infinite" in message or "gradients' squared norms overflow" in message
    assert message.count("lower train.lr") == 1 and "lower train.lr (now 1e+08)" in message


def test_a_model_that_scores_nan_after_the_last_step_is_a_diverged_run(tmp_path: Path, capsys) -> None:
    # One step at 1e30: its loss is finite, the weights it leaves are not usable, and no step follows to
    # notice. Before, the run exited 0 and reported accuracies, with NaN losses in metrics.json.
    run = tmp_path / "run"
    assert train("quick", *TINY, "--set", "train.optimizer=sgd", "--set", "train.lr=1e30", "--set",
                 "train.batch_size=256", "--no-tensorboard", "--run-dir", str(run)) == 2
    message = single_error(capsys.readouterr().err)
    assert message.startswith("training 'train' diverged at step 1 (epoch 1 of the run): the validation loss of task")
    # Task names quoted: the logic set's task 'and' read as part of the sentence.
    assert "the validation loss of task 'left'" in message
    assert not (run / "metrics.json").exists()


def test_a_full_disk_at_the_end_is_one_sentence(tmp_path: Path, capsys, monkeypatch) -> None:
    write_bytes = Path.write_bytes

    def failing(error: type[OSError], code: int, reason: str):
        def write(self, data):  # the weights file (its temporary) fails; checkpoints (torch.save) are written as usual
            if self.name.startswith("weights.safetensors"):
                raise error(code, reason, str(self))
            return write_bytes(self, data)
        return write

    monkeypatch.setattr(Path, "write_bytes", failing(OSError, errno.ENOSPC, "No space left on device"))
    run = tmp_path / "run"
    assert train("quick", *TINY, "--no-tensorboard", "--run-dir", str(run)) == 2
    message = single_error(capsys.readouterr().err)
    assert message.startswith(f"could not write {run / 'weights.safetensors'} (No space left on device); free disk")
    assert (run / "checkpoints" / "last.pt").exists()  # nothing finished is removed: the run can --resume

    # Not a write failure of the machine: a bug, shown with its traceback.
    monkeypatch.setattr(Path, "write_bytes", failing(FileNotFoundError, errno.ENOENT, "No such file or directory"))
    with pytest.raises(FileNotFoundError):
        train("quick", *TINY, "--no-tensorboard", "--run-dir", str(tmp_path / "other"))


def test_logic_preset_solves_both_gates_on_its_default_seed(tmp_path: Path) -> None:
    # The thesis' protocol (mini-batches of two, 3,000 epochs): XOR is solved, not stuck at MSE 0.25.
    run = tmp_path / "logic"
    assert train("logic", "--set", "train.device=cpu", "--no-progress", "--no-tensorboard", "--run-dir", str(run)) == 0
    tasks = read_metrics(run)["tasks"]
    assert tasks["xor"]["mse"] < 1e-3 and tasks["and"]["mse"] < 1e-3, tasks


def test_missing_fashion_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "fashion"
    empty.mkdir()
    assert train("multifashion", "--set", f"data.root={empty}", "--run-dir", str(tmp_path / "run")) == 2
    message = single_error(capsys.readouterr().err)
    assert str(empty) in message and "dataset-fashion-mnist" in message and "data.root" in message


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("raises", "raised ValueError at "),  # then the plugin's line (tests/test_data.py checks it)
        ("wrong_shape", "task 'total'"),
        ("unknown_type", "unknown type 'keypoints'"),
        ("not_a_dict", "returned list"),
        ("missing_function", "has no function 'missing_function'"),
    ],
)
def test_bad_plugins_exit_2_with_one_sentence(
    plugin: Path, tmp_path: Path, capsys: pytest.CaptureFixture, function: str, expected: str
) -> None:
    assert train(*plugin_args(plugin, function, tmp_path / "run")) == 2
    message = single_error(capsys.readouterr().err)
    assert expected in message and str(plugin) in message
    assert function != "raises" or message.endswith(": the data server is down; fix the plugin.")


def test_a_bad_sample_deep_in_a_plugins_lazy_split_stops_the_run_with_one_sentence(
    plugin: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # It stopped with "IndexError: Target 2 is out of bounds" and a traceback in the middle of the first epoch.
    run = tmp_path / "run"
    assert train(*plugin_args(plugin, "late_fault", run)) == 2
    message = single_error(capsys.readouterr().err)
    # Found mid-run, so the folder stays, and the sentence says how to go on from it (it did not, an audit).
    assert message.endswith("sample 40 of the 'train' split has 2; fix the targets or the task spec, then continue "
                            f"with: python cli.py train --resume {run}.")
    assert (run / "log.txt").read_text().strip().endswith(message)  # the folder keeps why it stopped
    # A quiet run (a tune trial, an ablation's variant) is continued by the command that runs it, not by --resume.
    from mamo.train import run_train

    config = load_config("logic", [f"data.name={plugin}:late_fault", "data.options={}", "train.epochs=2",
                                   "model.hidden=[8]", "train.device=cpu"])
    with pytest.raises(MamoError) as failed:
        run_train(config, tmp_path / "quiet", progress=False, quiet=True, loggers=False)
    assert str(failed.value).endswith("sample 40 of the 'train' split has 2; fix the targets or the task spec.")


def test_existing_run_folder_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "done"
    run.mkdir()
    (run / "metrics.json").write_text('{"tasks": {}, "params": 1}')
    (run / "notes.txt").write_text("mine")
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    assert train("logic", "--set", "train.epochs=1", "--run-dir", str(run)) == 2
    message = single_error(capsys.readouterr().err)
    assert str(run) in message and "--run-dir" in message
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before


def test_free_run_dir_checks_without_creating(tmp_path: Path) -> None:
    config = load_config("logic")
    assert free_run_dir(tmp_path / "new", config, "train") == tmp_path / "new"
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert free_run_dir(tmp_path / "empty", config, "train") == tmp_path / "empty"  # an empty folder may be used
    (tmp_path / "empty" / "x").write_text("")
    with pytest.raises(MamoError, match="already exists"):
        free_run_dir(tmp_path / "empty", config, "train")


def test_runs_started_in_the_same_second_get_their_own_default_folders(tmp_path: Path, monkeypatch) -> None:
    import mamo.runs

    monkeypatch.setattr(mamo.runs, "RUNS_ROOT", tmp_path)
    monkeypatch.setattr(mamo.runs.time, "strftime", lambda fmt: "20261124-120000")
    config = load_config("logic")
    planned = [free_run_dir(None, config, "search") for _ in range(2)]  # both planned before either creates
    assert planned[0] == planned[1] == tmp_path / "20261124-120000-search-logic"
    made = [new_run_dir(None, config, "search", path) for path in planned]
    assert [path.name for path in made] == ["20261124-120000-search-logic", "20261124-120000-search-logic-2"]
    assert free_run_dir(None, config, "search").name == "20261124-120000-search-logic-3"
    with pytest.raises(MamoError, match="taken by another run"):  # a folder the user named is not renamed
        new_run_dir(made[0], config, "search", made[0])


def test_a_run_folder_below_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("")
    with pytest.raises(MamoError, match=r"lies below .*config.yaml, which is a file; pick another --run-dir"):
        free_run_dir(tmp_path / "config.yaml" / "sub", load_config("logic"), "train")


def test_run_folder_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "taken"
    run.write_text("a file")
    assert train("logic", "--run-dir", str(run)) == 2
    assert str(run) in single_error(capsys.readouterr().err)
    assert run.read_text() == "a file"


def test_config_written_to_the_run_is_the_resolved_one(runs: Path) -> None:
    raw = load_yaml((runs / "stl" / "config.yaml").read_text())
    assert raw["train"]["mode"] == "stl" and raw["data"]["test_size"] == 64 and raw["train"]["device"] == "cpu"


def test_a_failed_cache_write_keeps_the_previous_entry_and_leaves_no_temporary(tmp_path, monkeypatch):
    cache = BaselineCache(tmp_path)
    cache.put("key", {"tasks": {"left": {"accuracy": 0.5}}})

    def full_disk(self, text, **kwargs):
        Path.write_bytes(self, b"{\"tasks\": ")  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        cache.put("key", {"tasks": {"left": {"accuracy": 0.9}}})
    monkeypatch.undo()
    assert cache.get("key") == {"tasks": {"left": {"accuracy": 0.5}}}
    assert [p.name for p in tmp_path.iterdir()] == ["key.json"]


@pytest.mark.parametrize("damage", [b"{\"tasks\": ", b"\xff\xfe\x00not text", b"[0.5, 0.9]"])
def test_a_damaged_cache_entry_reads_as_missing_so_it_is_trained_again(tmp_path: Path, damage: bytes) -> None:
    # The README's promise for a damaged cached baseline. Bytes that are not UTF-8 (a disk error, another file under
    # the entry's name) raised UnicodeDecodeError, and JSON that is no result dict failed later as a bug would.
    (tmp_path / "key.json").write_bytes(damage)
    assert BaselineCache(tmp_path).get("key") is None


def test_opening_the_cache_removes_only_abandoned_temporaries(tmp_path: Path) -> None:
    # A kill during a save leaves `<key>.json.<pid>.tmp` or a checkpoint's temporary; another process, maybe on
    # another machine sharing the folder, may be writing a fresh one right now.
    cache = BaselineCache(tmp_path)
    cache.put("key", {"tasks": {}})
    abandoned = tmp_path / "other.pt.4242.tmp"
    fresh = tmp_path / "key.json.4343.tmp"
    for partial in (abandoned, fresh):
        partial.write_bytes(b"half a save")
    old = time.time() - ABANDONED_AFTER_SECONDS - 60
    os.utime(abandoned, (old, old))
    os.utime(tmp_path / "key.json", (old, old))  # an old finished entry is a result, not a temporary
    # A checkpoint beside its cached result: a kill between caching it and removing the checkpoint.
    (tmp_path / "key.pt").write_bytes(b"weights")
    (tmp_path / "training.pt").write_bytes(b"weights")  # no result yet: a stopped training, kept for the resume
    for path in ("key.pt", "training.pt"):
        os.utime(tmp_path / path, (old, old))
    BaselineCache(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.json", "key.json.4343.tmp", "training.pt"]
    BaselineCache(tmp_path / "not-yet-made")  # a cache folder no run has made yet is fine


def _hold_claim(cache: Path, key: str, owner: str, age: float = 0.0) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    claim = cache / f"{key}.claim"
    claim.write_text(owner)
    os.utime(claim, (time.time() - age, time.time() - age))
    return claim


def test_a_baseline_another_live_process_trains_is_waited_for_not_trained_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two searches started together each trained every baseline, the later ones "resuming" the first one's live
    # checkpoint. Here the test process's parent stands for the live process that holds the claim.
    import threading

    import mamo.cache as cache_module

    monkeypatch.setattr(cache_module, "WAIT_POLL_SECONDS", 0.05)
    config = load_config("quick", [*TINY_SETTINGS])
    key, cache = baseline_key(config, "hps", 1), tmp_path / "cache"
    claim = _hold_claim(cache, key, f"{socket.gethostname()} {os.getppid()} {_pid_namespace()}")
    result = {"tasks": {"left": {"accuracy": 0.25}, "right": {"accuracy": 0.5}}, "val": {}, "params": 1,
              "seconds_per_epoch": 1.0}
    log_path = tmp_path / "logs" / "log.txt"

    def finish_once_waited_for() -> None:
        # The other process finishes only after this one logged its wait; a fixed delay raced a slow CI machine.
        deadline = time.monotonic() + 60
        while "waiting for" not in (log_path.read_text() if log_path.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.02)
        BaselineCache(cache).put(key, result)

    other_process = threading.Thread(target=finish_once_waited_for)
    other_process.start()
    session = open_session(config, tmp_path / "logs", progress=False, quiet=True, cache_root=cache)
    (tmp_path / "logs").mkdir()
    assert cached_baseline(session, "hps", 1) == result  # the other process's, after it appeared
    other_process.join()
    log = log_path.read_text()
    assert f"HPS baseline: waiting for the process that trains it ({socket.gethostname()} {os.getppid()} " in log
    assert "equal weighting for" not in log and claim.exists()  # trained nothing, left the holder's claim alone


def test_the_networks_no_other_process_trains_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs started together share the baselines' work instead of queueing behind the first one's STL 'left'.
    import threading

    import mamo.cache as cache_module
    from mamo.baselines import cached_baselines

    monkeypatch.setattr(cache_module, "WAIT_POLL_SECONDS", 0.05)
    config = load_config("quick", [*TINY_SETTINGS])
    left, cache = baseline_key(config, "stl-left", 1), tmp_path / "cache"
    _hold_claim(cache, left, f"{socket.gethostname()} {os.getppid()} {_pid_namespace()}")
    other = {"tasks": {"left": {"accuracy": 0.25}}, "val": {"left": {"accuracy": 0.2, "loss": 2.0}}, "params": 7,
             "seconds_per_epoch": 1.0}
    logs = tmp_path / "logs"
    logs.mkdir()
    session = open_session(config, logs, progress=False, quiet=True, cache_root=cache)
    real = cache_module.BaselineCache.put

    def finish_left_once_waited_for(cache_of_other: BaselineCache) -> None:
        deadline = time.monotonic() + 60  # a fixed delay could race a slow machine's logging of the wait
        while "STL 'left': waiting" not in (logs / "log.txt").read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        real(cache_of_other, left, other)

    def put(self, key, result):  # the other process finishes 'left' once this one has trained the rest
        real(self, key, result)
        if key == baseline_key(config, "hps", 1):
            threading.Thread(target=finish_left_once_waited_for, args=(self,)).start()

    monkeypatch.setattr(cache_module.BaselineCache, "put", put)
    results = cached_baselines(session, ("stl", "hps"), 1)
    lines = [line.split(" ", 1)[1] for line in (logs / "log.txt").read_text().splitlines()]
    order = [next(i for i, line in enumerate(lines) if line.startswith(start)) for start in (
        "STL 'right': training it alone", "HPS baseline: equal weighting", "STL 'left': waiting for the process")]
    assert order == sorted(order)
    merged = results["stl"]
    assert merged["tasks"]["left"] == other["tasks"]["left"] and list(merged["tasks"]) == ["left", "right"]
    assert merged["params"] == 7 + BaselineCache(cache).get(baseline_key(config, "stl-right", 1))["params"]
    assert BaselineCache(cache).get(baseline_key(config, "stl", 1)) == merged


@pytest.mark.parametrize("holder", ["killed here", "silent elsewhere"])
def test_an_abandoned_claim_is_taken_over_and_released(tmp_path: Path, holder: str) -> None:
    from mamo.cache import CLAIM_STALE_SECONDS

    config = load_config("quick", [*TINY_SETTINGS])
    key, cache = baseline_key(config, "hps", 1), tmp_path / "cache"
    if holder == "killed here":
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        _hold_claim(cache, key, f"{socket.gethostname()} {gone} {_pid_namespace()}")
    else:
        _hold_claim(cache, key, "another-machine 77", age=CLAIM_STALE_SECONDS + 5)
    session = open_session(config, None, progress=False, quiet=True, cache_root=cache)
    result = cached_baseline(session, "hps", 1)
    assert BaselineCache(cache).get(key) == result
    assert sorted(p.name for p in cache.iterdir()) == [f"{key}.json"]  # no claim, no checkpoint left


def test_a_dead_process_id_means_an_abandoned_claim_only_in_the_same_pid_namespace(tmp_path: Path) -> None:
    # Containers sharing a host name have their own process ids: a live owner's pid may not exist here.
    from mamo.cache import _abandoned

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    here = _hold_claim(tmp_path, "here", f"{socket.gethostname()} {gone} {_pid_namespace()}")
    container = _hold_claim(tmp_path, "container", f"{socket.gethostname()} {gone} [4026530000]")
    assert _abandoned(here) and not _abandoned(container)


def test_opening_the_cache_removes_the_claim_a_kill_left_beside_a_cached_result(tmp_path: Path) -> None:
    # A SIGKILL between caching a result and letting its claim go left the claim there for good (a helper's audit).
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    cache = BaselineCache(tmp_path)
    for key in ("done", "training"):
        _hold_claim(tmp_path, key, f"{socket.gethostname()} {gone} {_pid_namespace()}")
    cache.put("done", {"tasks": {}})
    _hold_claim(tmp_path, "live", f"{socket.gethostname()} {os.getpid()} {_pid_namespace()}")
    cache.put("live", {"tasks": {}})
    BaselineCache(tmp_path)
    # Kept: a claim without a result (the next run takes it over) and one whose owner is alive.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.json", "live.claim", "live.json", "training.claim"]


def test_a_claim_is_kept_alive_by_its_thread_and_released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It was touched on training steps only: a long evaluation looked like a dead owner to the waiters.
    import mamo.cache as cache_module

    monkeypatch.setattr(cache_module, "CLAIM_TOUCH_SECONDS", 0.02)
    claim = BaselineCache(tmp_path).try_claim("key")
    assert claim is not None and BaselineCache(tmp_path).try_claim("key") is None  # held: a second one waits
    os.utime(claim.path, (0, 0))
    deadline = time.monotonic() + 60  # touched every 0.02 s; the bound only stops a broken toucher's test
    while claim.path.stat().st_mtime == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert claim.path.stat().st_mtime > time.time() - 60
    claim.release()
    assert not claim.path.exists() and not claim._toucher.is_alive()


def test_a_claim_taken_just_after_its_result_was_cached_is_let_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Looked for the result, none; the owner cached it and let go; this process took the claim: it trained again.
    cache = BaselineCache(tmp_path)
    real = BaselineCache.try_claim

    def owner_finishes_first(self, key):
        cache.put(key, {"tasks": {}})
        return real(self, key)

    monkeypatch.setattr(BaselineCache, "try_claim", owner_finishes_first)
    with cache.claim("key", lambda line: None, "HPS baseline") as claim:
        assert claim is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.json"]


def test_a_claim_that_cannot_be_written_is_not_left_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mamo.cache as cache_module

    def full_disk() -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "process_owner", full_disk)
    with pytest.raises(OSError):
        BaselineCache(tmp_path).try_claim("key")
    assert not (tmp_path / "key.claim").exists()  # an empty one would make others wait out its silence


def test_a_checkpoint_removed_by_another_process_just_before_it_is_read_is_no_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # exists() said yes, then another process cached the result and removed the checkpoint: FileNotFoundError.
    import mamo.session as session_module

    config = load_config("quick", [*TINY_SETTINGS])
    session = open_session(config, None, progress=False, quiet=True, cache_root=tmp_path)
    monkeypatch.setattr(session_module, "load_checkpoint", lambda path: (_ for _ in ()).throw(
        FileNotFoundError(2, "No such file or directory", str(path))))
    (tmp_path / "gone.pt").write_bytes(b"there when looked at")
    assert session_module._read_checkpoint(session, tmp_path / "gone.pt", discard_damaged=True) is None
