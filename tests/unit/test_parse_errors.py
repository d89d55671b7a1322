"""guidekit.parse refuses what it cannot read: error positions, library errors passed through
with the position noted, non-text input, the length limits; and it never evaluates code.
"""

import builtins
import sys

import pytest
from test_parse import D, inf  # the values the reading tests use

from guidekit import (
    APG,
    CADS,
    CFG,
    PAG,
    TCFG,
    Autoguidance,
    CFGZeroStar,
    Cond,
    GuidanceError,
    GuidanceTypeError,
    GuidanceValueError,
    ParseError,
    Rescale,
    parse,
)
from guidekit.parse import MAX_DEPTH


@pytest.mark.parametrize(
    "text, position, fragment",
    [
        ("", 0, "empty"),
        ("   \n ", 0, "empty"),
        ("CGF(7)", 0, "did you mean CFG?"),
        ("cfg(7)", 0, "did you mean CFG?"),
        ("CFG(7) + Autoguidnce(1.5)", 9, "did you mean Autoguidance?"),
        ("CFG(7) + Foo(1)", 9, "known constructors: APG, Autoguidance, BetaCFG, CADS, CFG"),
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


# -- limits ------------------------------------------------------------------------------------


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
