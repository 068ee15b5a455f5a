#!/usr/bin/env bash
# Creates .venv (if missing) and installs pbrf_fast into it with its test extras and
# the CUDA emulator: the developer and CI install. Ends with a short summary of the
# backends this machine can use (`pbrf-fast backends --json` has the details).
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build,
# while torch==2.13.0 resolves to the CPU wheel this kind of machine carries.
#
# A rerun on an unchanged checkout skips pip (minutes of C++ and CUDA compiling):
# after a successful install the fingerprint of the source (every file git tracks or
# would track, by name and content, plus the build settings) is kept in the venv,
# and the build runs again only when it differs. PBRF_FAST_REBUILD=1 forces it (e.g.
# after installing a CUDA toolkit, which the source fingerprint cannot see).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${PBRF_FAST_VENV:-.venv}"  # another venv for trying this script without touching .venv
STAMP="$VENV/.pbrf_fast_source"
# The test extras need the CUDA emulator module too (tests/test_cuda_emulation.py and
# the "cuda" parameter of the parity tests on CPU tensors); plain installs leave it out.
export PBRF_FAST_CUDA_EMULATOR=1
# CI and containers run as root: pip's warning about it is noise at the end of a good install
# (an environment variable, which a pip too old to know the setting ignores)
export PIP_ROOT_USER_ACTION=ignore

source_fingerprint() {
  # Outside a git checkout (an unpacked archive) there is no file list to trust:
  # print nothing, so the install always runs.
  git rev-parse --is-inside-work-tree >/dev/null 2>&1 || return 0
  git ls-files -z --cached --others --exclude-standard | "$VENV/bin/python" -c '
import hashlib, os, sys
digest = hashlib.sha256()
for name in sorted(set(sys.stdin.buffer.read().split(b"\0")) - {b""}):
    digest.update(name + b"\0")  # a deleted or renamed file changes the name list
    if os.path.isfile(name):
        with open(name, "rb") as f:
            digest.update(f.read())
    digest.update(b"\0")
emulator = os.environ.get("PBRF_FAST_CUDA_EMULATOR", "")
digest.update(f"emulator={emulator} python={sys.version}".encode())
print(digest.hexdigest())'
}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
fingerprint="$(source_fingerprint)"
if [ -n "$fingerprint" ] && [ "${PBRF_FAST_REBUILD:-0}" != 1 ] && [ -f "$STAMP" ] \
   && [ "$(cat "$STAMP")" = "$fingerprint" ] \
   && "$VENV/bin/python" -P -c "import importlib.metadata as m; m.version('pbrf_fast')" >/dev/null 2>&1; then
  echo "install.sh: $VENV already holds this source's build; nothing to compile (PBRF_FAST_REBUILD=1 forces it)"
else
  rm -f "$STAMP"  # a failed install below must not leave an old fingerprint that claims success
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  # Triton runs its kernels on CPU tensors under TRITON_INTERPRET=1 (the tests do).
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "triton==3.8.0" \
    || echo "install.sh: triton not installed; its backend will report unavailable"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check ".[test]"
  [ -z "$fingerprint" ] || echo "$fingerprint" > "$STAMP"
fi
# -P: report on the installed package, not the source tree in the current directory
"$VENV/bin/python" -P -m pbrf_fast backends
