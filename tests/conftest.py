"""Test setup shared by the suite: triton's interpreter on GPU-less machines,
skipping of tests marked ``gpu`` when no CUDA device is present, and the CUDA
emulator around tests marked ``cuda_emulated`` (the ``cuda-emulated`` cases of
factories.CUDA_EMULATED)."""
import contextlib
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


@pytest.fixture(autouse=True)
def _cuda_emulated_cases_run_under_the_emulator(request):
    """A case marked cuda_emulated runs inside pbrf_fast.testing.cuda_emulation()."""
    if request.node.get_closest_marker("cuda_emulated") is None:
        yield
        return
    from pbrf_fast.kernels import BackendUnavailable
    from pbrf_fast.testing import cuda_emulation

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(cuda_emulation())
        except BackendUnavailable as exc:
            pytest.skip(str(exc))
        yield
