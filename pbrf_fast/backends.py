"""Report which kernel backends this installation can use, and why not."""
from __future__ import annotations

import torch  # noqa: F401  -- before the extensions (one OpenMP runtime)

from .kernels import registry


def backends() -> dict[str, dict]:
    """{"torch"|"cpu"|"cuda"|"triton": {"available": bool, "reason": str}}.

    "reason" says what serves the backend, or why it cannot run here (import
    error, no device, TRITON_INTERPRET not set, ...).
    """
    report = {}
    for name in registry.BACKENDS:
        available, reason = registry.backend_status(name)
        report[name] = {"available": available, "reason": reason}
    return report
