"""The registry fills itself: every term and processor class is registered by its own module."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from strategies import strategy_for

import guidekit
from guidekit import registry
from guidekit.errors import GuidanceValueError
from guidekit.processor import Processor
from guidekit.terms.base import DirectionTerm, Term
from guidekit.text import display_name

CLASSES = [*registry.term_classes(), *registry.processor_classes()]


def _subclasses(base: type) -> set[type]:
    found, stack = set(), [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            found.add(sub)
            stack.append(sub)
    return found


def test_every_named_class_registered_itself() -> None:
    named = {
        (c.__module__, c.__qualname__) for c in _subclasses(Term) | _subclasses(Processor)
        if "_name" in vars(c) and c.__module__.startswith("guidekit.")
    }
    registered = {(c.__module__, c.__qualname__) for c in CLASSES}
    assert named == registered, f"forgot @register: {sorted(named - registered)}"
    assert set(registry.CONSTRUCTORS) == {display_name(c) for c in CLASSES}
    assert set(registry.TERM_CLASSES) == set(registry.term_classes())  # the old names, live


@pytest.mark.parametrize("cls", CLASSES, ids=display_name)
def test_every_registered_constructor_parses(cls: type) -> None:
    example = guidekit.parse(cls._example)
    assert type(example) is cls and str(guidekit.parse(str(example))) == str(example)
    field_names = {f.name for f in attrs.fields(cls)}
    assert set(cls.field_examples) <= field_names, "field_examples names a field the class lacks"

    @settings(max_examples=25, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy_for(cls))
    def roundtrip(value: object) -> None:
        assert guidekit.parse(str(value)) == value

    roundtrip()


def test_a_name_is_taken_once_and_kinds_come_from_the_bases() -> None:
    @attrs.frozen(repr=False)
    class Other(DirectionTerm):
        scale: float = 1.0
        _name = "CFG"

    with pytest.raises(GuidanceValueError, match="two constructors named 'CFG'"):
        registry.register(Other)
    assert registry.CONSTRUCTORS["CFG"] is guidekit.CFGTerm
    with pytest.raises(GuidanceValueError, match="not a term or post-processor"):
        registry.register(int)
    assert {registry.kind(c) for c in CLASSES} == set(registry.KINDS)


def test_unregister_forgets_a_name() -> None:
    @registry.register
    @attrs.frozen(repr=False)
    class Probe(DirectionTerm):
        scale: float = attrs.field(default=1.0)
        _name = "ProbeTerm"

        def negative(self) -> guidekit.Branch:
            return guidekit.Branch(cond="uncond")

    try:
        assert guidekit.parse("ProbeTerm(scale=2)") == Probe(2.0)
        assert Probe in registry.term_classes()
    finally:
        registry.unregister("ProbeTerm")
    assert "ProbeTerm" not in registry.CONSTRUCTORS
    with pytest.raises(guidekit.ParseError):
        guidekit.parse("ProbeTerm()")
