"""The `scores` command as users run it, in subprocesses: killed with SIGKILL at a
random point and rerun (byte-identical scores, finished chunks not redone), and
under torchrun with two processes (same scores as one process)."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BASE = ["-m", "pbrf_fast", "scores", "--dataset", "synthetic", "--model", "mlp",
        "--solver", "cg", "--cg-iters", "300", "--tol", "1e-6", "--query-chunk", "1", "--rank", "8",
        "--curvature-samples", "0", "--no-progress", "--self-influence"]


def _env():
    # The subprocesses import the same pbrf_fast as this test (installed or in-tree).
    import pbrf_fast

    env = dict(os.environ)
    root = str(Path(pbrf_fast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _command(out, *extra):
    return [sys.executable, *BASE, *extra, "--out", str(out)]


def _markers(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("chunk_*.done")} if (out / "chunks").exists() else {}


def test_sigkill_then_rerun_gives_identical_scores(tmp_path):
    # one thread: OpenMP teams spin badly when the box is shared, and the bytes must not
    # depend on how the two runs were scheduled
    size = ["--train-points", "3000", "--test-points", "8", "--train-epochs", "0.2", "--threads", "1"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_command(clean, *size), check=True, env=_env(), capture_output=True, timeout=600)

    proc = subprocess.Popen(_command(killed, *size), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while len(_markers(killed)) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 0.3))  # somewhere inside a later chunk
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = _markers(killed)
    if len(before) == 8:
        pytest.skip("the run finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL and before

    subprocess.run(_command(killed, *size), check=True, env=_env(), capture_output=True, timeout=600)
    after = _markers(killed)
    assert len(after) == 8
    assert all(after[name] == mtime for name, mtime in before.items()), "a finished chunk was redone"
    for name in ("scores.npy", "self_influence.npy"):
        assert (clean / name).read_bytes() == (killed / name).read_bytes(), name


def test_torchrun_two_processes_equal_one(tmp_path):
    size = ["--train-points", "301", "--test-points", "3", "--train-epochs", "0", "--threads", "1"]
    subprocess.run(_command(tmp_path / "one", *size), check=True, env=_env(), capture_output=True, timeout=600)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(torchrun + _command(tmp_path / "two", *size)[1:], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("scores.npy", "self_influence.npy"):
        one, two = np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name)
        np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5 * np.abs(one).max())
