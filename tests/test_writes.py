"""Files that cannot be written (a file-size limit, a full disk): one sentence naming the file and the fix, the
earlier file intact and no partial one left."""

from __future__ import annotations

import contextlib
import errno
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_errors import single_error
from test_cli_inputs import make_run, run_cli

resource = pytest.importorskip("resource")  # RLIMIT_FSIZE: POSIX only


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """``ulimit -f`` in this process: a write past ``size`` bytes of any file fails with EFBIG (Python ignores
    SIGXFSZ), as under the audit's ``bash -c "ulimit -f 4; ..."``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "run")


def test_a_file_size_limit_is_one_sentence_with_its_own_fix(run_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # EFBIG was not a write failure: a run under `ulimit -f` ended with three chained tracebacks.
    out = tmp_path / "out"
    with file_size_limit(512):
        code, err = run_cli(["export", str(run_dir), "--format", "json", "--out", str(out)], capsys)
    assert code == 2
    assert single_error(err) == (f"could not write {out / 'architecture.json'} (File too large); raise the file-size "
                                 "limit (ulimit -f) or write to a file system that takes bigger files, then run the "
                                 "command again.")
    assert list(out.iterdir()) == []


def test_a_checkpoint_that_hits_the_file_size_limit_names_the_cause_and_keeps_the_previous_one(tmp_path: Path) -> None:
    # torch.save given a path turns the failed write into "[enforce fail at inline_container.cc:672] . unexpected
    # pos 32128 vs 32032", which the sentence quoted instead of the cause.
    import torch

    from mamo.checkpoint import save_checkpoint
    from mamo.errors import MamoError

    path = tmp_path / "phase-00-pretrain.pt"
    save_checkpoint(path, {"weights": torch.arange(8.0)})
    before = path.read_bytes()
    with file_size_limit(16 * 1024), pytest.raises(MamoError) as failed:
        save_checkpoint(path, {"weights": torch.zeros(64 * 1024)})  # 256 KiB
    assert str(failed.value) == (f"could not write the checkpoint {path} (File too large); raise the file-size limit "
                                 "(ulimit -f) or write to a file system that takes bigger files, then resume the run "
                                 "with --resume.")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert torch.equal(torch.load(path)["weights"], torch.arange(8.0))


# ---------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize(("format_", "name"), [("onnx", "model.onnx"), ("pt2", "model.pt2")])
def test_a_program_export_that_hits_the_limit_keeps_the_earlier_one_and_names_the_file(
        format_: str, name: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Both wrote straight to the final file: cut to the limit, then a traceback (onnx) or torch's "unexpected pos"
    # and an abort of the whole process (pt2, "terminate called", exit 134).
    out = tmp_path / "out"
    out.mkdir()
    before = b"an earlier export"
    (out / name).write_bytes(before)
    with file_size_limit(1024):
        code, err = run_cli(["export", str(run_dir), "--format", format_, "--out", str(out)], capsys)
    assert code == 2
    assert single_error(err).startswith(f"could not write {out / name} (File too large); raise the file-size limit")
    assert (out / name).read_bytes() == before and [p.name for p in out.iterdir()] == [name]


def test_an_onnx_export_with_its_weights_beside_it_moves_both_into_place(run_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The .onnx records its weights file's name, so both are written under their final names, then moved.
    onnxruntime = pytest.importorskip("onnxruntime")
    import torch

    from mamo import export as exporting

    monkeypatch.setattr(exporting, "ONNX_INLINE_BYTES", 0)
    exporting.export(run_dir, ["onnx"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    model = exporting.load_trained(run_dir)
    x = torch.randn(3, 6)
    outputs = onnxruntime.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"x": x.numpy()})
    for task, got in zip(model.tasks, outputs, strict=True):
        assert torch.allclose(torch.from_numpy(got), model(x)[task].detach(), atol=1e-5)


# -------------------------------------------------------------------------------------------------- pictures


def test_a_picture_export_that_hits_the_limit_keeps_the_earlier_one_and_names_the_file(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # matplotlib wrote straight to architecture.png: the earlier one was cut to the limit and the error, a
    # traceback (on a full disk "could not write (No space left on device)"), named no file.
    out = tmp_path / "out"
    assert run_cli(["export", str(run_dir), "--format", "png", "--out", str(out)], capsys)[0] == 0
    before = (out / "architecture.png").read_bytes()
    with file_size_limit(4096):
        code, err = run_cli(["export", str(run_dir), "--format", "png", "--out", str(out)], capsys)
    assert code == 2
    assert single_error(err).startswith(f"could not write {out / 'architecture.png'} (File too large); raise the")
    assert (out / "architecture.png").read_bytes() == before and [p.name for p in out.iterdir()] == ["architecture.png"]


def test_a_round_picture_on_a_full_disk_names_its_file_and_leaves_no_half(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mamo.board import TensorBoardLogger
    from mamo.config import Config

    logger = TensorBoardLogger(tmp_path, Config(), {}, background=False)

    def full_disk(self: Path, data: bytes) -> int:
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")  # a failed write() names no file

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError) as failed:
        logger._export("conflicts-round0.png", b"\x89PNG" + bytes(4096))
    monkeypatch.undo()
    logger.close()
    assert failed.value.filename == str(tmp_path / "plots" / "conflicts-round0.png")
    assert list((tmp_path / "plots").iterdir()) == []


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # set_metric_names, as tune calls it
def test_a_pareto_picture_that_hits_the_limit_names_its_file(tmp_path: Path) -> None:
    import optuna

    from mamo.tune_summary import plot_pareto

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_metric_names(["left.accuracy", "params"])  # as tune's studies name theirs
    for values in ([0.5, 2.0], [0.7, 3.0], [0.6, 1.0]):
        study.add_trial(optuna.trial.create_trial(values=values))
    path = tmp_path / "pareto.png"
    with file_size_limit(4096), pytest.raises(OSError) as failed:
        plot_pareto(study, path)
    assert failed.value.errno == errno.EFBIG and failed.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ read-only file system


def test_a_read_only_file_system_names_the_file_not_its_temporary(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Linux refuses even to remove a file never made there (EROFS), and that error, naming the temporary file
    # (architecture.json.<host>.<pid>.tmp), took the place of the write's own.
    from mamo.writes import write_text_atomically

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError) as failed:
        write_text_atomically(tmp_path / "architecture.json", "{}")
    assert failed.value.errno == errno.EROFS and failed.value.filename == str(tmp_path / "architecture.json")


def test_a_stop_during_a_checkpoint_write_stays_a_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C (or SIGTERM/SIGHUP) while torch wrote a checkpoint raised KeyboardInterrupt inside torch's C++ writer,
    # which reported "unexpected pos ..." instead: the run ended with "could not write the checkpoint ...; free disk
    # space or fix the folder's permissions" and exit 2, not as a stop (an audit's Ctrl-C on a dense search).
    import torch

    from mamo import writes as writing
    from mamo.checkpoint import save_checkpoint

    path = tmp_path / "phase-00-pretrain.pt"
    save_checkpoint(path, {"weights": torch.arange(8.0)})
    writes = []

    class StoppedFile(io.FileIO):
        def write(self, data) -> int:  # type: ignore[override]
            writes.append(len(data))
            if len(writes) == 2:  # the weights, while torch.save runs (not the flush at close)
                raise KeyboardInterrupt  # what mamo.stops.interrupt raises at a stop signal
            return super().write(data)

    monkeypatch.setattr(writing.io, "FileIO", StoppedFile)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"weights": torch.zeros(64 * 1024)})  # 256 KiB: several writes
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert torch.equal(torch.load(path)["weights"], torch.arange(8.0))


# ------------------------------------------------------------------------------------------------- durability


def test_checkpoints_and_weights_reach_the_disk_before_and_after_their_rename(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Renamed without an fsync, a checkpoint could read back empty after a power cut on file systems that do not
    # order the data before the rename (XFS, btrfs; ext4 only with auto_da_alloc).
    import os

    import torch

    from mamo import writes as writing
    from mamo.checkpoint import save_checkpoint

    synced, real_fsync, real_replace = [], os.fsync, Path.replace

    def recording_fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    def recording_replace(self: Path, target: Path) -> Path:
        synced.append(f"rename {Path(target).name}")
        return real_replace(self, target)

    monkeypatch.setattr(writing.os, "fsync", recording_fsync)
    monkeypatch.setattr(Path, "replace", recording_replace)
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"weights": torch.arange(4.0)})
    assert len(synced) == 3 and synced[0].endswith(".tmp") and Path(synced[0]).parent == path.parent
    assert synced[1:] == ["rename last.pt", str(path.parent)]  # the file, the rename, then the folder's entry
    assert torch.equal(torch.load(path)["weights"], torch.arange(4.0))
    synced.clear()
    writing.write_text_atomically(tmp_path / "report.md", "text")  # reports are rewritten at will: not flushed
    assert synced == ["rename report.md"]
    synced.clear()
    from mamo.cache import BaselineCache

    BaselineCache(tmp_path / ".baselines").put("key", {"tasks": {}})  # minutes of training: flushed
    assert synced[1:] == ["rename key.json", str(tmp_path / ".baselines")]


def test_a_folder_that_cannot_be_synced_still_takes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from mamo import writes as writing

    real_fsync = os.fsync

    def no_folder_sync(descriptor: int) -> None:
        if os.path.isdir(os.readlink(f"/proc/self/fd/{descriptor}")):
            raise OSError(errno.EINVAL, "Invalid argument")  # what some network file systems answer
        real_fsync(descriptor)

    monkeypatch.setattr(writing.os, "fsync", no_folder_sync)
    writing.replace_atomically(tmp_path / "weights.bin", lambda tmp: tmp.write_bytes(b"1234"), durable=True)
    assert (tmp_path / "weights.bin").read_bytes() == b"1234"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]
