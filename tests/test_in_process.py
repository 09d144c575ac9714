"""mamo called many times in one Python process, as from a notebook: what the process had set before a call (torch's
default dtype, gradients off) neither breaks the call nor changes its results, and comes back after it
(docs/python.md, "Many calls in one process")."""

from __future__ import annotations

import pytest
import torch

from mamo.config import load_config
from mamo.export import export, load_trained
from mamo.search import run_search
from mamo.train import run_train

SMALL = ["data.train_size=128", "data.val_size=64", "data.test_size=64", "train.batch_size=64", "train.epochs=3",
         "search.pretrain_epochs=1", "search.round_epochs=1", "search.final_epochs=null", "search.rounds=1",
         "search.baselines=false", "train.device=cpu"]


@pytest.fixture(scope="module")
def expected(tmp_path_factory, one_thread) -> dict:
    """The metrics of the search under torch's defaults."""
    return run_search(load_config("quick", SMALL), tmp_path_factory.mktemp("runs") / "defaults", progress=False,
                      quiet=True, loggers=False)


def test_a_float64_default_dtype_neither_breaks_a_run_nor_changes_it(tmp_path, expected) -> None:
    # Before: the network was built in float64 and met float32 data, and the run ended in a traceback ("Input
    # type (float) and bias type (double) should be the same"), as a bug in mamo.
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


@pytest.mark.parametrize("gradients_off", [torch.no_grad, torch.inference_mode])
def test_a_search_called_with_gradients_off_trains_as_under_the_defaults(tmp_path, expected, gradients_off) -> None:
    # Before: a call inside a notebook's `with torch.no_grad():` (or after torch.set_grad_enabled(False)) ended in
    # a traceback, "element 0 of tensors does not require grad", as a bug in mamo.
    with gradients_off():
        got = run_search(load_config("quick", SMALL), tmp_path / "run", progress=False, quiet=True, loggers=False)
        model = load_trained(tmp_path / "run")
        assert not torch.is_grad_enabled()  # the caller's setting comes back
    assert got["tasks"] == expected["tasks"] and got["val"] == expected["val"]
    assert not any(p.is_inference() for p in model.parameters())  # a network that can be trained further
