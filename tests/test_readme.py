"""The README's quick start runs as written, and its set-up section holds exactly the two
documented commands.

The first ```python block of README.md is the quick start a new user copies: it must begin
within the README's first 40 lines and run, unchanged, in a fresh namespace in a few seconds.
"""
import re
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

SETUP_COMMANDS = [
    "bash scripts/install.sh && .venv/bin/pbrf-fast demo",
    "bash scripts/install.sh && .venv/bin/pytest -q tests",
]


def _fenced_blocks(text, language):
    """(first line number, code) of every ```language block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            start, i = i + 1, i + 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"README.md: the ```{language} block at line {start} is never closed"
            blocks.append((start, "\n".join(body) + "\n"))
        i += 1
    return blocks


def _section(text, title):
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def test_first_python_block_is_within_the_first_40_lines():
    blocks = _fenced_blocks(README.read_text(), "python")
    assert blocks, "README.md has no ```python block"
    line, _ = blocks[0]
    assert line <= 40, f"the first ```python block of README.md opens at line {line}, after line 40"


def test_setup_section_has_exactly_the_two_commands():
    setup = _section(README.read_text(), "Set up")
    commands = [code.strip() for _, code in _fenced_blocks(setup, "bash")]
    assert commands == SETUP_COMMANDS, f"README.md's 'Set up' commands changed: {commands}"


def test_first_python_block_runs_as_written(capsys):
    pytest.importorskip("sklearn")
    _, code = _fenced_blocks(README.read_text(), "python")[0]
    namespace = {"__name__": "__readme__"}
    start = time.perf_counter()
    try:
        exec(compile(code, "README.md (first python block)", "exec"), namespace)
    except Exception as error:  # name the README, not this file, as what broke
        pytest.fail(f"README.md's quick start raised {type(error).__name__}: {error}\n--- the block ---\n{code}")
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert "top proponents:" in printed, f"the quick start printed {printed!r}"
    scores = namespace.get("scores")
    assert scores is not None and tuple(scores.shape) == (200, 3), "the quick start's scores are not (200, 3)"
    assert scores.isfinite().all(), "the quick start's scores are not finite"
    # a few seconds on an idle machine; the margin is for a shared CI box
    assert seconds < 60, f"README.md's quick start took {seconds:.1f} s"
