"""Report which kernel backends this installation can use, and why not."""
from __future__ import annotations

import textwrap

import torch  # noqa: F401  -- before the extensions (one OpenMP runtime)

from .kernels import registry

# the summary's width: install.sh ends with it, read on an 80-column terminal
SUMMARY_WIDTH = 80


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


def _plain_reason(name: str, available: bool, reason: str) -> str:
    """One backend's state in a few words, without the error text behind it.

    A machine without a GPU is the expected case, not a failure: it reads as a
    fact ("compiled, no GPU driver on this machine"). Only a module that should
    have loaded and did not keeps its error, shortened (``--json`` has it whole).
    """
    missing = "No module named" in reason or "not built" in reason
    if name == "torch":
        return reason
    if name == "cpu":
        return "compiled OpenMP kernels" if available else f"failed to load: {reason}"
    if name == "cuda":
        if available:
            return f"compiled, {reason}"
        if missing:
            return "not compiled (no CUDA toolkit when it was built)"
        if "built, but" in reason:
            return ("compiled, no GPU driver on this machine" if "Driver" in reason
                    else "compiled, no GPU on this machine")
        return f"failed to load: {reason}"
    if name == "triton":
        if available:
            return "interpreted on CPU tensors (TRITON_INTERPRET=1)" if "INTERPRET" in reason else "on GPU tensors"
        if missing:
            return "not installed"
        if "no CUDA device" in reason:
            return "installed, needs a GPU (the tests interpret it on CPU)"
        return f"failed to load: {reason}"
    return reason


def format_backends(report: dict[str, dict]) -> str:
    """The human summary of :func:`backends`' report, lines of at most 80 columns:
    one line per backend (usable or not, and why) and which kernels are in use."""
    lines = ["pbrf_fast backends on this machine (pbrf-fast backends --json: the details):"]
    for name, state in report.items():
        head = f"  {name:<7} {'usable' if state['available'] else 'no':<7} "
        text = _plain_reason(name, state["available"], state["reason"])
        lines += textwrap.wrap(text, SUMMARY_WIDTH, initial_indent=head, subsequent_indent=" " * len(head),
                               max_lines=3, placeholder=" ...")
    usable = {name for name, state in report.items() if state["available"]}
    if "cuda" in usable:
        in_use = "CUDA kernels for GPU tensors, CPU kernels for CPU tensors"
    elif "cpu" in usable:
        in_use = "the compiled CPU kernels"
    else:
        in_use = "pure torch only (slower: no compiled kernels loaded)"
    lines += textwrap.wrap(f"In use: {in_use}.", SUMMARY_WIDTH)
    return "\n".join(lines)
