"""Rewrite a .cu file into C++ that compiles against csrc/emulation/cuda_runtime.h.

Only the two pieces of CUDA syntax that are not C++ change; everything else,
line numbers included, stays as written, and a #line directive points
compiler messages at the original file:

    kernel<T><<<grid, block, shared, stream>>>(args)
        -> ::pbrf_emu::Launch(grid, block, shared, stream)(kernel<T>, args)
    __shared__ T name[A][B];
        -> auto& name = ::pbrf_emu::SharedDeclaration<T[A][B], N>::storage();
    extern __shared__ T name[];
        -> T* name = static_cast<T*>(::pbrf_emu::dynamic_shared());

Any other use of __shared__ or <<< is refused, so the emulated build never
silently differs from what nvcc compiles.

Usage: python translate_cuda.py INPUT.cu OUTPUT.cpp
"""
from __future__ import annotations

import itertools
import re
import sys
import zlib
from pathlib import Path

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\((\s*\))?", re.DOTALL)
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+([^;\[\]{}()\n]+?)\s+(\w+)\s*\[\s*\]\s*;")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
_STATIC_SHARED = re.compile(r"__shared__\s+([^;\[\]{}()\n]+?)\s+(\w+)\s*((?:\[[^\]]+\]\s*)+);")


def translate(source: str, origin: str) -> str:
    def launch(match: re.Match) -> str:
        kernel, config, no_args = match.group(1), match.group(2), match.group(3)
        head = f"::pbrf_emu::Launch({config})({kernel}"
        return head + (")" if no_args else ", ")

    text = _LAUNCH.sub(launch, source)
    text = _DYNAMIC_SHARED.sub(lambda m: f"{m[1]}* {m[2]} = static_cast<{m[1]}*>(::pbrf_emu::dynamic_shared());",
                               text)
    # Site numbers unique across files: each declaration gets its own storage key.
    counter = itertools.count(zlib.crc32(origin.encode()) % 100_000 * 1000)
    text = _STATIC_SHARED.sub(
        lambda m: f"auto& {m[2]} = ::pbrf_emu::SharedDeclaration<{m[1]}{m[3].strip()}, "
                  f"{next(counter)}>::storage();", text)
    code = _COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), text)  # same offsets, no comments
    for leftover in ("<<<", ">>>", "__shared__"):
        if leftover in code:
            line = code[:code.index(leftover)].count("\n") + 1
            raise SystemExit(f"{origin}:{line}: translate_cuda.py cannot rewrite this use of {leftover!r}")
    if text.count("\n") != source.count("\n"):
        raise SystemExit(f"{origin}: rewriting changed the line count")
    return f'#line 1 "{origin}"\n' + text


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    source, target = Path(argv[1]), Path(argv[2])
    translated = translate(source.read_text(), source.as_posix())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Rewrite only on change, so an unchanged .cu does not trigger a recompile.
    if not target.exists() or target.read_text() != translated:
        target.write_text(translated)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
