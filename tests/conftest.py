"""Test setup shared by the suite: triton's interpreter on GPU-less machines,
skipping of tests marked ``gpu`` when no CUDA device is present, and the CUDA
emulator for tests parametrized with backend "cuda" on device "cpu"."""
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
def _cuda_backend_on_cpu_runs_emulated(request):
    """backend="cuda" with device="cpu" means the CUDA kernels under the CPU emulator
    (pbrf_fast._C_cuda_emu): the same launchers and kernels nvcc compiles."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    if params.get("backend") != "cuda" or params.get("device") != "cpu":
        yield
        return
    from pbrf_fast.kernels import registry
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(registry.cuda_emulation())
        except registry.BackendUnavailable as exc:
            pytest.skip(str(exc))
        yield
