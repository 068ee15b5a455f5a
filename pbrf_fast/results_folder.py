"""A results folder bound to the arguments that made it.

Every long job (the scale pipeline, the paper's experiments) keeps its results
in one folder with ``arguments.json`` beside them. Opening the folder again with
the same result-affecting arguments resumes from what is on disk; with other
arguments it is refused (:class:`ArgumentMismatch`) unless ``overwrite``, which
first empties the folder, so results made with different arguments never mix.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

from .atomic_io import atomic_write_json
from .errors import PBRFError, ResultsWriteError

__all__ = ["ArgumentMismatch", "ResultsFolder", "ResultsFolderError", "check_results_path"]


class ResultsFolderError(PBRFError, ValueError):
    """The results folder cannot be used (a file in its place, results of another run)."""


class ArgumentMismatch(ResultsFolderError):
    """A results folder holds results made with arguments that would change them."""


def check_results_path(path) -> Path:
    """``path`` as a folder results can go to: refuse a regular file of that name."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ResultsFolderError(f"--out {path} is an existing file, not a folder; choose another --out")
    return path


def _canonical(value) -> str:
    return json.dumps(value, default=str, sort_keys=True)


class ResultsFolder:
    """``path`` holding results for ``arguments``.

    ``result_keys``: the arguments that change the results (None: all of them);
    the others (progress bars, thread counts, memory budgets) may differ between
    runs. ``resume=False`` refuses a folder that already holds results for the
    same arguments, so a finished run is not silently reused; ``overwrite=True``
    empties a folder whose arguments differ, or that is not being resumed.
    """

    def __init__(self, path, arguments: dict, *, result_keys: Iterable[str] | None = None,
                 resume: bool = True, overwrite: bool = False):
        self.path = check_results_path(path)
        self.arguments = json.loads(json.dumps(arguments, default=str))
        keys = sorted(self.arguments) if result_keys is None else list(result_keys)
        stored = self.path / "arguments.json"
        if stored.exists():
            previous = json.loads(stored.read_text())
            if result_keys is None:
                keys = sorted(set(keys) | set(previous))
            changed = [k for k in keys if _canonical(previous.get(k)) != _canonical(self.arguments.get(k))]
            if changed and not overwrite:
                detail = ", ".join(f"{k}: {previous.get(k)!r} -> {self.arguments.get(k)!r}" for k in changed)
                raise ArgumentMismatch(f"{self.path} holds results made with other arguments ({detail}); "
                                       "use another --out, or --overwrite (overwrite=True) to discard them")
            if not changed and not resume and not overwrite:
                raise ArgumentMismatch(f"{self.path} already holds results for these arguments; pass "
                                       "--resume to continue them or --overwrite to start again")
            if changed or not resume:
                self.clear()
        atomic_write_json(stored, self.arguments)

    def clear(self) -> None:
        """Remove everything in the folder."""
        try:
            for child in self.path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        except OSError as exc:  # a read-only folder: one named line, not a traceback
            raise ResultsWriteError(f"cannot empty {self.path} to start again ({exc.strerror}: {exc.filename}); "
                                    "make it writable or choose another --out") from exc

    def file(self, name: str) -> Path:
        return self.path / name

    def point_file(self, group: str, index: int) -> Path:
        """Where one finished piece of a long run (a removed point, a candidate) is kept."""
        return self.path / "points" / group / f"{index:07d}.json"
