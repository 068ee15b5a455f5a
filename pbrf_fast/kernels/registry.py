"""Which backend can run a kernel, and the rule that picks one.

Backends: "torch" (the pure-torch reference, always there), "cpu" (the OpenMP
extension ``pbrf_fast._C``), "cuda" (``pbrf_fast._C_cuda``) and "triton".
Compiled modules and triton are optional: import failures are recorded here
with their reason and reported by :func:`pbrf_fast.backends`, never raised at
import.

Every op module in this package has one planning function (``plan_<op>``)
that says what will run for a call and why, as a :class:`Plan`; the op itself
runs what its plan says and decides nothing else. :func:`plan_backend` is the
rule they share for picking a backend by device, dtype and autograd.

The CUDA backend is reached only through :class:`CudaRuntime` (its module,
where its tensors live, launch arguments and scratch buffers). Tests swap in
the CPU emulator of the CUDA execution model through :func:`use_cuda_runtime`,
the one seam for that (see :mod:`pbrf_fast.testing`); nothing else here knows
about emulation.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable

import torch  # before the extensions: they then share torch's OpenMP runtime

from ..errors import InputError, PBRFError

BACKENDS = ("torch", "cpu", "cuda", "triton")
# Must match enum LossKind in csrc/common/host_device.h.
LOSS_KIND_CODES = {"mse": 0, "cross_entropy": 1, "bce": 2}
COMPILED_DTYPES = (torch.float32, torch.float64)
# Triton kernels load half types and compute in float32.
TRITON_DTYPES = COMPILED_DTYPES + (torch.float16, torch.bfloat16)


class BackendUnavailable(PBRFError, ValueError):
    """An explicitly requested backend cannot serve these tensors (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one call of an op runs, and why.

    ``implementation`` names the code path (e.g. ``"cpu"``, ``"torch-blas"``,
    ``"mlp-fused"``); ``backend`` is the backend it runs on; ``reason`` is one line.
    """

    op: str
    implementation: str
    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op}: {self.implementation} [{self.backend}] - {self.reason}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _optional_import(name: str):
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # any failure just means "backend unavailable"
        return None, f"import {name} failed: {type(exc).__name__}: {exc}"


cpu_extension, _cpu_import_error = _optional_import("pbrf_fast._C")
triton, _triton_import_error = _optional_import("triton")

# triton decides at kernel-definition time (our import) whether a kernel is
# interpreted; later changes to the variable do not affect kernels defined now.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class CudaRuntime:
    """How the "cuda" backend reaches its kernels: the extension module, the device
    type its tensors live on, and how launchers get their stream and scratch."""

    tensor_device = "cuda"
    emulated = False

    def __init__(self, module, import_error: str = ""):
        self.module = module
        self.import_error = import_error

    def device_count(self) -> int:
        if self.module is None:
            return 0
        try:
            return int(self.module.device_count())
        except Exception:
            return 0

    def status(self) -> tuple[bool, str]:
        if self.module is None:
            return False, self.import_error or "pbrf_fast._C_cuda not built"
        if self.device_count() == 0:
            return False, f"pbrf_fast._C_cuda built, but {self.module.status()}"
        return True, self.module.status()

    def launch_args(self, t: torch.Tensor) -> tuple[int, int]:
        """(device ordinal, current stream handle) for launching on ``t``'s device."""
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return index, torch.cuda.current_stream(index).cuda_stream

    def scratch(self, shape, like: torch.Tensor) -> torch.Tensor:
        """Uninitialised scratch (or output) for a launcher, of ``like``'s dtype and device."""
        return torch.empty(shape, dtype=like.dtype, device=like.device)


_cuda = CudaRuntime(*_optional_import("pbrf_fast._C_cuda"))


def use_cuda_runtime(runtime: CudaRuntime) -> CudaRuntime:
    """Serve the "cuda" backend from ``runtime``; returns the one it replaces.

    The test-support seam: :func:`pbrf_fast.testing.cuda_emulation` uses it to run
    the CUDA kernels under the CPU emulator. Not thread-safe.
    """
    global _cuda
    previous, _cuda = _cuda, runtime
    return previous


def cuda_runtime() -> CudaRuntime:
    """The runtime now serving "cuda": part of the key of any cached plan, since
    :func:`use_cuda_runtime` can change what an explicit or "auto" backend gets."""
    return _cuda


def __getattr__(name):
    # registry.cuda_extension always names the module the current runtime serves.
    if name == "cuda_extension":
        return _cuda.module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cuda_launch_args(t: torch.Tensor) -> tuple[int, int]:
    return _cuda.launch_args(t)


def cuda_scratch(shape, like: torch.Tensor) -> torch.Tensor:
    return _cuda.scratch(shape, like)


def cuda_device_count() -> int:
    return _cuda.device_count()


_implementations: dict[tuple[str, str], Callable] = {}


def register(op_name: str, backend: str, implementation: Callable) -> None:
    """Ops register every backend they implement, built or not: the plan says when a
    module is missing, and a swapped CUDA runtime can serve "cuda" without one."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _implementations[(op_name, backend)] = implementation


def implementation(op_name: str, backend: str) -> Callable:
    return _implementations[(op_name, backend)]


def backend_status(backend: str) -> tuple[bool, str]:
    """Whether a backend can run at all on this machine, and why (not)."""
    if backend == "torch":
        return True, f"pure-torch reference (torch {torch.__version__})"
    if backend == "cpu":
        if cpu_extension is None:
            return False, _cpu_import_error
        return True, "OpenMP kernels in pbrf_fast._C"
    if backend == "cuda":
        return _cuda.status()
    if backend == "triton":
        if triton is None:
            return False, _triton_import_error
        if TRITON_INTERPRET:
            return True, f"triton {triton.__version__} (TRITON_INTERPRET=1: CPU tensors, interpreted)"
        if not torch.cuda.is_available():
            return False, (f"triton {triton.__version__} imported, but no CUDA device for torch; "
                           "set TRITON_INTERPRET=1 before import to run it on CPU tensors")
        return True, f"triton {triton.__version__} on CUDA tensors"
    raise InputError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def why_not(op_name: str, backend: str, dtype: torch.dtype, device: torch.device | str) -> str:
    """Empty string if ``backend`` can run ``op_name`` on tensors of ``dtype`` on
    ``device``, else the reason it cannot."""
    if (op_name, backend) not in _implementations:
        return f"{op_name} has no {backend} implementation"
    device = torch.device(device).type
    if backend == "torch":
        return ""
    if backend == "cpu":
        if device != "cpu":
            return f"the cpu backend needs CPU tensors, got a {device} tensor"
        if cpu_extension is None:
            return _cpu_import_error
    elif backend == "cuda":
        wanted = _cuda.tensor_device
        if device != wanted:
            return (f"the {'emulated ' if _cuda.emulated else ''}cuda backend needs {wanted.upper()} "
                    f"tensors, got a {device} tensor")
        ok, reason = _cuda.status()
        if not ok:
            return reason
    elif backend == "triton":
        if triton is None:
            return _triton_import_error
        if device == "cpu" and not TRITON_INTERPRET:
            return "triton on CPU tensors needs TRITON_INTERPRET=1 set before import"
        if device not in ("cpu", "cuda"):
            return f"triton runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}"
    dtypes = TRITON_DTYPES if backend == "triton" else COMPILED_DTYPES
    if dtype not in dtypes:
        return f"the {backend} backend supports dtypes {[str(d) for d in dtypes]}, got {dtype}"
    return ""


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """True if autograd would track this call: "auto" then keeps the
    differentiable torch reference, since compiled backends are forward-only."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _default_order(device_type: str) -> tuple[str, ...]:
    return ("cuda", "triton") if device_type == "cuda" else ("cpu",)


def plan_backend(op_name: str, dtype: torch.dtype, device, backend: str = "auto", *,
                 autograd: bool = False, auto_order: tuple[str, ...] | None = None) -> Plan:
    """The shared rule: which backend runs ``op_name`` on tensors of ``dtype`` on ``device``.

    "auto": with autograd the differentiable torch reference; else the first of
    ``auto_order`` (default: cuda, then triton, for CUDA tensors; the cpu extension
    for CPU tensors) that can serve the tensors, else torch. An explicit backend
    that cannot serve them raises :class:`BackendUnavailable` naming the reason.
    """
    device_type = torch.device(device).type
    if backend == "auto":
        if autograd:
            return Plan(op_name, "torch", "torch", "inputs require grad: the differentiable torch reference")
        order = _default_order(device_type) if auto_order is None else auto_order
        skipped = []
        for candidate in order:
            reason = why_not(op_name, candidate, dtype, device_type)
            if not reason:
                return Plan(op_name, candidate, candidate,
                            f"backend='auto': the compiled {candidate} kernel for {device_type} {dtype} tensors")
            skipped.append(f"{candidate}: {reason}")
        detail = "; ".join(skipped) if skipped else "the measured choice for this op"
        return Plan(op_name, "torch", "torch", f"backend='auto': torch reference ({detail})")
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    reason = why_not(op_name, backend, dtype, device_type)
    if reason:
        raise BackendUnavailable(f"{op_name}: backend {backend!r} unavailable: {reason}")
    return Plan(op_name, backend, backend, f"backend={backend!r} requested")


# ---- argument checks shared by the op wrappers -------------------------------------------------

def loss_kind_code(loss_kind: str) -> int:
    try:
        return LOSS_KIND_CODES[loss_kind]
    except KeyError:
        raise InputError(f"unknown loss_kind {loss_kind!r}; expected one of "
                         f"{sorted(LOSS_KIND_CODES)}") from None


def check_same_dtype_and_device(op_name: str, **tensors: torch.Tensor) -> None:
    """All tensors floating point, one dtype, one device; ValueError naming the culprit."""
    items = list(tensors.items())
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{op_name}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InputError(f"{op_name}: {name} must be floating point, got dtype {t.dtype}")
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise InputError(f"{op_name}: dtype mismatch: {first_name} is {first.dtype} "
                             f"but {name} is {t.dtype}")
        if t.device != first.device:
            raise InputError(f"{op_name}: device mismatch: {first_name} is on {first.device} "
                             f"but {name} is on {t.device}")


def check_output_buffer(op_name: str, name: str, out: torch.Tensor, like: torch.Tensor,
                        shape: tuple[int, ...]) -> None:
    """A caller-provided output must match exactly: kernels write through its data_ptr."""
    if tuple(out.shape) != tuple(shape):
        raise InputError(f"{op_name}: {name} has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != like.dtype or out.device != like.device:
        raise InputError(f"{op_name}: {name} must be {like.dtype} on {like.device}, "
                         f"got {out.dtype} on {out.device}")
    if not out.is_contiguous():
        raise InputError(f"{op_name}: {name} must be contiguous (kernels write it in place)")


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def triton_compute_dtype(t: torch.Tensor):
    """float64 stays float64; everything else computes in float32."""
    return triton.language.float64 if t.dtype == torch.float64 else triton.language.float32


def extension_args(struct_type, **fields):
    """The argument struct of a compiled entry point, every field given by name:
    ``ext.output_hessian_product(extension_args(ext.OutputHessianArgs, loss_kind=...,
    ..., threads=n))``. The struct's constructor (csrc/common/kernel_args_bindings.h)
    takes each field as a keyword, and a missing or unknown one raises TypeError
    naming it, so a forgotten argument never runs as a zero."""
    return struct_type(**fields)
