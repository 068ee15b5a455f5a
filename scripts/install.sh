#!/usr/bin/env bash
# Creates .venv (if missing) and installs pbrf_fast into it with its test extras and
# the CUDA emulator: the developer and CI install.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build,
# while torch==2.13.0 resolves to the CPU wheel this kind of machine carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
# Triton runs its kernels on CPU tensors under TRITON_INTERPRET=1 (the tests do).
.venv/bin/python -m pip install -q --disable-pip-version-check "triton==3.8.0" \
  || echo "install.sh: triton not installed; its backend will report unavailable"
# The test extras need the CUDA emulator module too (tests/test_cuda_emulation.py and
# the "cuda" parameter of the parity tests on CPU tensors); plain installs leave it out.
export PBRF_FAST_CUDA_EMULATOR=1
.venv/bin/python -m pip install -q --disable-pip-version-check ".[test]"
# -P: report on the installed package, not the source tree in the current directory
.venv/bin/python -P -c "import pbrf_fast, json; print(json.dumps(pbrf_fast.backends()))"
