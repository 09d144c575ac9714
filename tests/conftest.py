"""Shared test settings."""

import os

import pytest
import torch

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
