"""Issue 11 "nothing silent": bad input gets a clear error naming the term and the fix, or
correct behaviour. Each case is one parametrized row."""

from __future__ import annotations

import math

import pytest

from guidekit import APG, CFG, Autoguidance, GuidanceTypeError, GuidanceValueError, parse

inf = math.inf

CLEAR_ERRORS = [
    # (build, error type, fragments the message must hold)
    (lambda: 1e308 * (10 * Autoguidance(1)), GuidanceValueError,
     ["not a finite number", "Autoguidance(1)", "smaller scale"]),
    (lambda: -1e308 * (-10 * Autoguidance(1)), GuidanceValueError, ["not a finite number"]),
    (lambda: 1e200 * (1e200 * (CFG(7) - CFG(3))), GuidanceValueError, ["not a finite number"]),
    (lambda: parse("1e308 * (10 * Autoguidance(1))"), GuidanceValueError, ["not a finite number"]),
    (lambda: CFG(7).between(inf, inf), GuidanceValueError, ["lo must be a finite noise level"]),
    (lambda: CFG(7).between(inf, 5), GuidanceValueError, ["lo > hi"]),
    (lambda: CFG.between(1, 2), GuidanceTypeError, ["CFG is a term class", "CFG(7)",
                                                    "CFG(...).between(lo, hi)"]),
    (lambda: Autoguidance.between(0, 1), GuidanceTypeError, ["Autoguidance is a term class"]),
    (lambda: APG.between(0, 1), GuidanceTypeError, ["APG is a term class"]),
    (lambda: -Autoguidance, GuidanceTypeError, ["Autoguidance is a term class", "Autoguidance("]),
    (lambda: +CFG, GuidanceTypeError, ["CFG is a term class"]),
    (lambda: CFG(3) + + Autoguidance(1), GuidanceTypeError, ["unary +", "remove the extra +"]),
    (lambda: parse("CFG(3) + + Autoguidance(1)"), GuidanceTypeError, ["remove the extra +"]),
]


@pytest.mark.parametrize(("build", "kind", "fragments"), CLEAR_ERRORS)
def test_clear_error(build, kind, fragments):
    with pytest.raises(kind) as info:
        build()
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "e.g. .between(inf" not in str(info.value)  # never suggests what was refused


def test_finite_products_still_build():
    assert str(1e154 * (1e154 * Autoguidance(1))) == f"{1e308!r} * Autoguidance(1)"
    assert CFG(7).between(0, inf).lo == 0
