"""The CUDA kernels on CPU tensors: the emulated CUDA runtime and its context manager.

The kernels and launchers are the ones nvcc compiles into ``pbrf_fast._C_cuda``,
compiled by g++ against csrc/emulation; the emulator runs each block's threads
as cooperative fibers (real barriers, warp shuffles, per-block shared memory
filled with NaN) and turns a divergent barrier or a bad launch configuration
into a RuntimeError. It reaches the library through one seam,
:func:`pbrf_fast.kernels.registry.use_cuda_runtime`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from typing import Iterator

import torch

from ..kernels import registry

__all__ = ["EmulatedCudaRuntime", "cuda_emulation", "emulator_available"]

EMULATOR_MODULE = "pbrf_fast._C_cuda_emu"


def emulator_available() -> bool:
    """Whether this install carries the emulator module (built on request only)."""
    return importlib.util.find_spec(EMULATOR_MODULE) is not None


class EmulatedCudaRuntime(registry.CudaRuntime):
    """The "cuda" backend served by the emulator: CPU tensors, its one device and
    synchronous default stream, and scratch filled with NaN so that a kernel reading
    scratch before writing it fails the parity tests."""

    tensor_device = "cpu"
    emulated = True

    def status(self) -> tuple[bool, str]:
        return True, "CUDA kernels under the CPU emulator (pbrf_fast._C_cuda_emu)"

    def launch_args(self, t: torch.Tensor) -> tuple[int, int]:
        return 0, 0

    def scratch(self, shape, like: torch.Tensor) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
        if buffer.is_floating_point():
            buffer.fill_(float("nan"))
        return buffer


@contextlib.contextmanager
def cuda_emulation(thread_order: str = "forward", seed: int = 0) -> Iterator[object]:
    """Within the block, ``backend="cuda"`` runs on CPU tensors under the CUDA emulator.

    ``thread_order`` ("forward", "reverse", "shuffled" with ``seed``) is the order in
    which a block's threads (and blocks) run between barriers: a result that depends
    on it is a race. Slow: for tests on small problems. Yields the emulated module
    (``counters()``, ``reset()``, ``emulated``). Not thread-safe: it swaps the
    module-wide "cuda" backend for the block's duration.
    """
    try:
        emulator = importlib.import_module(EMULATOR_MODULE)
    except Exception as exc:
        raise registry.BackendUnavailable(
            f"CUDA emulation unavailable: import {EMULATOR_MODULE} failed ({type(exc).__name__}: {exc}); "
            "build with PBRF_FAST_CUDA_EMULATOR=1 (scripts/install.sh does)") from None
    emulator.reset()
    emulator.set_thread_order(thread_order, seed)
    previous = registry.use_cuda_runtime(EmulatedCudaRuntime(emulator))
    try:
        yield emulator
    finally:
        registry.use_cuda_runtime(previous)
        emulator.set_thread_order("forward", 0)
