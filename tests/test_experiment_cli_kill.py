"""`decompose`, `correlate` and `mislabel` as users run them, in subprocesses: killed
with SIGKILL at a random point after some work is on disk, then rerun with --resume.
The results must be byte-identical to an uninterrupted run, and no finished point
may be redone. (`scores` has the same test in test_scale_cli.py.)"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

COMMANDS = {
    "decompose": (["decompose", "--dataset", "cancer", "--removed", "6", "--test-points", "5", "--chunk", "1"],
                  "removed", ("results.json", "table.csv", "table.md")),
    "correlate": (["correlate", "--dataset", "digits", "--removed", "4", "--test-points", "5", "--chunk", "1"],
                  "removed", ("results.json", "table.csv", "table.md")),
    "mislabel": (["mislabel", "--dataset", "digits", "--candidates", "60", "--chunk", "10"],
                 "self_influence", ("results.json", "table.md")),
}


def _env():
    import pbrf_fast

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(pbrf_fast.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _command(args, out, *extra):
    # one thread: the bytes must not depend on how the two runs were scheduled
    return [sys.executable, "-m", "pbrf_fast", *args, "--threads", "1", "--out", str(out), *extra]


def _finished(out, group):
    folder = out / "points" / group
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} if folder.exists() else {}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_sigkill_then_resume_gives_identical_results(tmp_path, name):
    args, group, outputs = COMMANDS[name]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_command(args, clean), check=True, env=_env(), capture_output=True, timeout=600)
    total = len(_finished(clean, group))

    proc = subprocess.Popen(_command(args, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while len(_finished(killed, group)) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))  # somewhere inside a later piece
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = _finished(killed, group)
    if len(before) == total:
        pytest.skip("the run finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL and before

    done = subprocess.run(_command(args, killed, "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _finished(killed, group)
    assert len(after) == total
    assert all(after[k] == mtime for k, mtime in before.items()), "a finished point was redone"
    for output in outputs:
        assert (clean / output).read_bytes() == (killed / output).read_bytes(), output
