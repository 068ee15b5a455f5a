"""The command line's solver flags, generated from :data:`pbrf_fast.INVERSES`: ``--solver``
with the table's names as choices, and one flag per command-line field of any inverse's
options dataclass (a field several solvers share, like ``tol``, is one flag). A flag left
unset leaves the option to its solver's default, which ``--help`` shows."""
from __future__ import annotations

import argparse
import dataclasses

from . import AUTO, INVERSES
from ..errors import InputError
from .options import cli_fields, field_type

__all__ = ["add_solver_flags", "solver_options_from_flags", "flag_names"]

_DEST = "solver_option_"


def flag_names(field: dataclasses.Field) -> tuple[str, ...]:
    """A field's flags: its own spelling(s) where it names them, else ``--name-with-dashes``."""
    return tuple(field.metadata.get("flags") or ()) or (f"--{field.name.replace('_', '-')}",)


def _shared_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Each command-line field name -> (its field, the solvers that have it), in table order."""
    fields: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name, entry in INVERSES.items():
        for field in cli_fields(entry.options):
            fields.setdefault(field.name, (field, []))[1].append(name)
    return fields


def _default_text(field_name: str, solvers: list[str]) -> str:
    defaults = {n: getattr(INVERSES[n].options, field_name) for n in solvers}
    if len(set(map(repr, defaults.values()))) == 1:
        return f"default {next(iter(defaults.values()))!r}"
    return "default " + ", ".join(f"{n}: {v!r}" for n, v in defaults.items())


def add_solver_flags(parser: argparse.ArgumentParser, *, default_solver: str) -> None:
    """``--solver`` and every solver option's flag, each showing its dataclass default."""
    lines = "; ".join(f"{name}: {entry.use_when}" for name, entry in INVERSES.items())
    parser.add_argument("--solver", choices=[*INVERSES, AUTO], default=default_solver,
                        help=f"how (C + lambda I)^-1 is applied (auto: the cheapest exact inverse by size: "
                             f"direct, kernel, else Nystrom-PCG). {lines}")
    group = parser.add_argument_group("solver options (each used by the solvers named in its help)")
    for field_name, (field, solvers) in _shared_fields().items():
        kind = field_type(INVERSES[solvers[0]].options, field)
        convert = None if kind in (str, object) else _positive(kind)
        # SUPPRESS: an unset flag leaves no value, so the options dataclass's default applies
        group.add_argument(*flag_names(field), dest=_DEST + field_name, metavar=field_name.upper(), type=convert,
                           default=argparse.SUPPRESS,
                           choices=field.metadata.get("choices"),
                           help=f"{', '.join(solvers)}: {field.metadata['help']} "
                                f"({_default_text(field_name, solvers)})")


def _positive(kind):
    """An argparse type: a number of ``kind`` > 0 (every numeric solver flag is a count, a
    size or a tolerance), so a bad value is a usage error naming the flag."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a finite {kind.__name__} > 0, got {text!r}")
        return value

    convert.__name__ = f"positive {kind.__name__}"
    return convert


def solver_options_from_flags(args: argparse.Namespace) -> dict:
    """The chosen solver's options set on the command line (its options dataclass
    fills the rest); a flag given for a solver that lacks the option is an error."""
    values = vars(args)
    method = args.solver
    own = {f.name for f in dataclasses.fields(INVERSES[method].options)} if method in INVERSES else set()
    options = {}
    for field_name, (field, solvers) in _shared_fields().items():
        given = values.get(_DEST + field_name)
        if given is not None and field_name not in own:
            raise InputError(f"{flag_names(field)[0]} is an option of {', '.join(solvers)}, "
                                             f"not of --solver {method}")
        if given is not None:
            options[field_name] = given
    return options
