"""How expressions print: precedence levels, numbers, field values and constructor calls.

The lowest layer of the expression tree: it knows no node, only the text conventions that
every node and :func:`guidekit.parse` share (``parse(str(e)) == e``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import attrs

# Printing precedence levels, loosest first: ``|`` < ``+``/``-`` < ``*`` < atoms.
PIPE, SUM, PRODUCT, ATOM = 0, 1, 2, 3


def fmt_number(value: float) -> str:
    """Shortest text that reads back to the same float: ``7`` not ``7.0``, ``inf``, ``0.1``."""
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if math.isnan(value):  # (an error message about a NaN scale prints it)
        return "nan"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def is_number(value: Any) -> bool:
    """A real Python or NumPy number; booleans and tensors are not numbers here."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not is_tensor(value)


def is_tensor(value: Any) -> bool:
    """A torch tensor or NumPy array (told apart without importing either)."""
    return type(value).__module__.startswith(("torch", "numpy")) and hasattr(value, "shape")


def display_name(cls: type) -> str:
    """The constructor name a class prints and parses as (``CFGTerm`` -> ``CFG``)."""
    return str(getattr(cls, "_name", cls.__name__))


def class_instead_of_instance(cls: type) -> str:
    """The message for a term class used where a value belongs (``CFG | APG``)."""
    name = display_name(cls)
    example = getattr(cls, "_example", f"{name}()")
    return f"{name} is a term class, not a term: call it to make a value, e.g. {example}"


def fmt_value(value: Any) -> str:
    """Text for a field value that :func:`guidekit.parse` reads back."""
    if is_number(value):
        return fmt_number(value)
    if isinstance(value, tuple):
        inner = ", ".join(fmt_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def fmt_call(obj: Any) -> str:
    """``Name(positional..., keyword=value...)`` with defaults left out."""
    cls = type(obj)
    positional: tuple[str, ...] = getattr(cls, "_positional", ())
    args, trailing = [], 0
    for field in attrs.fields(cls):
        if not field.init or not field.repr:
            continue
        value = getattr(obj, field.name)
        if field.name in positional:
            # a positional NAME left at its default is left out when nothing positional
            # follows it (``Cond()``, not ``Cond('cond')``); numbers stay shown (``Rescale(0.7)``)
            is_default_name = isinstance(field.default, str) and value == field.default
            trailing = trailing + 1 if is_default_name else 0
            args.append(fmt_value(value))
            continue
        del args[len(args) - trailing:]
        trailing = 0
        if field.default is attrs.NOTHING or value != field.default:
            args.append(f"{field.name}={fmt_value(value)}")
    del args[len(args) - trailing:]
    return f"{display_name(cls)}({', '.join(args)})"
