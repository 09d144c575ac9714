"""``mamo train --resume`` and the baseline cache's checkpoints: a stopped run, STL task or baseline continues
to the same result, a damaged checkpoint is retrained, and ``--resume`` refuses what it cannot continue."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from cli_errors import single_error

from mamo.baselines import cached_baseline
from mamo.cache import baseline_key
from mamo.cli import main
from mamo.config import Config, load_config
from mamo.errors import MamoError
from mamo.runs import FolderLock
from mamo.session import open_session
from mamo.train import run_train
from mamo.trainer import Callback


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int, description: str | None = None):
        self.epoch, self.description = epoch, description

    def on_step(self, trainer, result) -> None:  # in the next epoch: the epoch's checkpoint is written by then
        if trainer.epoch == self.epoch and self.description in (None, trainer.description):
            raise KeyboardInterrupt


RESUMABLE = ["train.epochs=3", "data.train_size=256", "data.val_size=64", "data.test_size=64", "train.device=cpu"]


@pytest.mark.parametrize(("seconds", "saved_epoch"), [(0, 2), (1e9, 1)])  # after every epoch | only the first
def test_a_stopped_train_resumes_to_the_same_result(tmp_path: Path, seconds: float, saved_epoch: int) -> None:
    config = load_config("quick", [*RESUMABLE, f"train.checkpoint_seconds={seconds}"])
    quiet = {"progress": False, "quiet": True, "loggers": False}
    whole = run_train(config, tmp_path / "whole", **quiet)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_train(config, cut, callbacks=[StopAfterEpoch(2)], **quiet)
    assert (cut / "checkpoints" / "last.pt").exists() and not (cut / "metrics.json").exists()
    assert (cut / "log.txt").read_text().splitlines()[-1].endswith(f"); continue with: python cli.py train "
                                                                   f"--resume {cut}")
    # It says what the resume starts from (the stop came after unsaved epochs: a helper's terminal audit).
    kept = "every finished epoch is checkpointed" if seconds == 0 else "checkpoints are at most 1e+09 s apart"
    assert f"stopped ({kept}" in (cut / "log.txt").read_text()
    (cut / "checkpoints" / "last.pt.4242.tmp").write_bytes(b"half")  # saves a SIGKILL cut short
    (cut / "metrics.json.4242.tmp").write_bytes(b"")
    resumed = run_train(load_config("logic"), cut, resume=True, resume_settings=["train.device=cpu"],
                        **quiet)  # the folder's own config is used, with a new place to run it
    assert "resuming" in (cut / "log.txt").read_text() and "with train.device=cpu" in (cut / "log.txt").read_text()
    log = (cut / "log.txt").read_text()
    assert f"resumed after epoch {saved_epoch} of 3" in log
    # The epoch lines count on from the checkpoint's epoch: the epochs after it ran again.
    after = log.split("resumed after")[1]
    assert [f"train epoch {e}/3:" in after for e in (1, 2, 3)] == [False, saved_epoch < 2, True]
    assert resumed["tasks"] == whole["tasks"] and resumed["val"] == whole["val"]
    assert (cut / "weights.safetensors").read_bytes() == (tmp_path / "whole" / "weights.safetensors").read_bytes()
    assert not (cut / "checkpoints" / "last.pt").exists()  # a finished run keeps best.pt and the weights
    assert not list((cut / "checkpoints").glob("*.tmp")) and not list(cut.glob("*.tmp"))


@pytest.mark.parametrize("direction", ["pcgrad", "upgrad", "imtl-g", "aligned-mtl"])
def test_a_stopped_train_resumes_to_the_same_weights_with_every_direction(tmp_path: Path, direction: str) -> None:
    # The test above runs the preset's mgda; pcgrad checkpoints a generator, the Gramian methods nothing of their
    # own. T = 2: the tensioner acts from the third step, so its norm history crosses the checkpoint.
    config = load_config("quick", [*RESUMABLE, "train.checkpoint_seconds=0", f"direction.name={direction}",
                                   "direction.tensioner.T=2"])
    quiet = {"progress": False, "quiet": True, "loggers": False}
    run_train(config, tmp_path / "whole", **quiet)
    with pytest.raises(KeyboardInterrupt):
        run_train(config, tmp_path / "cut", callbacks=[StopAfterEpoch(2)], **quiet)
    run_train(config, tmp_path / "cut", resume=True, **quiet)
    assert "resumed after epoch 2 of 3" in (tmp_path / "cut" / "log.txt").read_text()
    assert (tmp_path / "cut" / "weights.safetensors").read_bytes() == (tmp_path / "whole" / "weights.safetensors"
                                                                       ).read_bytes()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_a_run_stopped_on_the_gpu_resumes_on_the_cpu(tmp_path: Path) -> None:
    config = load_config("quick", [*RESUMABLE[:-1], "train.device=cuda", "train.checkpoint_seconds=0"])
    quiet = {"progress": False, "quiet": True, "loggers": False}
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_train(config, cut, callbacks=[StopAfterEpoch(2)], **quiet)
    resumed = run_train(None, cut, resume=True, resume_settings=["train.device=cpu"], **quiet)
    log = (cut / "log.txt").read_text()
    assert "on cuda" in log.split("resuming")[0] and "on cpu" in log.split("resuming")[1]
    assert "resumed after epoch 2 of 3" in log and resumed["environment"]["device"] == "cpu"


def test_a_setting_changed_on_resume_is_kept_for_the_next_resume(tmp_path: Path) -> None:
    # An audit: `--resume DIR --set train.device=cpu`, stopped again, printed a continue line without the --set,
    # and that line went back to the folder's old config.yaml (a GPU run then failed on the CPU machine).
    config = load_config("quick", [*RESUMABLE, "train.epochs=4", "train.checkpoint_seconds=0"])
    quiet = {"progress": False, "quiet": True, "loggers": False}
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_train(config, cut, callbacks=[StopAfterEpoch(2)], **quiet)
    with pytest.raises(KeyboardInterrupt):
        run_train(None, cut, resume=True, resume_settings=["train.checkpoint_seconds=0.5", "train.threads=1"],
                  callbacks=[StopAfterEpoch(3)], **quiet)
    saved = load_config(str(cut / "config.yaml"))
    assert (saved.train.checkpoint_seconds, saved.train.threads) == (0.5, 1)
    # ... but one the resume refuses is not: every later resume would fail on it.
    kept = (cut / "config.yaml").read_text()
    with pytest.raises(MamoError, match="train.device is 'cuda:99' but"):
        run_train(None, cut, resume=True, resume_settings=["train.device=cuda:99"], **quiet)
    assert (cut / "config.yaml").read_text() == kept
    assert (cut / "config.yaml").read_text().startswith("# mamo train run:")  # still names its command
    resumed = run_train(None, cut, resume=True, **quiet)
    assert resumed["config"]["train"]["threads"] == 1


def test_a_refused_weights_file_is_not_kept_by_a_resume_that_starts_over(tmp_path: Path) -> None:
    # A review: with no checkpoint yet, model.weights is read only when the network is built, after the
    # session opened, so a missing file was written into config.yaml and failed every later resume.
    config = load_config("quick", [*RESUMABLE, "model.backbone=timm:test_resnet", "model.head_hidden=4"])
    quiet = {"progress": False, "quiet": True, "loggers": False}
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_train(config, cut, callbacks=[StopAfterEpoch(0)], **quiet)  # before any checkpoint
    assert not (cut / "checkpoints" / "last.pt").exists()
    kept = (cut / "config.yaml").read_text()
    with pytest.raises(MamoError, match="weights file .*gone.pt does not exist"):
        run_train(None, cut, resume=True, resume_settings=[f"model.weights={tmp_path / 'gone.pt'}"], **quiet)
    assert (cut / "config.yaml").read_text() == kept


def test_a_stopped_stl_train_says_how_it_continues(tmp_path: Path) -> None:
    # Its log ended without a word: --resume refuses an STL folder, and the way on is a new run beside it.
    from mamo.errors import StopExplained

    config = load_config("quick", [*RESUMABLE, "train.mode=stl"])
    with pytest.raises(StopExplained):  # said how to continue: the CLI adds no generic line
        run_train(config, tmp_path / "stl", progress=False, quiet=True, loggers=False, callbacks=[StopAfterEpoch(2)])
    assert (tmp_path / "stl" / "log.txt").read_text().splitlines()[-1].endswith(
        f"); continue with: the same train command with a new --run-dir in {tmp_path} (its baseline cache, "
        f"{tmp_path / '.baselines'}, keeps the finished networks and the stopped one's epochs)")
    (stopped,) = (tmp_path / ".baselines").glob("*.pt")  # the stopped network's epochs, where the advice says
    run_train(config, tmp_path / "again", progress=False, quiet=True, loggers=False)
    assert not stopped.exists()  # taken up by the new run and finished


def test_a_stopped_stl_baseline_keeps_its_finished_tasks_and_continues_the_stopped_one(tmp_path: Path) -> None:
    config = load_config("quick", [*RESUMABLE, "train.checkpoint_seconds=0"])
    whole = cached_baseline(open_session(config, None, False, True, tmp_path / "clean"), "stl", 3)
    logs, cache = tmp_path / "logs", tmp_path / "cache"
    logs.mkdir()
    with pytest.raises(KeyboardInterrupt):  # stopped in task 'right', after its second epoch
        cached_baseline(open_session(config, logs, False, True, cache), "stl", 3,
                        callbacks=[StopAfterEpoch(2, "stl right")])
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".pt"]  # 'left' cached, 'right' checkpointed
    again = cached_baseline(open_session(config, logs, False, True, cache), "stl", 3)
    log = (logs / "log.txt").read_text()
    assert "STL 'left': reusing the cached result" in log and "resumed after epoch 2 of 3" in log
    assert {k: again[k] for k in ("tasks", "val", "params")} == {k: whole[k] for k in ("tasks", "val", "params")}
    assert not list(cache.glob("*.pt"))


def test_a_damaged_baseline_checkpoint_is_retrained_not_fatal(tmp_path: Path) -> None:
    config = load_config("quick", RESUMABLE)
    cache = tmp_path / "cache"
    cache.mkdir()
    key = baseline_key(config, "hps", 3)
    (cache / f"{key}.pt").write_bytes(b"half a checkpoint")  # a stop in the middle of a write, say
    logs = tmp_path / "logs"
    logs.mkdir()
    result = cached_baseline(open_session(config, logs, False, True, cache), "hps", 3)
    assert "is damaged; training from the start" in (logs / "log.txt").read_text()
    assert set(result["tasks"]) == {"left", "right"} and not (cache / f"{key}.pt").exists()


def test_a_train_run_holds_its_folder_while_it_runs_and_a_resume_beside_it_is_refused(tmp_path: Path, capsys) -> None:
    refusals = []

    class TryTheFolder(Callback):
        def on_epoch_end(self, trainer, metrics) -> None:
            with pytest.raises(MamoError) as refused:
                FolderLock(tmp_path / "r")
            refusals.append(str(refused.value))

    with pytest.raises(KeyboardInterrupt):
        run_train(load_config("quick", RESUMABLE), tmp_path / "r", progress=False, quiet=True, loggers=False,
                  callbacks=[TryTheFolder(), StopAfterEpoch(1)])
    assert refusals and "is in use by another mamo command that is still running" in refusals[0]
    with FolderLock(tmp_path / "r"):
        assert main(["train", "--resume", str(tmp_path / "r"), "--no-progress"]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"{tmp_path / 'r'} is in use by another mamo command that is still running; wait for it to end or stop it, "
        "then resume.")
    run_train(None, tmp_path / "r", progress=False, quiet=True, loggers=False, resume=True, callbacks=[TryTheFolder()])
    assert len(refusals) == 3  # the resumed run's epochs 2 and 3


def test_resume_refuses_finished_runs_and_the_other_commands_folders(tmp_path: Path, capsys) -> None:
    finished = tmp_path / "finished"
    run_train(load_config("quick", RESUMABLE), finished, progress=False, quiet=True, loggers=False)
    assert main(["train", "--resume", str(finished)]) == 2
    assert "has finished (metrics.json is there); nothing to resume" in single_error(capsys.readouterr().err)
    # A preset or --run-dir beside --resume was silently ignored (the run's own config.yaml and folder win).
    assert main(["train", "nonexistent_preset", "--resume", str(finished)]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"--resume continues {finished} with the config.yaml and folder it has, so the preset 'nonexistent_preset' "
        "would be ignored; leave it out, or start a new run without --resume.")
    assert main(["search", "--resume", str(finished), "--run-dir", str(tmp_path / "elsewhere")]) == 2
    assert f"so --run-dir {tmp_path / 'elsewhere'} would be ignored" in single_error(capsys.readouterr().err)
    # A file where the checkpoints folder belongs: it said the run starts again, then called last.pt corrupt.
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.yaml").write_text((finished / "config.yaml").read_text())
    (odd / "checkpoints").write_text("not a folder")
    assert main(["train", "--resume", str(odd)]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"{odd / 'checkpoints'} is a file where the run keeps its checkpoints folder; move the file away (or put the "
        "folder back), then resume again.")
    assert main(["search", "--resume", str(finished)]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"{finished} is a finished train run folder, not a search one; there is nothing to resume.")
    header, body = (finished / "config.yaml").read_text().split("\n", 1)
    assert header.startswith("# mamo train run:")
    # A search folder stopped before its first checkpoint is known by config.yaml's first line...
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "config.yaml").write_text(header.replace("train run", "search run") + "\n" + body)
    assert main(["train", "--resume", str(stopped)]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"{stopped} is a search run folder, not a train one; continue it with python cli.py search --resume "
        f"{stopped}.")
    # ... and one written before config.yaml named its command, by its checkpoints.
    searched = tmp_path / "searched"
    (searched / "checkpoints").mkdir(parents=True)
    (searched / "config.yaml").write_text(body)
    (searched / "checkpoints" / "phase-00-pretrain.pt").write_bytes(b"")
    assert main(["train", "--resume", str(searched)]) == 2
    assert "is a search run folder, not a train one" in single_error(capsys.readouterr().err)
    assert main(["train", "--resume", str(finished), "--set", "train.lr=0.5"]) == 2
    assert single_error(capsys.readouterr().err) == (
        "--set train.lr cannot change when a run resumes (the rest would not match what it computed so far); "
        "only train.device, train.threads, train.cuda_graphs, data.root, model.weights and "
        "train.checkpoint_seconds can, so start a new run.")  # a train run reads no search.keep_checkpoints
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "--resume needs an existing train run folder" in single_error(capsys.readouterr().err)
    stl = tmp_path / "stl"
    stl.mkdir()
    (stl / "config.yaml").write_text((finished / "config.yaml").read_text().replace("mode: mtl", "mode: stl"))
    assert main(["train", "--resume", str(stl)]) == 2
    assert "continue from the baseline cache instead" in single_error(capsys.readouterr().err)


def test_a_run_killed_before_it_wrote_its_config_can_be_started_again_in_its_folder(
        tmp_path: Path, capsys) -> None:
    # What a SIGKILL between claiming the folder and writing config.yaml leaves (found by a kill sweep): the
    # same command with the same --run-dir was refused ("not empty") and --resume said to pass a stopped run.
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml.4242.tmp").write_text("name: qu")
    assert main(["train", "--resume", str(folder)]) == 2
    assert single_error(capsys.readouterr().err) == (
        f"{folder} holds no config.yaml: the train that made it stopped before it started, so there is nothing to "
        f"resume; run the train again with --run-dir {folder}.")
    sets = [arg for text in RESUMABLE for arg in ("--set", text)]
    assert main(["train", "quick", *sets, "--run-dir", str(folder), "--no-progress", "--no-tensorboard"]) == 0
    assert (folder / "metrics.json").is_file() and not list(folder.glob("*.tmp"))


@pytest.mark.parametrize(("command", "text", "message"), [
    # Written before config.yaml was atomic: the kill sweep's resume trained the built-in defaults instead.
    ("train", "", "{config} is empty (its command was killed while writing it), so the run's settings are lost; "
                  "start a new run."),
    # A broken file is the run's config, not a preset.
    ("search", "train: {lr: [\n", "the run's config {config} is not valid YAML (expected the node content, but found "
                                   "'<stream end>', line 2 column 1); fix its syntax there."),
])
def test_a_config_yaml_that_cannot_be_resumed_is_one_sentence(tmp_path: Path, capsys, command, text, message) -> None:
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(text)
    assert main([command, "--resume", str(folder)]) == 2
    assert single_error(capsys.readouterr().err) == message.format(config=folder / "config.yaml")


@pytest.mark.parametrize("written", ["config.yaml", "metrics.json"])
def test_a_write_cut_short_leaves_no_half_file(tmp_path: Path, monkeypatch, written: str) -> None:
    # metrics.json marks a finished run and config.yaml is what --resume reads: a half-written one of either
    # made a killed run unfinishable or resumed it with the wrong settings.
    real_write = Path.write_text

    def cut_short(self: Path, text: str, *args, **kwargs) -> int:
        if self.name.startswith(written):
            real_write(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(KeyboardInterrupt):
        run_train(load_config("quick", RESUMABLE), tmp_path / "run", progress=False, quiet=True, loggers=False)
    assert not (tmp_path / "run" / written).exists()


def test_keep_best_skips_epochs_with_a_nan_validation_loss() -> None:
    import types

    import torch

    from mamo.trainer import KeepBest

    model = torch.nn.Linear(1, 1)
    keep = KeepBest()
    for epoch, loss in enumerate([float("nan"), 2.0, 1.0, float("nan"), 1.5], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        keep.on_epoch_end(types.SimpleNamespace(epoch=epoch, model=model), {"a": {"loss": loss}})
    assert keep.best_epoch == 3  # a NaN first epoch used to poison every later score, so nothing was kept
    keep.restore(model)
    assert model.weight.item() == 3.0


@pytest.mark.parametrize("name", ["meta", "mps", "xla"])
def test_a_device_torch_knows_but_mamo_does_not_train_on_is_one_sentence(name) -> None:
    from mamo.errors import MamoError
    from mamo.trainer import resolve_device

    # Before: meta raised NotImplementedError mid-run, mps and xla a RuntimeError traceback.
    with pytest.raises(MamoError, match=f"^train.device '{name}' is not a device mamo trains on; use auto, cpu"):
        resolve_device(name)


def test_a_numbered_cpu_is_refused_and_cpu_0_is_the_cpu() -> None:
    from mamo.errors import MamoError
    from mamo.trainer import resolve_device

    # cpu:1 was accepted and ran on the one CPU device.
    with pytest.raises(MamoError, match=r"^train.device 'cpu:1' names a CPU by number, but the CPU is one device; "
                                        r"use cpu \(and train.threads for how many cores\)\.$"):
        resolve_device("cpu:1")
    assert resolve_device("cpu:0").type == "cpu" and resolve_device("cpu").type == "cpu"


def test_a_cuda_ordinal_beyond_the_visible_devices_is_one_sentence(monkeypatch) -> None:
    import torch

    from mamo.errors import MamoError
    from mamo.trainer import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(MamoError, match=r"'cuda:7' but only 2 CUDA device\(s\) are visible; use cuda:0 to cuda:1"):
        resolve_device("cuda:7")


def test_a_numbered_gpu_is_made_current_for_runs_and_the_step_benchmark(monkeypatch, tmp_path) -> None:
    # Pinned memory and new contexts go to the current device: cuda:1 must not also set up GPU 0.
    import argparse

    import torch

    from mamo.bench import step as bench_step
    from mamo.session import make_current

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    for name in ("cpu", "cuda", "cuda:1"):
        make_current(torch.device(name))
    assert current == [torch.device("cuda:1")]

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(bench_step, "resolve_device", lambda name: torch.device("cuda:1"))
    monkeypatch.setattr(bench_step, "build_setup", stop)
    args = argparse.Namespace(device="cuda:1", quick=True, rounds=None, batch_sizes=None, setups=["lenet-m2"],
                              threads=None, clock="wall", precision="fp32")
    current.clear()
    with pytest.raises(Stop):
        bench_step.run(args)
    assert current == [torch.device("cuda:1")]
    current.clear()
    monkeypatch.setattr("mamo.session.check_train_settings", lambda config: torch.device("cuda:1"))
    monkeypatch.setattr("mamo.session.load_data", stop)
    with pytest.raises(Stop):
        open_session(load_config("quick"), None, progress=False, quiet=True, cache_root=tmp_path)
    assert current == [torch.device("cuda:1")]


def test_batches_are_pinned_only_when_they_are_unpinned_cpu_tensors(monkeypatch) -> None:
    # A plugin may hand out tensors already on the GPU; pin_memory raises on anything but a CPU tensor.
    import types

    import torch

    from mamo.trainer import Trainer

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.device.type) or self)
    moved = types.SimpleNamespace(device=torch.device("cuda"))
    moved._move = lambda tensor: Trainer._move(moved, tensor)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: self)
    Trainer._to_device(moved, torch.zeros(2), {"a": torch.zeros(2, device="meta")})
    assert pinned == ["cpu"]


@pytest.mark.parametrize(("edit", "message"), [
    (("optimizer: adam", "optimizer: sgd"), "sets train.optimizer to 'sgd' but the run's checkpoints were computed "
                                            "with 'adam'"),
    (("name: multimnist\n", "name: multimnist_sum\n"), "sets data.name to 'multimnist_sum' but"),  # was a KeyError
])
def test_resume_refuses_a_config_yaml_edited_since_the_checkpoint(tmp_path: Path, capsys, edit, message) -> None:
    import torch

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_train(load_config("quick", RESUMABLE), cut, progress=False, quiet=True, loggers=False,
                  callbacks=[StopAfterEpoch(1)])
    saved = (cut / "config.yaml").read_text()
    assert edit[0] in saved
    (cut / "config.yaml").write_text(saved.replace(edit[0], edit[1], 1))
    assert main(["train", "--resume", str(cut), "--set", "train.device=cpu"]) == 2
    error = single_error(capsys.readouterr().err)
    assert message in error and error.endswith("; undo the edit, or start a new run for the new value.")
    assert main(["train", "--resume", str(cut), "--set", "train.checkpoint_seconds=5"]) == 2  # still refused
    capsys.readouterr()
    # A checkpoint written before checkpoints recorded the config is not checked (and still loads).
    last = cut / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)
    assert state.pop("config")["train"]["optimizer"] == "adam"
    torch.save(state, last)
    (cut / "config.yaml").write_text(saved.replace("device: auto", "device: cpu"))
    assert main(["train", "--resume", str(cut), "--no-progress", "--no-tensorboard"]) == 0
    assert (cut / "metrics.json").exists()


def test_where_it_runs_and_where_its_data_lies_may_change_on_resume_what_it_computes_may_not(tmp_path: Path) -> None:
    from mamo.errors import MamoError
    from mamo.resume import check_resumed_config

    state = {"config": load_config("quick").to_dict()}
    moved = load_config("quick", ["train.device=cpu", "data.root=/elsewhere", "train.checkpoint_seconds=5"])
    check_resumed_config(moved, state, tmp_path)  # another machine, the same computation
    with pytest.raises(MamoError, match="sets data.seed to 7 but the run's checkpoints were computed with 0"):
        check_resumed_config(load_config("quick", ["data.seed=7"]), state, tmp_path)
    with pytest.raises(MamoError, match="sets search.final_epochs to 1 but the run's checkpoints were computed with "
                                        "null;"):  # the value as config.yaml writes it
        check_resumed_config(load_config("quick", ["search.final_epochs=1"]), state, tmp_path)
    # Neither the run's name nor the tune section (read by tune only) changes what a run computes.
    check_resumed_config(load_config("quick", ["name=renamed", "tune.trials=5", "tune.lr=[0.01, 0.1]"]), state,
                         tmp_path)


EDITABLE_PLUGIN = """
import torch
from mamo.data import TensorTaskDataset


