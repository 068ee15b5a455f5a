"""Test setup shared by the suite: triton's interpreter on GPU-less machines,
and skipping of tests marked ``gpu`` when no CUDA device is present."""
import os

import pytest
import torch

# triton decides whether a kernel is interpreted when the kernel is defined
# (at pbrf_fast import), so this must happen before anything imports it. Only
# without a GPU: on a GPU machine the triton tests should run compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
