"""Test support for pbrf_fast's own test suite (and for contributors' kernels).

:func:`cuda_emulation` runs the "cuda" backend's kernels on CPU tensors under the
CPU emulator of the CUDA execution model. The emulator module
(``pbrf_fast._C_cuda_emu``) is built only on request (``PBRF_FAST_CUDA_EMULATOR=1``,
as ``scripts/install.sh`` does); a default install does not contain it and
:func:`cuda_emulation` then raises :class:`~pbrf_fast.kernels.BackendUnavailable`.
"""
from .cuda_emulation import EmulatedCudaRuntime, cuda_emulation, emulator_available

__all__ = ["EmulatedCudaRuntime", "cuda_emulation", "emulator_available"]
