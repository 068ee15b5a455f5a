"""``kernel``: the exact GNH solve in output space (Woodbury; :mod:`.output_space`)."""
from __future__ import annotations

import dataclasses
import time

from .common import SolveResult, check_columns, check_memory, finish, resolve_tol
from .options import InverseOptions, option

# The output-space solver keeps about three (N*C)^2 float64 matrices.
KERNEL_MEMORY_BYTES = 4 << 30


@dataclasses.dataclass
class KernelOptions(InverseOptions):
    """Options of the output-space (``kernel``) solve."""

    tol: float | None = option(None, "relative residual ||A x - b|| / ||b|| a column must meet to count as "
                                     "converged (None: 1e-6 in float64, 1e-4 in float32)")
    compute_residual: bool = option(True, "measure the true residual with one more operator product", cli=False)


# ---------------------------------------------------------------------- kernel
def kernel(op, B, options: KernelOptions) -> SolveResult:
    """Exact GNH solve in output space (Woodbury); see :mod:`.output_space`."""
    from .output_space import OutputSpaceSolver

    start = time.perf_counter()
    B2 = check_columns(op, B)
    tol = resolve_tol(options.tol, B2.dtype)
    outputs = op.num_examples * op.problem.num_outputs
    if "output_space" not in op._cache:  # a cached factorisation needs no new memory
        check_memory("kernel", 3 * 8 * outputs ** 2, f"N*C = {outputs} training outputs' float64 Gram matrices",
                     op.device)
    # All N training outputs enter one Gram matrix: a sharded operator gathers them first.
    local = op.gathered() if op.spans_processes else op
    X2 = OutputSpaceSolver(local).solve(B2)
    info = {"outputs": op.num_examples * op.problem.num_outputs}
    return finish(op, X2, B, B2, "kernel", 0, start, options.compute_residual, tol, info)


