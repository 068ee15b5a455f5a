"""Which backend runs a kernel, and the checks every compiled backend needs.

Backends: "torch" (the pure-torch reference, always there), "cpu" (the OpenMP
extension ``pbrf_fast._C``), "cuda" (``pbrf_fast._C_cuda``) and "triton".
Compiled modules and triton are optional: import failures are recorded here
with their reason and reported by :func:`pbrf_fast.backends.backends`, never
raised at import.

:func:`cuda_emulation` runs the "cuda" backend on CPU tensors: the same CUDA
launchers and kernels, compiled for the CPU emulator of the CUDA execution
model (``pbrf_fast._C_cuda_emu``, csrc/emulation). It is how the CUDA code is
tested on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from typing import Callable, Iterator

import torch  # before the extensions: they then share torch's OpenMP runtime

BACKENDS = ("torch", "cpu", "cuda", "triton")
# Must match enum LossKind in csrc/common/host_device.h.
LOSS_KIND_CODES = {"mse": 0, "cross_entropy": 1, "bce": 2}
COMPILED_DTYPES = (torch.float32, torch.float64)
# Triton kernels load half types and compute in float32.
TRITON_DTYPES = COMPILED_DTYPES + (torch.float16, torch.bfloat16)


class BackendUnavailable(ValueError):
    """An explicitly requested backend cannot serve these tensors (the message says why)."""


def _optional_import(name: str):
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # any failure just means "backend unavailable"
        return None, f"import {name} failed: {type(exc).__name__}: {exc}"


cpu_extension, _cpu_import_error = _optional_import("pbrf_fast._C")
cuda_extension, _cuda_import_error = _optional_import("pbrf_fast._C_cuda")
triton, _triton_import_error = _optional_import("triton")
# Inside cuda_emulation(): the "cuda" backend serves CPU tensors through the emulator.
_cuda_emulated = False

# triton decides at kernel-definition time (our import) whether a kernel is
# interpreted; later changes to the variable do not affect kernels defined now.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_implementations: dict[tuple[str, str], Callable] = {}
# Ops whose "auto" choice on a device is not the default order, because the
# measurement says so (bench/RESULTS.md). Explicit backends are unaffected.
_auto_order: dict[tuple[str, str], tuple[str, ...]] = {}


def register(op_name: str, backend: str, implementation: Callable) -> None:
    """Ops register every backend they implement, built or not: :func:`resolve` says
    when a module is missing, and :func:`cuda_emulation` can serve "cuda" without one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _implementations[(op_name, backend)] = implementation


def prefer_on_auto(op_name: str, device_type: str, order: tuple[str, ...]) -> None:
    """Make ``backend="auto"`` try ``order`` (then torch) for ``op_name`` on ``device_type``."""
    _auto_order[(op_name, device_type)] = tuple(order)


def implementation(op_name: str, backend: str) -> Callable:
    return _implementations[(op_name, backend)]


def cuda_device_count() -> int:
    if cuda_extension is None:
        return 0
    try:
        return int(cuda_extension.device_count())
    except Exception:
        return 0


@functools.lru_cache(maxsize=None)
def _emulation_hint() -> str:
    if importlib.util.find_spec("pbrf_fast._C_cuda_emu") is None:
        return ""
    return "; pbrf_fast.kernels.cuda_emulation() runs its kernels on CPU tensors"


