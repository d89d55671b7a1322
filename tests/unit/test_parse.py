"""guidekit.parse: round trips, Python's precedence, argument values and the length limits.

Error positions, library errors, refusals and no evaluation: test_parse_errors.py.
"""

import functools
import math
import operator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guidekit import (
    APG,
    CADS,
    CFG,
    TCFG,
    Autoguidance,
    CFGZeroStar,
    Cond,
    Expr,
    Piped,
    Pipeline,
    Rescale,
    Scaled,
    Sum,
    Uncond,
    parse,
)
from guidekit.combinators.base import Processor
from guidekit.parse import read_value

inf = math.inf
D = Autoguidance(1.5)
E = Autoguidance(2, model="tiny")
C, U = Cond(), Uncond()

ROUND_TRIP = [
    CFG(7),
    C,
    U,
    Cond(model="other"),
    CFG(-3),
    CFG(1e-05),
    CFG(1e20),
    CFG(0.1),
    CFG(123456.789),
    CFG(7) + D,
    CFG(7) + D - E,
    CFG(7) - (D + E),
    CFG(7) + (D - E),
    CFG(7) - (D - (E + D)),
    C - (C - U),
    -(C - U),
    C + -(C - U),
    -D,
    -D + E,
    -(D + E) + 0.1 * E,
    C - 2 * (C - U),
    C + -2 * (C - U),
    C - 2 * (C - U) - 0.5 * (C - Uncond(model="weak")),
    CFG(3) + 0.5 * D - 1e-05 * E,
    (0.1 + 0.2) * D,  # a factor whose repr needs 17 digits
    D * 2 / 4,
    2 * (D + E),
    CFG(1e-05) + (Cond(model="weak") - Uncond(model="weak")),
    CFG(7).between(0.1, inf),
    (CFG(7) + D).between(1, 5),
    (2 * D).between(0, 1),
    -D.between(0, 1),
    C - D.between(0.5, 2),
    CFG(7) + D.between(0.5, 2).between(1, 3),
    -(CFG(7).between(1, 2) - C),
    (CFG(7) + (D + E).between(0, 10)).between(0.2, 80),
    (CFG(7) + (D + E).between(0, 10)).between(0.2, 80)
    | APG(eta=1, norm_threshold=5, momentum=-0.5)
    | Rescale(0.7),
    CFG(7) + D | APG(eta=0),
    CFG(7) | CADS(keys=("y",)),
    CFG(7) | CADS(tau1=0.5, tau2=0.8, noise_scale=0.25, psi=0.5, keys=("y", "z"), conds=("cond",)),
    CFG(7) | APG(eta=0.5) | Rescale(0.7) | CADS(),
    CFGZeroStar(4, zero_init_steps=2),
    TCFG(5) | Rescale(0.7),
    TCFG(5) - 3 * (C - U),
    CFGZeroStar(4) - TCFG(2) + D,
    APG(),
    APG(eta=0.5) | Rescale(0.7),
    APG() | Rescale(0.7) | CADS(keys=("y",)),
    Rescale(0),
]


