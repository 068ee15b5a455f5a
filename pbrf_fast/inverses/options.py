"""Typed options of the inverses. Each inverse's options are one dataclass whose fields
carry their default and a line of help; the command line's flags and ``--help`` text, the
score pipeline's checks and the docs are all read from these fields."""
from __future__ import annotations

import dataclasses
import typing

from ..errors import InputError

__all__ = ["InverseOptions", "option", "cli_fields"]


def option(default, help: str, *, flags: tuple[str, ...] = (), cli: bool = True, choices=None):
    """A field of an options dataclass: its default, its help, and on the command line
    ``--name-with-dashes`` (plus ``flags``, older spellings that keep working) unless ``cli``
    is False (tensors, callables and knobs a command-line user has no use for); ``choices``
    restrict the flag's values."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags, "cli": cli, "choices": choices})


@dataclasses.dataclass
class InverseOptions:
    """Base of every inverse's options: built from a mapping with a named error for an
    option the method does not have,."""

    @classmethod
    def from_mapping(cls, method: str, mapping: dict | None) -> "InverseOptions":
        mapping = dict(mapping or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(mapping) - set(names))
        if unknown:
            raise InputError(f"solver {method!r} has no option {', '.join(map(repr, unknown))}; its options are "
                             f"{names or 'none'}")
        return cls(**mapping)


def cli_fields(options_type: type) -> list[dataclasses.Field]:
    """The fields of an options dataclass that the command line exposes."""
    return [f for f in dataclasses.fields(options_type) if f.metadata.get("cli", False)]


def field_type(options_type: type, field: dataclasses.Field):
    """The scalar type argparse converts a field's flag with (``int | None`` -> int)."""
    hint = typing.get_type_hints(options_type)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]
