"""Files that cannot be written (a file-size limit, a full disk): one sentence naming the file and the fix, the
earlier file intact and no partial one left."""

from __future__ import annotations

import contextlib
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
