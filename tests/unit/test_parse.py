"""guidekit.parse: round trips, Python's precedence, error positions, and no evaluation."""

import builtins
import functools
import math
import operator
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guidekit import (
    APG,
    CADS,
    CFG,
    PAG,
    TCFG,
    Autoguidance,
    CFGZeroStar,
    Cond,
    Expr,
    GuidanceError,
    GuidanceTypeError,
    GuidanceValueError,
    ParseError,
    Piped,
    Pipeline,
    Rescale,
    Scaled,
    Sum,
    Uncond,
    parse,
)
from guidekit.combinators.base import Processor
from guidekit.parse import MAX_DEPTH, read_value

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


@pytest.mark.parametrize(
    "text, position, fragment",
    [
        ("", 0, "empty"),
        ("   \n ", 0, "empty"),
        ("CGF(7)", 0, "did you mean CFG?"),
        ("cfg(7)", 0, "did you mean CFG?"),
        ("CFG(7) + Autoguidnce(1.5)", 9, "did you mean Autoguidance?"),
        ("CFG(7) + Foo(1)", 9, "known constructors: APG, Autoguidance, CADS, CFG"),
        ("CFG(7) @ APG()", 7, "operator '@' is not part of guidance text"),
        ("CFG(7) ** 2", 7, "operator '**'"),
        ("CFG(7) // 2", 7, "operator '//'"),
        ("CFG(7) + Autoguidance(1.5) $", 27, "unexpected character '$'"),
        ("CFG(7); import os", 6, "invalid syntax"),
        ("(CFG(7) + Autoguidance(1.5)", 0, "unclosed '('"),
        ("CFG(7", 3, "unclosed '('"),
        ("CADS(keys=('y',)", 4, "unclosed '('"),
        ("CADS(keys=['y'", 10, "unclosed '['"),
        ("CFG(7).between(0, 1", 14, "unclosed '('"),
        ("(CFG(7) + Autoguidance(1.5)]", 27, "expected ')' to close the '(' at position 0"),
        ("CFG(7]", 5, "expected ')' to close the '(' at position 3"),
        ("CFG(7))", 6, "unmatched ')'"),
        ("CFG(7) +", 8, "got the end of the text"),
        ("CFG(7) + | APG()", 9, "got '|'"),
        ("| APG()", 0, "got '|'"),
        ("CFG(7) + * Autoguidance(1)", 9, "invalid syntax"),
        ("CFG(7) | ", 9, "got the end of the text"),
        ("()", 0, "a tuple is not part of guidance text"),
        ("CFG(7), CFG(3)", 0, "a tuple is not part of guidance text"),
        ("CFG(7) if True else CFG(3)", 0, "an if/else is not part"),
        ("CFG(7) < CFG(3)", 0, "a comparison is not part"),
        ("'CFG(7)'", 0, "a string stands where an expression is needed"),
        ("CFG(7)(1)", 0, "only constructors such as CFG(7)"),
        ("~CFG(7)", 0, "UnaryOp is not part"),
        ("not CFG(7)", 0, "UnaryOp is not part"),
        ("CFG(*[7])", 0, "*args and **kwargs"),
        ("f'{CFG}'", 0, "an f-string is not part"),
        ("CFG(7) Cond()", 0, "Perhaps you forgot a comma?"),
        ("CFG(7) + Autoguidance(1.5) 2", 0, "Perhaps you forgot a comma?"),
        ("CFG(7)[0]", 0, "a subscript [...] is not part"),
        ("3 + CFG(7)", 0, "the number 3 stands where an expression is needed"),
        ("CFG(7) + 3", 9, "the number 3"),
        ("CFG(7) - -3", 9, "the number -3"),
        ("2", 0, "the number 2"),
        ("2 * 3", 0, "the number 6"),
        ("inf", 0, "the number inf"),
        ("CFG(7) | 2", 9, "the number 2"),
        ("CFG(7) | 2 | APG()", 9, "the number 2"),
        ("CFG(7) | | APG()", 9, "got '|'"),
        ("2 | APG()", 0, "the number 2"),
        ("(2).between(0, 1)", 2, ".between applies to a guidance expression"),
        ("2 / CFG(7)", 4, "cannot divide by CFG(7)"),
        ("APG().between(0, 1)", 5, ".between applies to a guidance expression"),
        ("1 / 0 * Autoguidance(1)", 4, "division by zero"),
        ("CFG(7).foo(1)", 7, "unknown method 'foo'"),
        ("CFG(7).between", 6, "between is a method: call it"),
        ("CFG + Cond()", 0, "CFG is a term class, not a term"),
        ("CFG()", 0, "CFG(...): missing a required argument: 'scale'"),
        ("CFG(7, 8)", 0, "too many positional arguments"),
        ("APG(bogus=1)", 0, "unexpected keyword argument 'bogus'"),
        ("CFG(7).between(0)", 6, "between(...): missing a required argument: 'hi'"),
        ("APG(eta=1, eta=2)", 11, "keyword argument 'eta' repeated"),
        ("Autoguidance(model='weak', 2)", 28, "positional argument follows keyword argument"),
        ("Cond(model=weak)", 11, "strings need quotes"),
        ("Cond(model='weak)", 11, "unterminated string"),
        ("Cond(model='a\\", 11, "unterminated string"),
        ("Cond(model='a\\qb')", 11, "invalid escape sequence"),
        ("CFG(-'a')", 4, "unary - applies to numbers only"),
        ("CFG(=)", 4, "invalid syntax"),
        ("CFG(Cond())", 4, "expected an argument value"),
        ("CFG(1 + 2)", 4, "expected an argument value"),
        ("__import__('os')", 0, "unknown name '__import__'"),
        ("CFG(7).__class__", 7, "unknown method '__class__'"),
        ("Cond(model=__import__('os'))", 11, "expected an argument value"),
        ("lambda: 0", 0, "a lambda is not part"),
        ("open('x')", 0, "unknown name 'open'"),
        ("None", 0, "the value None is not part"),
        ("(" * 100 + "CFG(7)" + ")" * 100, MAX_DEPTH, "nested"),
        ("CADS(keys=" + "[" * 100 + "]" * 100 + ")", 10 + MAX_DEPTH - 1, "nested"),
        ("-" * 100 + "CFG(7)", MAX_DEPTH + 1, "nested"),
        ("CFG(" + "9" * 400 + ")", 4, "a number of 400 characters"),
        ("9" * 5000, 0, "a number of 5000 characters"),
        ("CFG(7) + " + "9" * 5000 + " * Autoguidance(1)", 9, "at most 100"),
        ("CFG(7) +\n  é * Autoguidance(1)", 11, "unknown name 'é'"),
    ],
)
def test_parse_errors(text, position, fragment):
    with pytest.raises(ParseError) as info:
        parse(text)
    err = info.value
    assert err.position == position
    assert err.text == text
    assert fragment in str(err)
    assert isinstance(err, GuidanceValueError) and isinstance(err, GuidanceError)