def backend_status(backend: str) -> tuple[bool, str]:
    """Whether a backend can run at all on this machine, and why (not)."""
    if backend == "torch":
        return True, f"pure-torch reference (torch {torch.__version__})"
    if backend == "cpu":
        if cpu_extension is None:
            return False, _cpu_import_error
        return True, "OpenMP kernels in pbrf_fast._C"
    if backend == "cuda":
        if cuda_extension is None:
            return False, (_cuda_import_error or "pbrf_fast._C_cuda not built") + _emulation_hint()
        if cuda_device_count() == 0:
            return False, f"pbrf_fast._C_cuda built, but {cuda_extension.status()}{_emulation_hint()}"
        return True, cuda_extension.status()
    if backend == "triton":
        if triton is None:
            return False, _triton_import_error
        if TRITON_INTERPRET:
            return True, f"triton {triton.__version__} (TRITON_INTERPRET=1: CPU tensors, interpreted)"
        if not torch.cuda.is_available():
            return False, (f"triton {triton.__version__} imported, but no CUDA device for torch; "
                           "set TRITON_INTERPRET=1 before import to run it on CPU tensors")
        return True, f"triton {triton.__version__} on CUDA tensors"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _why_not(op_name: str, backend: str, tensor: torch.Tensor) -> str:
    """Empty string if `backend` can run `op_name` on `tensor`, else the reason."""
    if (op_name, backend) not in _implementations:
        return f"{op_name} has no {backend} implementation"
    device = tensor.device.type
    if backend == "torch":
        return ""
    if backend == "cpu":
        if device != "cpu":
            return f"the cpu backend needs CPU tensors, got a {device} tensor"
        if cpu_extension is None:
            return _cpu_import_error
    elif backend == "cuda":
        wanted = "cpu" if _cuda_emulated else "cuda"
        if device != wanted:
            return (f"the {'emulated ' if _cuda_emulated else ''}cuda backend needs {wanted.upper()} "
                    f"tensors, got a {device} tensor")
        ok, reason = backend_status("cuda")
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
    if tensor.dtype not in dtypes:
        return f"the {backend} backend supports dtypes {[str(d) for d in dtypes]}, got {tensor.dtype}"
    return ""


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """True if autograd would track this call: "auto" then keeps the
    differentiable torch reference, since compiled backends are forward-only."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def resolve(op_name: str, tensor: torch.Tensor, backend: str = "auto") -> str:
    """Pick the backend for `op_name` on `tensor`'s device and dtype.

    "auto": CUDA tensors -> cuda, else triton, else torch; CPU tensors -> cpu,
    else torch -- unless the op set another order with :func:`prefer_on_auto`. An explicit backend that cannot serve the tensor raises
    BackendUnavailable naming the reason.
    """
    if backend == "auto":
        default = ("cuda", "triton") if tensor.device.type == "cuda" else ("cpu",)
        preference = _auto_order.get((op_name, tensor.device.type), default)
        for candidate in preference:
            if not _why_not(op_name, candidate, tensor):
                return candidate
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    reason = _why_not(op_name, backend, tensor)
    if reason:
        raise BackendUnavailable(f"{op_name}: backend {backend!r} unavailable: {reason}")
    return backend


# ---- argument checks shared by the op wrappers -------------------------------------------------

def loss_kind_code(loss_kind: str) -> int:
    try:
        return LOSS_KIND_CODES[loss_kind]
    except KeyError:
        raise ValueError(f"unknown loss_kind {loss_kind!r}; expected one of "
                         f"{sorted(LOSS_KIND_CODES)}") from None


def check_same_dtype_and_device(op_name: str, **tensors: torch.Tensor) -> None:
    """All tensors floating point, one dtype, one device; ValueError naming the culprit."""
    items = list(tensors.items())
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op_name}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op_name}: {name} must be floating point, got dtype {t.dtype}")
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise ValueError(f"{op_name}: dtype mismatch: {first_name} is {first.dtype} "
                             f"but {name} is {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op_name}: device mismatch: {first_name} is on {first.device} "
                             f"but {name} is on {t.device}")


def check_output_buffer(op_name: str, name: str, out: torch.Tensor, like: torch.Tensor,
                        shape: tuple[int, ...]) -> None:
    """A caller-provided output must match exactly: kernels write through its data_ptr."""
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{op_name}: {name} has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{op_name}: {name} must be {like.dtype} on {like.device}, "
                         f"got {out.dtype} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{op_name}: {name} must be contiguous (kernels write it in place)")


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def cuda_launch_args(t: torch.Tensor) -> tuple[int, int]:
    """(device ordinal, current stream handle) for launching on `t`'s device."""
    if _cuda_emulated and t.device.type == "cpu":
        return 0, 0  # the emulator's one device and its synchronous default stream
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def cuda_scratch(shape, like: torch.Tensor) -> torch.Tensor:
    """Uninitialised scratch (or output) for a CUDA launcher. Under :func:`cuda_emulation`
    it is filled with NaN, so a kernel that reads it before writing it shows up."""
    scratch = torch.empty(shape, dtype=like.dtype, device=like.device)
    if _cuda_emulated and scratch.is_floating_point():
        scratch.fill_(float("nan"))
    return scratch


@contextlib.contextmanager
def cuda_emulation(thread_order: str = "forward", seed: int = 0) -> Iterator[object]:
    """Within the block, ``backend="cuda"`` runs on CPU tensors under the CUDA emulator.

    The kernels and launchers are the ones nvcc compiles into ``pbrf_fast._C_cuda``;
    the emulator runs each block's threads as cooperative fibers (real barriers,
    warp shuffles, per-block shared memory filled with NaN) and turns a divergent
    barrier or a bad launch configuration into a RuntimeError. ``thread_order``
    ("forward", "reverse", "shuffled" with ``seed``) is the order in which a block's
    threads run between barriers: a result that depends on it is a race. Slow: for
    tests on small problems. Scratch from :func:`cuda_scratch` starts as NaN. Yields the
    emulated module (``counters()``, ``reset()``).
    Not thread-safe: it swaps the module-wide "cuda" backend for the block's duration.
    """
    global cuda_extension, _cuda_emulated
    emulator, error = _optional_import("pbrf_fast._C_cuda_emu")
    if emulator is None:
        raise BackendUnavailable(f"CUDA emulation unavailable: {error}")
    saved = cuda_extension, _cuda_emulated
    emulator.reset()
    emulator.set_thread_order(thread_order, seed)
    cuda_extension, _cuda_emulated = emulator, True
    try:
        yield emulator
    finally:
        cuda_extension, _cuda_emulated = saved
        emulator.set_thread_order("forward", 0)


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
