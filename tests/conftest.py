"""Shared test settings."""

import os

import torch

# pytest -n 2 runs two workers on two cores: one intra-op thread each avoids oversubscription, which on a
# small machine makes every convolution many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