def test_no_evaluation(monkeypatch):
    def forbidden(*_args, **_kwargs):
        raise AssertionError("parse must not evaluate code")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert parse("CFG(7) + Autoguidance(1.5) | APG(eta=0)") == CFG(7) + D | APG()
    with pytest.raises(ParseError):
        parse("__import__('os')")
    with pytest.raises(ParseError):
        parse("CFG(7).__class__.__subclasses__()")
    # a string argument stays a string: the term's own validator rejects it
    with pytest.raises(GuidanceTypeError, match="must be a name"):
        parse("Cond(model='__import__(\"os\").system(\"true\")')")


@pytest.mark.parametrize(
    "text, build",
    [
        ("CFG(7) + CFG(3)", lambda: CFG(7) + CFG(3)),
        ("2 * CFG(7)", lambda: 2 * CFG(7)),
        ("-CFG(7)", lambda: -CFG(7)),
        ("Cond() * Autoguidance(1)", lambda: Cond() * Autoguidance(1)),
        ("CFG(3) + + PAG(1)", lambda: CFG(3) + + PAG(1)),
        ("+CFG(7)", lambda: +CFG(7)),
        ("Autoguidance(1) | APG()", lambda: Autoguidance(1) | APG()),
        ("CFG(7) | Cond()", lambda: CFG(7) | Cond()),
        ("APG() + CFG(7)", lambda: APG() + CFG(7)),
        ("APG() | CFG(7)", lambda: APG() | CFG(7)),
        ("Autoguidance(1) / 0", lambda: Autoguidance(1) / 0),
        ("Autoguidance(1) - CFG(7)", lambda: Autoguidance(1) - CFG(7)),
        ("(CFG(7) | APG()) + Autoguidance(1)", lambda: (CFG(7) | APG()) + Autoguidance(1)),
        ("(CFG(7) | APG()).between(0, 1)", lambda: (CFG(7) | APG()).between(0, 1)),
        ("TCFG(5) | APG()", lambda: TCFG(5) | APG()),
        ("Cond() | APG()", lambda: Cond() | APG()),
        ("CFG(inf)", lambda: CFG(inf)),
        ("CFG(7).between(2, 1)", lambda: CFG(7).between(2, 1)),
        ("CADS(tau1=0.9, tau2=0.5)", lambda: CADS(tau1=0.9, tau2=0.5)),
        ("CADS(keys=(1,))", lambda: CADS(keys=(1,))),
        ("CFGZeroStar(4, zero_init_steps=True)", lambda: CFGZeroStar(4, zero_init_steps=True)),
        ("Autoguidance(2, model='main')", lambda: Autoguidance(2, model="main")),
        ("inf * Autoguidance(1)", lambda: inf * Autoguidance(1)),
        ("Rescale(1.5)", lambda: Rescale(1.5)),
    ],
)
def test_library_errors_pass_through(text, build):
    with pytest.raises(GuidanceError) as expected:
        build()
    with pytest.raises(GuidanceError) as got:
        parse(text)
    assert not isinstance(got.value, ParseError)
    assert type(got.value) is type(expected.value)
    assert str(got.value) == str(expected.value)


