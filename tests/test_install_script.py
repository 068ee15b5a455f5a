"""scripts/install.sh skips pip when the venv already holds a build of this exact
source, and builds again after any change. Run in a scratch git repository with a
stand-in venv whose python logs what pip and the summary would have done."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
# pip and the backends summary are logged, not run; anything else is the test's python
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo pip >> "$(dirname "$0")/../log"; exit 0; fi
if [ "$1" = "-P" ] && [ "$2" = "-m" ] && [ "$3" = "pbrf_fast" ]; then echo "summary: $4"; exit 0; fi
if [ "$1" = "-P" ] && [ "$2" = "-c" ]; then exit 0; fi  # the installed-package check
exec {python} "$@"
"""


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def scratch(tmp_path):
    if shutil.which("git") is None or shutil.which("bash") is None:
        pytest.skip("needs git and bash")
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "install.sh", repo / "scripts" / "install.sh")
    (repo / "module.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "start")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    return repo, venv


def _install(repo, venv, **env):
    done = subprocess.run(["bash", "scripts/install.sh"], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PBRF_FAST_VENV": str(venv), **env})
    assert done.returncode == 0, done.stderr
    # one build is three pip calls: torch, triton, the package
    builds = (venv / "log").read_text().count("pip") // 3 if (venv / "log").exists() else 0
    return builds, done.stdout


def test_install_builds_once_per_source_and_again_after_any_change(scratch):
    repo, venv = scratch
    builds, out = _install(repo, venv)
    assert builds == 1 and out.strip().endswith("summary: backends")
    builds, out = _install(repo, venv)
    assert builds == 1 and "nothing to compile" in out  # unchanged: no pip at all
    (repo / "module.py").write_text("x = 2\n")  # an edited tracked file
    assert _install(repo, venv)[0] == 2
    assert _install(repo, venv)[0] == 2
    (repo / "new.py").write_text("")  # a new file, not yet added
    assert _install(repo, venv)[0] == 3
    (repo / "new.py").unlink()
    assert _install(repo, venv)[0] == 4
    assert _install(repo, venv, PBRF_FAST_REBUILD="1")[0] == 5
    assert _install(repo, venv, PBRF_FAST_CUDA_EMULATOR="0")[0] == 5  # install.sh sets it itself


def test_install_outside_a_git_checkout_always_builds(scratch):
    repo, venv = scratch
    shutil.rmtree(repo / ".git")
    assert _install(repo, venv)[0] == 1
    assert _install(repo, venv)[0] == 2
    assert not (venv / ".pbrf_fast_source").exists()