@pytest.mark.parametrize("expr", ROUND_TRIP, ids=str)
def test_round_trip(expr):
    parsed = parse(str(expr))
    assert type(parsed) is type(expr)
    assert parsed == expr
    assert str(parsed) == str(expr)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("CFG(7) + Autoguidance(1.5) | APG(eta=0)", (CFG(7) + Autoguidance(1.5)) | APG(eta=0)),
        ("Cond() - Uncond() - Autoguidance(1)", (C - U) - Autoguidance(1)),
        ("Cond() - (Uncond() - Autoguidance(1))", C - (U - Autoguidance(1))),
        ("-2 * Autoguidance(1)", -2 * Autoguidance(1)),
        ("- 2 * Autoguidance(1)", (-2) * Autoguidance(1)),
        ("2 * -Autoguidance(1)", 2 * (-Autoguidance(1))),
        ("-Autoguidance(1) * 2", (-Autoguidance(1)) * 2),
        ("--Autoguidance(1)", Autoguidance(1)),  # -(-x) is x again, as in Python
        ("Autoguidance(1) * 2", 2 * Autoguidance(1)),
        ("Autoguidance(1) / 4", Autoguidance(1) / 4),
        ("2 * 3 * Autoguidance(1)", 6 * Autoguidance(1)),
        ("1 / 2 * Autoguidance(1)", 0.5 * Autoguidance(1)),
        ("-Autoguidance(1).between(0, 1)", -(Autoguidance(1).between(0, 1))),
        ("((CFG(7)))", CFG(7)),
        ("CFG(7) | (APG() | Rescale(0.7))", CFG(7) | APG() | Rescale(0.7)),
        ("(CFG(7) | APG()) | Rescale(0.7)", CFG(7) | APG() | Rescale(0.7)),
        ("Autoguidance(2, model='weak')", Autoguidance(2)),
        ('Autoguidance(2, model="tiny")', Autoguidance(2, model="tiny")),
        ("Autoguidance(scale=2)", Autoguidance(2)),
        ("APG(eta=1, norm_threshold=5, momentum=-0.5)", APG(1, 5, -0.5)),
        ("APG(norm_threshold=None)", APG()),
        ("CADS(keys=('y',))", CADS(keys=("y",))),
        ("CADS(keys=['y', 'z'], conds=())", CADS(keys=("y", "z"), conds=())),
        ("CFG(1e-05)", CFG(0.00001)),
        ("CFG(1E+2)", CFG(100)),
        ("CFG(.5)", CFG(0.5)),
        ("CFG(5.)", CFG(5)),
        ("CFG(+7)", CFG(7)),
        ("CFG(7).between(0, inf)", CFG(7).between(0, inf)),
        ("CFG(7).between(lo=1, hi=2)", CFG(7).between(1, 2)),
        ("CFGZeroStar(4, zero_init_steps=2)", CFGZeroStar(4, zero_init_steps=2)),
    ],
)
def test_reads_like_python(text, expected):
    assert parse(text) == expected


def test_precedence_and_associativity():
    left = parse("Cond() - Uncond() - Autoguidance(1)")
    right = parse("Cond() - (Uncond() - Autoguidance(1))")
    assert left != right
    assert isinstance(left, Sum) and len(left.terms) == 3
    assert isinstance(right, Sum) and len(right.terms) == 2
    assert right.terms[1] == Scaled(-1.0, U - Autoguidance(1))
    piped = parse("CFG(7) + Autoguidance(1.5) | APG(eta=0)")
    assert isinstance(piped, Piped) and piped.expr == CFG(7) + Autoguidance(1.5)
    # * binds tighter than +, unary minus tighter than *
    assert parse("CFG(7) + 2 * Autoguidance(1) - Autoguidance(3)") == (
        CFG(7) + (2 * Autoguidance(1)) - Autoguidance(3)
    )


def test_processors_alone_give_processor_or_pipeline():
    pipeline = parse("APG() | Rescale(0.7)")
    assert isinstance(pipeline, Pipeline)
    assert pipeline == APG() | Rescale(0.7)
    assert isinstance(parse("APG(eta=0.5)"), Processor)
    assert isinstance(parse("CFG(7) | APG()"), Piped)
    assert isinstance(parse("CFG(7)"), Expr)


def test_whitespace_tolerance():
    text = "\n  CFG( 7 )\n+\tAutoguidance( 1.5 , model = 'weak' , )  |APG(eta=0 ,)\n"
    assert parse(text) == (CFG(7) + Autoguidance(1.5) | APG(eta=0))
    assert parse("CFG(7)+Autoguidance(1.5)|APG()") == parse(text)
    assert parse("Autoguidance ( 1 ) . between ( 0 , 1 )") == Autoguidance(1).between(0, 1)


