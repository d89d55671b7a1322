"""Every registered term and processor has a strategy and a reference, and the shared
strategies draw from the whole registry (the laws of test_laws.py rely on both).
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from strategies import (
    classes_in,
    expressions,
    has_reference,
    strategy_for,
    term_coefficients,
    term_reference,
)

from guidekit.expr import Expr
from guidekit.registry import kind, processor_classes, term_classes

# -- the registry and the strategies --------------------------------------------------------------


def test_every_registered_class_has_a_strategy_and_reference() -> None:
    @settings(max_examples=5, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def draw(data: st.DataObject) -> None:
        for cls in (*term_classes(), *processor_classes()):
            value = data.draw(strategy_for(cls), label=cls.__name__)
            assert type(value) is cls
            if cls in term_classes():
                term_reference(value)  # raises, naming the class, when a formula is missing
                term_coefficients(value)
            else:
                assert has_reference(cls), f"no reference for {cls.__name__}"

    draw()


def test_strategies_draw_from_the_whole_registry() -> None:
    seen: set[type] = set()

    # derandomized: a coverage check, not a search (300 random draws missed one of ten
    # processor classes about once in five runs)
    @settings(max_examples=600, database=None, phases=[Phase.generate], derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(expressions())
    def collect(expr: Expr) -> None:
        seen.update(classes_in(expr))

    collect()
    # sampler-step terms (CFG++) run only through a sampler adapter: never drawn here
    drawn = {c for c in term_classes() if kind(c) != "sampler"}
    missing = (drawn | set(processor_classes())) - seen
    assert not missing, f"never drawn: {sorted(c.__name__ for c in missing)}"
