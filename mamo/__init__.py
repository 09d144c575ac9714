"""mamo: grow multi-task networks where tasks fight (MAMO gradient mediative kernels + task tensioners)."""

__version__ = "0.1.0"
