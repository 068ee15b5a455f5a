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


# PBRF_FAST_REQUIRE=cpu,cuda-emulator,triton (set by .ci/run): backends this machine must
# have. A broken build would otherwise turn their cases into skips and the run stay green;
# with the setting, such a skip is a failure.
REQUIRED_BACKENDS = tuple(b for b in os.environ.get("PBRF_FAST_REQUIRE", "").split(",") if b)
# Words in a skip reason that say which backend was missing.
_MISSING_BACKEND_WORDS = {"cpu": ("import pbrf_fast._c failed", "pbrf_fast._c not built"), "cuda-emulator": ("emulat",), "triton": ("triton",)}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not REQUIRED_BACKENDS or not report.skipped or "gpu" in item.keywords:
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr).lower()
    for backend in REQUIRED_BACKENDS:
        if any(word in reason for word in _MISSING_BACKEND_WORDS.get(backend, (backend,))):
            report.outcome = "failed"
            report.longrepr = f"required backend {backend!r} (PBRF_FAST_REQUIRE) is missing: {reason}"
            return


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


def _skip_reason(report) -> str:
    """A skip's reason without pytest's "Skipped: " prefix."""
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ").strip() or "no reason given"


def skip_summary(reports, width: int = 80) -> list[str]:
    """The skips of a run grouped by reason, most frequent first: a heading
    ("708 skipped, by reason") and one line per reason ("  700  needs a CUDA device"),
    each cut to ``width`` columns."""
    counts = {}
    for report in reports:
        reason = _skip_reason(report)
        counts[reason] = counts.get(reason, 0) + 1
    if not counts:
        return []
    groups = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    digits = len(str(groups[0][1]))
    lines = [f"{sum(counts.values())} skipped, by reason"]
    for reason, n in groups:
        line = f"  {n:>{digits}}  {reason}"
        lines.append(line if len(line) <= width else line[:width - 4] + " ...")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """End the run with why tests were skipped (most are "needs a CUDA device" on a
    machine without a GPU), one line per reason, so a long run of skips reads as
    expected rather than as something broken."""
    width = getattr(getattr(terminalreporter, "_tw", None), "fullwidth", 80)  # the terminal's, where known
    lines = skip_summary(terminalreporter.stats.get("skipped", []), width=width)
    if lines:
        terminalreporter.write_sep("-", lines[0])
        for line in lines[1:]:
            terminalreporter.write_line(line)
