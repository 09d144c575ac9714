"""mamo called many times in one Python process, as from a notebook: what the process had set before a call (torch's
default dtype) neither breaks the call nor changes its results, and comes back after it (docs/python.md, "Many
calls in one process")."""

from __future__ import annotations

import torch

from mamo.config import load_config
from mamo.export import export, load_trained
from mamo.search import run_search
from mamo.train import run_train

SMALL = ["data.train_size=128", "data.val_size=64", "data.test_size=64", "train.batch_size=64", "train.epochs=3",
         "search.pretrain_epochs=1", "search.round_epochs=1", "search.final_epochs=null", "search.rounds=1",
         "search.baselines=false", "train.device=cpu"]


def test_a_float64_default_dtype_neither_breaks_a_run_nor_changes_it(tmp_path, one_thread) -> None:
    # Before: the network was built in float64 and met float32 data, and the run ended in a traceback ("Input
    # type (float) and bias type (double) should be the same"), as a bug in mamo.
    expected = run_search(load_config("quick", SMALL), tmp_path / "float32", progress=False, quiet=True,
                          loggers=False)
    torch.set_default_dtype(torch.float64)
    try:
        got = run_search(load_config("quick", SMALL), tmp_path / "float64", progress=False, quiet=True,
                         loggers=False)
        assert torch.get_default_dtype() == torch.float64  # the notebook's setting comes back
        trained = run_train(load_config("quick", SMALL), tmp_path / "train", progress=False, quiet=True,
                            loggers=False)
        model = load_trained(tmp_path / "float64")
        # Its example input was a float64 zeros tensor: torch.export refused the float32 network.
        (program,) = export(tmp_path / "float64", "pt2", out_dir=tmp_path / "export")
    finally:
        torch.set_default_dtype(torch.float32)
    assert got["tasks"] == expected["tasks"] and got["val"] == expected["val"]
    assert trained["tasks"]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model(torch.rand(2, 1, 28, 28, dtype=torch.float32))["left"].dtype == torch.float32
    assert program.is_file()