def test_library_errors_note_the_position():
    with pytest.raises(GuidanceTypeError) as info:
        parse("CFG(7) + CFG(3)")
    notes = getattr(info.value, "__notes__", [])
    if sys.version_info >= (3, 11):  # exception notes exist from Python 3.11 on
        assert any("position 7" in note for note in notes)
    else:
        assert notes == []


def test_non_text_is_a_type_error():
    with pytest.raises(GuidanceTypeError, match="str"):
        parse(CFG(7))  # type: ignore[arg-type]


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


def test_over_the_limits_is_a_parse_error():
    from guidekit.parse import MAX_LENGTH, MAX_OPERATORS

    text = "CFG(7)" + " | Rescale(0.7)" * (MAX_LENGTH // 15 + 1)
    with pytest.raises(ParseError, match=f"at most {MAX_LENGTH}") as info:
        parse(text)
    assert info.value.position == MAX_LENGTH
    with pytest.raises(ParseError, match=f"at most {MAX_OPERATORS}"):
        parse("CFG(7)" + " + Autoguidance(1)" * (MAX_OPERATORS + 1))
    assert parse("CFG(7)" + " + Autoguidance(1)" * (MAX_OPERATORS - 1)) is not None


def test_a_failing_processor_in_a_long_pipe_is_reported_where_it_stands():
    with pytest.raises(GuidanceTypeError) as info:
        parse("Autoguidance(1) | Rescale(0.7) | APG()")
    assert "direction" in str(info.value)
