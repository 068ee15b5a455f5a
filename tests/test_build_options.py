"""Build options of CMakeLists.txt, read from configure-only runs (no compiling).

The CUDA emulator module (pbrf_fast._C_cuda_emu) is for tests: a plain
``pip install .`` must not build it into users' wheels, while
``-DPBRF_FAST_CUDA_EMULATOR=ON`` or the environment variable
``PBRF_FAST_CUDA_EMULATOR=1`` (scripts/install.sh) must.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not on PATH")


def configure(build_dir: Path, *options: str, env_overrides=None) -> tuple[str, list[str]]:
    """Configure the project into build_dir; returns (cmake's output, target directories)."""
    pybind11 = pytest.importorskip("pybind11")
    env = {k: v for k, v in os.environ.items() if k != "PBRF_FAST_CUDA_EMULATOR"}
    env.update(env_overrides or {})
    result = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build_dir), f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
         f"-DPython_EXECUTABLE={sys.executable}", *options],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every generator lists the targets' directories here.
    listed = (build_dir / "CMakeFiles" / "TargetDirectories.txt").read_text().split()
    targets = [Path(line).name.removesuffix(".dir") for line in listed]
    assert "_C" in targets, targets  # the listing is real, so an absent target means something
    return result.stdout, targets


def test_default_configure_has_no_emulator_target(tmp_path):
    output, targets = configure(tmp_path / "default")
    assert "_C_cuda_emu" not in targets
    assert "not building _C_cuda_emu" in output


# The emulator does not depend on nvcc, so these runs skip CUDA detection (seconds each).
@pytest.mark.parametrize("how", ["option", "environment"])
def test_emulator_target_when_asked_for(tmp_path, how):
    no_cuda = {"PBRF_FAST_NO_CUDA": "1"}
    if how == "option":
        output, targets = configure(tmp_path / how, "-DPBRF_FAST_CUDA_EMULATOR=ON", env_overrides=no_cuda)
    else:
        output, targets = configure(tmp_path / how, env_overrides={**no_cuda, "PBRF_FAST_CUDA_EMULATOR": "1"})
    assert "_C_cuda_emu" in targets
    assert "building _C_cuda_emu (CUDA emulator)" in output
