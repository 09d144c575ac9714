"""Shared test settings."""

import os

import pytest

# OpenMP threads that sleep while they wait, for this process and the commands the tests start, unless the
# environment chose: pytest -n 2 runs two workers, each starting commands with two threads on two cores, and
# libgomp's default spin then takes the core another process needs (docs/performance.md, "Threads on a busy
# machine"). Set before torch loads libgomp, which reads it once.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402

# pytest -n 2 runs two workers on two cores: one intra-op thread each avoids oversubscription, which on a
# small machine makes every convolution many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: with two intra-op threads on a loaded machine, OpenMP barriers dominate every tiny op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's default float32 kernels may add in any order (on an H200 two runs of the same steps differed by
    4e-7 in a loss after one step, both still eager, and by 0.2 after 20): the comparison asks for its
    deterministic ones and IEEE float32, under which graphed and eager training were identical to the last bit
    there."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved
