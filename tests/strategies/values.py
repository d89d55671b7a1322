"""Values: one hypothesis strategy per registered class, derived from its attrs fields.

A field draws from the class's ``field_examples`` when it names the field, else from its
validator's range (:data:`BY_VALIDATOR`), else keeps its default; values the term's own
validators reject are discarded. Also the numbers and noise levels the laws use.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import attrs
from hypothesis import reject
from hypothesis import strategies as st

from guidekit import (
    GuidanceError,
    fields,
)
from guidekit.fields import Range
from guidekit.registry import kind, processor_classes, term_classes
from guidekit.schedules import Beta, Constant, Cosine, Linear, Piecewise, PowerLaw, Window

# -- numbers ------------------------------------------------------------------------------------


def numbers(lo: float, hi: float, places: int = 2) -> st.SearchStrategy[float]:
    """Finite floats in ``[lo, hi]`` rounded to ``places`` decimals, so text round-trips."""
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(
        lambda v: min(max(round(v, places), lo), hi)
    )


SCALES = numbers(-3, 8)
#: Noise levels at which laws evaluate plans, noisiest first (VE / k-diffusion sigmas).
VE_SIGMAS = (20.0, 7.0, 2.5, 1.0, 0.5, 0.3, 0.05)
#: Flow-matching sigmas lie in [0, 1].
FLOW_SIGMAS = (0.95, 0.7, 0.5, 0.3, 0.05)
#: Gate bounds: mostly the evaluation levels themselves, so ``lo < sigma <= hi`` is
#: exercised exactly at its edges, plus a few levels in between.
GATE_POINTS = (0.0, 0.05, 0.3, 0.5, 0.75, 1.0, 2.5, 4.0, 7.0, 20.0)
#: Every level a rows law looks at, noisiest first: each gate point and one level inside
#: every interval between them, so every region of a plan is visited.
ROW_SIGMAS = (50.0, 20.0, 10.0, 7.0, 5.0, 4.0, 3.0, 2.5, 1.5, 1.0, 0.9, 0.75, 0.6, 0.5, 0.4,
              0.3, 0.1, 0.05, 0.01)
#: the models the test worlds answer for besides ``main`` (Autoguidance's weak models)
AUTOGUIDANCE_MODELS = ("weak", "small")

# -- one strategy per registered class, derived from its fields ----------------------------------

#: the run's noise levels for the schedules the laws draw: a progress shape gets these bounds,
#: so every schedule drawn is known from sigma alone (the laws step plans without a schedule)
PROGRESS_BOUNDS = {"sigma_max": 20.0, "sigma_min": 0.05}


@st.composite
def _piecewise(draw: st.DrawFn) -> Piecewise:
    sigmas = sorted(draw(st.sets(st.sampled_from(GATE_POINTS), min_size=1, max_size=3)))
    return Piecewise(*((s, draw(SCALES)) for s in sigmas))


@st.composite
def _window(draw: st.DrawFn) -> Window:
    lo, hi = draw(gate_bounds())
    return Window(draw(SCALES), lo, hi, outside=draw(st.sampled_from((0.0, 1.0)) | SCALES))


def schedules() -> st.SearchStrategy[Any]:
    """A schedule by noise level (guidekit.schedules), every shape, known from sigma alone."""
    bounded = [
        st.builds(cls, SCALES, **{k: st.just(v) for k, v in PROGRESS_BOUNDS.items()})
        for cls in (Linear, Cosine, Beta)
    ]
    power = st.builds(PowerLaw, SCALES, numbers(0, 3), **{k: st.just(v) for k, v in PROGRESS_BOUNDS.items()})
    return st.one_of(st.builds(Constant, SCALES), _piecewise(), _window(), power, *bounded)


#: a field without ``field_examples`` draws from its validator's range; a scale field
#: (``finite_or_schedule``) draws a number or, one time in three, a schedule
BY_VALIDATOR: dict[Any, st.SearchStrategy[Any]] = {
    fields.finite_or_schedule: st.one_of(SCALES, SCALES, st.deferred(schedules)),
    fields.finite: SCALES,
    fields.unit_interval: numbers(0, 1),
    fields.nonnegative: numbers(0, 8),
    fields.positive_or_none: st.none() | numbers(0.5, 20, 1),
    fields.count: st.integers(0, 2),
}


def _examples(spec: Any) -> st.SearchStrategy[Any]:
    if isinstance(spec, Range):
        return numbers(spec.lo, spec.hi)
    if not any(isinstance(v, Range) for v in spec):
        return st.sampled_from(spec)
    return st.one_of([_examples(v) if isinstance(v, Range) else st.just(v) for v in spec])


def field_strategy(cls: type, field: attrs.Attribute) -> st.SearchStrategy[Any]:
    """The values one field of a registered class draws (see the module docstring)."""
    declared = getattr(cls, "field_examples", {})
    if field.name in declared:
        return _examples(declared[field.name])
    if field.validator in BY_VALIDATOR:
        return BY_VALIDATOR[field.validator]
    if field.default is not attrs.NOTHING:
        return st.just(field.default)
    raise KeyError(
        f"{cls.__name__}.{field.name} has no default, no field_examples and a validator the "
        f"tests do not know: declare field_examples = {{{field.name!r}: (...)}} on the class"
    )


@functools.cache
def strategy_for(cls: type) -> st.SearchStrategy[Any]:
    """The strategy for one registered class; a clear error for a field it cannot draw."""
    drawn = {
        getattr(f, "alias", f.name): field_strategy(cls, f) for f in attrs.fields(cls) if f.init
    }

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        kwargs = {name: draw(strategy) for name, strategy in drawn.items()}
        try:
            return cls(**kwargs)
        except GuidanceError:  # a combination the term refuses (CADS's tau1 >= tau2)
            reject()

    return build()


def _classes(*kinds: str) -> list[type]:
    return [c for c in term_classes() if kind(c) in kinds]


def terms(*kinds: str) -> st.SearchStrategy[Any]:
    """Any registered term of the given kinds (all kinds when none is given)."""
    classes = _classes(*kinds) if kinds else list(term_classes())
    return st.one_of([strategy_for(c) for c in classes])


def processors() -> st.SearchStrategy[Any]:
    """Any registered post-processor or input modifier."""
    return st.one_of([strategy_for(c) for c in processor_classes()])


@st.composite
def gate_bounds(draw: st.DrawFn) -> tuple[float, float]:
    """``(lo, hi)`` with ``0 <= lo < hi`` (``hi`` may be ``inf``)."""
    lo = draw(st.sampled_from(GATE_POINTS))
    hi = draw(st.sampled_from([h for h in (*GATE_POINTS, math.inf) if h > lo]))
    return lo, hi