def build(*, seed, root):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(seed))
    data = TensorTaskDataset(x, {"a": (x[:, 0] > 0).long(), "b": (x[:, 1] > 0).long()})
    two = {"type": "classification", "classes": 2}
    return {"train": data, "val": data, "test": data, "tasks": {"a": two, "b": two}}
"""


def stopped_plugin_run(tmp_path: Path) -> tuple[Path, Config, dict]:
    """A train run of EDITABLE_PLUGIN stopped after its first epoch's checkpoint (in tmp_path/run), the plugin
    older than the run; the plugin file, the config and the quiet run options."""
    import os
    import time

    plugin = tmp_path / "plugin.py"
    plugin.write_text(EDITABLE_PLUGIN)
    os.utime(plugin, (time.time() - 60, time.time() - 60))
    config = load_config("logic", [f"data.name={plugin}:build", "data.options={}", "model.hidden=[8]",
                                   "train.epochs=2", "train.checkpoint_seconds=0", "train.device=cpu"])
    quiet = {"progress": False, "quiet": True, "loggers": False}
    with pytest.raises(KeyboardInterrupt):
        run_train(config, tmp_path / "run", callbacks=[StopAfterEpoch(1)], **quiet)
    return plugin, config, quiet


def edit_after_the_run_started(plugin: Path, run_dir: Path) -> None:
    import os

    plugin.write_text(EDITABLE_PLUGIN.replace("> 0).long()}", "> 1).long()}"))
    later = (run_dir / "config.yaml").stat().st_mtime + 10  # a file system's coarse clock, too
    os.utime(plugin, (later, later))


@pytest.mark.parametrize("edited", [False, True])
def test_a_run_resumed_after_its_plugin_was_edited_says_so(tmp_path: Path, edited: bool) -> None:
    plugin, config, quiet = stopped_plugin_run(tmp_path)
    if edited:
        edit_after_the_run_started(plugin, tmp_path / "run")
    run_train(config, tmp_path / "run", resume=True, **quiet)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert ("note: the data plugin" in log) == edited
    if edited:  # a train run has no baselines of its own (the note named "a search's baselines" in every run)
        assert (f"note: the data plugin {plugin} changed after this run started; the resumed run trains and tests on "
                "what it returns now, while its epochs before the stop saw the old data.") in log
        from mamo.data_plugins import plugin_edited_note

        assert plugin_edited_note(f"{plugin}:build", tmp_path / "run" / "config.yaml", baselines=True).endswith(
            "while its epochs before the stop and its baselines saw the old data.")  # a search's


def test_a_run_resumed_without_a_checkpoint_after_its_plugin_was_edited_says_it_starts_over(tmp_path: Path) -> None:
    # The note said the epochs before the stop saw the old data; there were none, the run starts again.
    plugin, config, quiet = stopped_plugin_run(tmp_path)
    (tmp_path / "run" / "checkpoints" / "last.pt").unlink()
    edit_after_the_run_started(plugin, tmp_path / "run")
    run_train(config, tmp_path / "run", resume=True, **quiet)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert (f"note: the data plugin {plugin} changed after this run started; the run starts over on what it "
            "returns now.") in log
    assert "epochs before the stop" not in log


def test_a_resume_from_another_folder_says_where_to_run_it_not_to_fix_data_name(tmp_path: Path, monkeypatch) -> None:
    # "fix the path in data.name", which --resume then refused to change (a user audit): a relative plugin path
    # is read from the current folder, so the fix is to resume from the folder the run started in.
    import shutil

    plugin, config, quiet = stopped_plugin_run(tmp_path)
    started = tmp_path / "project"
    started.mkdir()
    shutil.copy(plugin, started / "own.py")
    monkeypatch.chdir(started)
    relative = load_config("logic", ["data.name=own.py:build", "data.options={}", "model.hidden=[8]",
                                     "train.epochs=2", "train.checkpoint_seconds=0", "train.device=cpu"])
    with pytest.raises(KeyboardInterrupt):
        run_train(relative, tmp_path / "rel", callbacks=[StopAfterEpoch(1)], **quiet)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MamoError) as refused:
        run_train(None, tmp_path / "rel", resume=True, **quiet)
    assert str(refused.value) == (f"data plugin file 'own.py' of {tmp_path / 'rel'} was not found from {tmp_path}; "
                                  "run --resume from the folder the run started in, or put the plugin back where "
                                  "data.name says.")
    monkeypatch.chdir(started)
    run_train(None, tmp_path / "rel", resume=True, **quiet)  # from where it started: it finishes
    assert (tmp_path / "rel" / "metrics.json").is_file()


def test_a_run_resumes_after_its_initial_weights_file_is_gone(tmp_path: Path) -> None:
    # The checkpoint holds every weight: continuing on a machine without the model.weights file needs no file.
    import timm
    import torch

    weights = tmp_path / "test_resnet.pt"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), weights)
    config = load_config("quick", [*RESUMABLE, "model.backbone=timm:test_resnet", f"model.weights={weights}"])
    quiet = {"progress": False, "quiet": True, "loggers": False}
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_train(config, cut, callbacks=[StopAfterEpoch(1)], **quiet)
    weights.unlink()
    run_train(config, cut, resume=True, **quiet)
    assert (cut / "metrics.json").exists()
    assert "resumed after epoch 1 of 3" in (cut / "log.txt").read_text()


def test_resume_refuses_data_of_other_shapes_than_the_checkpoint_was_trained_on(tmp_path: Path) -> None:
    from mamo.checkpoint import check_resumed_data
    from mamo.errors import MamoError
    from mamo.graph import build_hps_graph, graph_to_dict
    from mamo.spaces import create_space
    from mamo.tasks import parse_tasks

    tasks = parse_tasks({"depth": {"type": "depth", "shape": [1, 32, 48]},
                         "seg": {"type": "segmentation", "classes": 3, "shape": [32, 48]}}, "test")
    graph = build_hps_graph(create_space(load_config("quick", ["model.backbone=timm:test_resnet"]).model, (3, 32, 48)),
                            tasks)
    state = {"graph": graph_to_dict(graph)}
    check_resumed_data((3, 32, 48), tasks, state, tmp_path)  # the same data elsewhere: accepted
    check_resumed_data((3, 24, 40), tasks, None, tmp_path)  # no checkpoint: nothing to compare
    with pytest.raises(MamoError) as raised:
        check_resumed_data((3, 24, 40), tasks, state, tmp_path)
    assert str(raised.value) == (f"the data gives inputs of shape (3, 24, 40) but the checkpoints in {tmp_path} were "
                                 "trained on (3, 32, 48); point data.root at the run's own data, or start a new run.")
    other = parse_tasks({"depth": {"type": "depth", "shape": [1, 32, 48]},
                         "seg": {"type": "segmentation", "classes": 7, "shape": [32, 48]}}, "test")
    with pytest.raises(MamoError, match="the data's task 'seg' is .*'classes': 7.* but in the checkpoints in .* it "
                                        r"was .*'classes': 3.*; point data.root at the run's own data \(or undo the "
                                        r"edit of the data plugin's task spec\), or start a new run\.$"):
        check_resumed_data((3, 32, 48), other, state, tmp_path)
    fewer = {"depth": tasks["depth"]}
    with pytest.raises(MamoError, match="the data has the tasks depth but the checkpoints .* on depth, seg"):
        check_resumed_data((3, 32, 48), fewer, state, tmp_path)


def test_a_stop_python_dropped_is_raised_again_at_the_next_step() -> None:
    # A KeyboardInterrupt raised while a weakref callback runs (the garbage collector's, often, in training) is
    # only reported; a stop signal's handler also sets STOP_REQUESTED, which the trainer checks every step.
    from mamo.session import build_network, make_trainer
    from mamo.stops import STOP_REQUESTED

    config = load_config("quick", RESUMABLE)
    session = open_session(config, None, progress=False, quiet=True)
    trainer = make_trainer(session, build_network(session), config.direction)
    STOP_REQUESTED.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(1)
        assert trainer.global_step == 0
    finally:
        STOP_REQUESTED.clear()


def test_sigterm_stops_a_train_run_as_ctrl_c_does(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    root = Path(__file__).parents[1]
    command = [sys.executable, str(root / "cli.py"), "train", "quick", "--set", "train.epochs=200", "--set",
               "data.train_size=256", "--set", "data.val_size=64", "--set", "data.test_size=64", "--set",
               "train.device=cpu", "--no-tensorboard", "--no-progress", "--run-dir", str(run)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = run / "log.txt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "epoch 2/200" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert log.read_text().splitlines()[-1].endswith(f"); continue with: python cli.py train --resume {run}")
    # The log line, on the terminal too, says how to continue: no generic "interrupted" line after it.
    assert f"); continue with: python cli.py train --resume {run}" in err
    assert "mamo: interrupted" not in err and "Traceback" not in err


TRAIN_QUIET = {"progress": False, "quiet": True, "loggers": False}


class ValPerEpoch(Callback):
    def __init__(self):
        self.val = []

    def on_epoch_end(self, trainer, metrics) -> None:
        self.val.append(metrics)


def test_a_trained_network_is_its_best_validation_epoch(tmp_path, monkeypatch):
    # As in a search's final phase: every score worse than the one before makes the first epoch the best, and
    # train's result (and weights) must be that epoch's.
    scores = itertools.count()
    monkeypatch.setattr("mamo.trainer.selection_score", lambda metrics, reference: float(next(scores)))
    config = load_config("quick", RESUMABLE)
    epochs = ValPerEpoch()
    metrics = run_train(config, tmp_path / "r", callbacks=[epochs], **TRAIN_QUIET)
    assert len(epochs.val) == 3 and epochs.val[0] != epochs.val[-1]
    assert metrics["val"] == epochs.val[0]


def test_train_resume_help_lists_only_the_settings_a_train_run_reads(capsys) -> None:
    # It offered search.keep_checkpoints, a setting no train run reads (a user audit); search's lists it.
    for command, listed in (("train", False), ("search", True)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "train.checkpoint_seconds" in help_text and ("search.keep_checkpoints" in help_text) == listed
