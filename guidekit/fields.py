"""Field converters and validators for terms and post-processors: each error names the field.

A term's fields are plain numbers, names and tuples; these attrs converters and validators
turn numbers into floats and reject anything else with the constructor and field in the message
(``CFG(scale=...): scale must be finite, got inf``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.text import display_name, fmt_number, is_number


@attrs.frozen
class Range:
    """Any number in ``[lo, hi]``: a field's example values as an interval."""

    lo: float
    hi: float


#: ``field_examples`` of a term or processor class: field name -> example values (a tuple,
#: whose items may be :class:`Range`) or one :class:`Range`. The docs show them and the
#: property tests draw from them; a field left out draws from its validator's own range.
Examples = Mapping[str, tuple[Any, ...] | Range]


def to_float(value: Any) -> Any:
    """Convert numbers to float; leave anything else for the validator to reject by name."""
    return float(value) if is_number(value) else value


def _where(instance: Any, attribute: attrs.Attribute) -> str:
    return f"{display_name(type(instance))}({attribute.name}=...)"


def number(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if _is_schedule(value):
        raise GuidanceTypeError(
            f"{_where(instance, attribute)}: {attribute.name} takes a number, not the schedule "
            f"{value!r}; schedules stand in scale fields only (CFG(Cosine(7)), PAG(Window(3, "
            f"1, 5))). Give {attribute.name} a number"
        )
    if not isinstance(value, float):
        raise GuidanceTypeError(
            f"{_where(instance, attribute)}: {attribute.name} must be a Python number, "
            f"got {type(value).__name__} {value!r}"
            + ("; use float(t) for a tensor" if hasattr(value, "shape") else "")
        )
    if math.isnan(value):
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} is NaN; it must be a finite number"
        )


def finite(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    number(instance, attribute, value)
    if not math.isfinite(value):
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} must be finite, got {value}"
        )


def finite_or_schedule(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A scale: a finite number, or a schedule by noise level (:mod:`guidekit.schedules`)."""
    if _is_schedule(value):
        from guidekit.schedule import check_shape

        check_shape(f"{_where(instance, attribute)}", value)
        return
    finite(instance, attribute, value)


def _is_schedule(value: Any) -> bool:
    # imported here: the schedule shapes use these validators for their own fields
    from guidekit.schedule import Schedule

    return isinstance(value, Schedule)


def nonnegative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    finite(instance, attribute, value)
    if value < 0:
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} must be >= 0, got {fmt_number(value)}"
        )


def positive_or_none(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    finite(instance, attribute, value)
    if value <= 0:
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} must be > 0 (or None to turn it "
            f"off), got {fmt_number(value)}"
        )


def unit_interval(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    finite(instance, attribute, value)
    if not 0 <= value <= 1:
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} must lie in [0, 1], "
            f"got {fmt_number(value)}"
        )


def unit_interval_or_schedule(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A weight in ``[0, 1]``: a number there, or a schedule whose every value lies there."""
    if not _is_schedule(value):
        unit_interval(instance, attribute, value)
        return
    finite_or_schedule(instance, attribute, value)
    lo, hi = value.bounds()
    if not 0 <= lo <= hi <= 1:
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} must lie in [0, 1] at every "
            f"noise level, and {value!r} takes values from {fmt_number(lo)} to "
            f"{fmt_number(hi)}; scale the schedule into [0, 1]"
        )


def name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value.isidentifier():
        raise GuidanceTypeError(
            f"{_where(instance, attribute)}: {attribute.name} must be a name such as 'weak', "
            f"got {value!r}"
        )


def count(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GuidanceValueError(
            f"{_where(instance, attribute)}: {attribute.name} must be a whole number >= 0, "
            f"got {value!r}"
        )