def test_argument_values():
    text = "(1, 'a', \"b\", None, True, False, [2, -inf, - -3], (3,), (4), (), [], 1e-05, +2.5)"
    assert read_value(text) == (
        1, "a", "b", None, True, False, (2, -inf, 3), (3,), 4, (), (), 1e-05, 2.5,
    )
    assert isinstance(read_value("3"), int)
    assert isinstance(read_value("3.0"), float)
    assert read_value(r"'it\'s \"x\" \\ \n'") == "it's \"x\" \\ \n"
    assert read_value('"it\'s"') == "it's"


# -- random expressions: parse(str(e)) == e ---------------------------------------------------

numbers = st.one_of(
    st.integers(-20, 20),
    st.floats(-1e3, 1e3, allow_nan=False),
    st.sampled_from([1e-05, 0.1, 1e20, -2.5e-300, 5e-324]),
)
bounds = st.tuples(st.floats(0, 50), st.floats(0, 100) | st.just(inf)).filter(
    lambda b: b[0] < b[1]
)
models = st.sampled_from(["weak", "tiny"])
pred_leaves = st.one_of(
    st.builds(CFG, numbers),
    st.just(C),
    st.just(U),
    st.builds(Cond, model=st.sampled_from(["main", "other"])),
    st.builds(TCFG, numbers),
    st.builds(CFGZeroStar, numbers, zero_init_steps=st.integers(0, 3)),
)


def direction_trees(leaves):
    """Directions built from ``leaves`` with every operator that keeps a direction."""
    return st.recursive(
        leaves,
        lambda ds: st.one_of(
            st.builds(operator.add, ds, ds),
            st.builds(operator.sub, ds, ds),
            st.builds(operator.neg, ds),
            st.builds(operator.mul, numbers, ds),
            st.builds(lambda d, b: d.between(*b), ds, bounds),
        ),
        max_leaves=6,
    )


autoguidance = st.builds(Autoguidance, numbers, model=models)
directions = direction_trees(autoguidance | st.builds(operator.sub, pred_leaves, pred_leaves))
linear_directions = direction_trees(autoguidance | st.just(C - U))  # what APG accepts
predictions = st.recursive(
    pred_leaves,
    lambda ps: st.one_of(
        st.builds(operator.add, ps, directions),
        st.builds(operator.add, directions, ps),
        st.builds(operator.sub, ps, directions),
        st.builds(lambda p, b: p.between(*b), ps, bounds),
    ),
    max_leaves=4,
)
names = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=6)
cads_taus = st.tuples(st.floats(0, 1), st.floats(0, 1)).filter(lambda t: t[0] < t[1])
post = st.one_of(
    st.builds(Rescale, st.floats(0, 1)),
    st.builds(
        lambda t, s, psi, keys: CADS(t[0], t[1], s, psi, keys=keys),
        cads_taus, st.floats(0, 10), st.floats(0, 1),
        st.none() | st.lists(names, max_size=3).map(tuple),
    ),
)
apgs = st.builds(APG, numbers, st.none() | st.floats(1e-3, 100), numbers)
expressions = st.one_of(
    directions,
    predictions,
    st.builds(lambda p, ps: functools.reduce(operator.or_, ps, p), predictions,
              st.lists(post, min_size=1, max_size=3)),
    st.builds(lambda w, d, a: CFG(w) + d | a, numbers, linear_directions, apgs),
    st.lists(post | apgs, min_size=1, max_size=3).map(lambda ps: functools.reduce(operator.or_, ps)),
)


@settings(max_examples=300, deadline=None)
@given(expressions)
def test_random_round_trip(expr):
    text = str(expr)
    assert parse(text) == expr
    assert str(parse(text)) == text


# -- limits and linear reading -----------------------------------------------------------------


def test_long_pipe_at_the_limit_parses():
    """75 KB of pipes (quadratic, 64 s, before the ast rewrite) reads as one Piped value."""
    from guidekit.parse import MAX_LENGTH

    text = "CFG(7)" + " | Rescale(0.7)" * 5000
    assert len(text) <= MAX_LENGTH
    piped = parse(text)
    assert isinstance(piped, Piped) and len(piped.steps) == 5000
    procs = parse("APG()" + " | Rescale(0.7)" * 2000)
    assert isinstance(procs, Pipeline) and len(procs.steps) == 2001
