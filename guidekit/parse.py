"""Read guidance text back into an expression, so that ``parse(str(e)) == e``.

A small tokenizer and recursive-descent parser: nothing is evaluated, and the only callables
are the constructors in :data:`guidekit.registry.CONSTRUCTORS` and ``.between``. The tree is
built with the library's own operations (:func:`~guidekit.expr.add`, ``sub``, ``scale``,
``pipe``, ``chain``), so it has exactly the structure Python builds from the same text.
Grammar (EBNF, Python's precedence, ``|`` loosest, binary operators left-associative)::

    pipe    = sum { "|" sum }
    sum     = product { ( "+" | "-" ) product }
    product = unary { ( "*" | "/" ) unary }
    unary   = { "-" | "+" } postfix
    postfix = atom { "." "between" call }
    atom    = NAME call | "(" pipe ")" | NUMBER | "inf"
    call    = "(" [ arg { "," arg } [ "," ] ] ")"
    arg     = [ NAME "=" ] value
    value   = { "-" | "+" } ( NUMBER | "inf" ) | STRING | "None" | "True" | "False"
            | "(" [ value { "," value } [ "," ] ] ")" | "[" [ value { "," value } [ "," ] ] "]"
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from guidekit.errors import GuidanceError, GuidanceTypeError, ParseError
from guidekit.expr import Expr, add, class_instead_of_instance, is_number, scale, sub
from guidekit.processor import Piped, Pipeline, Processor, chain, pipe
from guidekit.registry import CONSTRUCTORS

_TOKEN = re.compile(
    r"(?P<ws>\s+)|(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_]\w*)|(?P<op>[()\[\],=|+\-*/.])",
    re.ASCII,
)
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t"}
_CONSTANTS: dict[str, Any] = {"None": None, "True": True, "False": False, "inf": math.inf}
# Deep enough for any real expression, shallow enough to stay far from Python's recursion limit.
MAX_DEPTH = 64


class Token(NamedTuple):
    """One token: ``kind`` is ``num``, ``name``, ``str``, ``op`` or ``end``."""

    kind: str
    text: str
    pos: int
    value: Any = None


def _describe(tok: Token) -> str:
    return "the end of the text" if tok.kind == "end" else repr(tok.text)


def _string(text: str, start: int) -> tuple[str, int]:
    """Read a quoted string starting at ``start``; return its value and the end offset."""
    quote, pos = text[start], start + 1
    out: list[str] = []
    while pos < len(text):
        ch = text[pos]
        if ch == quote:
            return "".join(out), pos + 1
        if ch == "\\":
            esc = text[pos + 1 : pos + 2]
            if not esc:
                break
            if esc not in _ESCAPES:
                raise ParseError(f"unsupported escape '\\{esc}' in a string", text, pos)
            out.append(_ESCAPES[esc])
            pos += 2
            continue
        out.append(ch)
        pos += 1
    raise ParseError("unterminated string", text, start)


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens, ending with one ``end`` token at ``len(text)``."""
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        if text[pos] in "'\"":
            value, end = _string(text, pos)
            tokens.append(Token("str", text[pos:end], pos, value))
            pos = end
            continue
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ParseError(f"unexpected character {text[pos]!r}", text, pos)
        kind, word = m.lastgroup or "", m.group()
        if kind == "num":
            tokens.append(Token(kind, word, pos, int(word) if word.isdigit() else float(word)))
        elif kind != "ws":
            tokens.append(Token(kind, word, pos))
        pos = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


class _Parser:
    """Recursive descent over the token list; each rule returns ``(value, start offset)``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    # -- token helpers -------------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def next(self) -> Token:
        tok = self.tokens[self.i]
        self.i = min(self.i + 1, len(self.tokens) - 1)
        return tok

    def at(self, *ops: str) -> bool:
        return self.tok.kind == "op" and self.tok.text in ops

    def error(self, message: str, pos: int | None = None) -> ParseError:
        return ParseError(message, self.text, self.tok.pos if pos is None else pos)

    def close(self, closer: str, opener: Token) -> None:
        if self.at(closer):
            self.next()
        elif self.tok.kind == "end":
            raise self.error(f"unclosed {opener.text!r}", opener.pos)
        else:
            raise self.error(
                f"expected {closer!r} to close the {opener.text!r} at position {opener.pos}, "
                f"got {_describe(self.tok)}"
            )

    def nest(self, opener: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"brackets nested more than {MAX_DEPTH} deep", opener.pos)

    # -- building --------------------------------------------------------------------------------
    def build(self, fn: Callable[..., Any], pos: int, *args: Any, **kwargs: Any) -> Any:
        """Call a library function; its GuidanceErrors pass through, noting where they arose."""
        try:
            return fn(*args, **kwargs)
        except GuidanceError as err:
            if not isinstance(err, ParseError) and hasattr(err, "add_note"):
                err.add_note(f"(while parsing {self.text!r} at position {pos})")
            raise

    def need_expr(self, value: Any, pos: int) -> None:
        if is_number(value):
            msg = "numbers only scale directions, e.g. 2 * Autoguidance(1)"
            raise self.error(f"the number {value!r} stands where an expression is needed; {msg}", pos)

    # -- expressions -----------------------------------------------------------------------------
    def pipe(self) -> tuple[Any, int]:
        return self.binary(self.sum, "|")

    def sum(self) -> tuple[Any, int]:
        return self.binary(self.product, "+", "-")

    def binary(self, operand: Callable[[], tuple[Any, int]], *ops: str) -> tuple[Any, int]:
        """Left-associative ``operand {op operand}`` for ``|`` (pipe or chain) and ``+``/``-``."""
        left, start = operand()
        while self.at(*ops):
            op = self.next()
            right, rpos = operand()
            self.need_expr(left, start)
            self.need_expr(right, rpos)
            fn: Callable[[Any, Any], Any] = {"+": add, "-": sub, "|": pipe}[op.text]
            if op.text == "|" and isinstance(left, (Processor, Pipeline)):
                fn = chain  # processor | processor makes a Pipeline
            left = self.build(fn, op.pos, left, right)
        return left, start

    def product(self) -> tuple[Any, int]:
        left, start = self.unary()
        while self.at("*", "/"):
            op = self.next()
            right, rpos = self.unary()
            if is_number(left) and is_number(right):  # literal arithmetic, as Python does it
                if op.text == "/" and right == 0:
                    raise self.error("division by zero", rpos)
                left = left * right if op.text == "*" else left / right
            elif op.text == "/":
                left = self.build(Expr.__truediv__, op.pos, left, right)
            else:  # the number is the scale, on whichever side it stands
                k, e = (right, left) if is_number(right) else (left, right)
                left = self.build(scale, op.pos, k, e)
        return left, start

    def unary(self) -> tuple[Any, int]:
        signs: list[Token] = []
        while self.at("-", "+"):
            signs.append(self.next())
        value, start = self.postfix()
        for sign in reversed(signs):  # innermost sign first, as Python applies them
            start = sign.pos
            if sign.text == "+":
                continue
            value = -value if is_number(value) else self.build(scale, sign.pos, -1.0, value)
        return value, start

    def postfix(self) -> tuple[Any, int]:
        value, start = self.atom()
        while self.at("."):
            dot = self.next()
            name = self.next()
            if name.kind != "name" or name.text != "between":
                raise self.error(f"unknown method {name.text!r}: only .between(lo, hi)", name.pos)
            if not isinstance(value, Expr):
                raise self.error(f".between applies to a guidance expression, not {value!r}", dot.pos)
            args, kwargs = self.call_args("between")
            value = self.call(value.between, "between", dot.pos, args, kwargs)
        return value, start

    def atom(self) -> tuple[Any, int]:
        tok = self.next()
        if tok.kind == "num":
            return tok.value, tok.pos
        if tok.kind == "name" and tok.text == "inf":
            return math.inf, tok.pos
        if tok.kind == "name":
            cls = CONSTRUCTORS.get(tok.text)
            if cls is None:
                raise self.error(_unknown(tok.text), tok.pos)
            if not self.at("("):
                raise self.error(class_instead_of_instance(cls), tok.pos)
            args, kwargs = self.call_args(tok.text)
            return self.call(cls, tok.text, tok.pos, args, kwargs), tok.pos
        if tok.kind == "op" and tok.text == "(":
            self.nest(tok)
            value, _ = self.pipe()
            self.close(")", tok)
            self.depth -= 1
            return value, tok.pos
        raise self.error(f"expected a term such as CFG(7), a number or '(', got {_describe(tok)}", tok.pos)

    # -- calls and argument values ----------------------------------------------------------------
    def call_args(self, name: str) -> tuple[list[Any], dict[str, Any]]:
        if not self.at("("):
            raise self.error(f"expected '(' after {name}, got {_describe(self.tok)}")
        opener = self.next()
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        while not self.at(")") and self.tok.kind != "end":
            key = self.tok
            if key.kind == "name" and self.tokens[self.i + 1].text == "=":
                self.i += 2
                if key.text in kwargs:
                    raise self.error(f"keyword argument {key.text!r} repeated", key.pos)
                kwargs[key.text] = self.value()
            elif kwargs:
                raise self.error("positional argument after keyword argument", key.pos)
            else:
                args.append(self.value())
            if not self.at(","):
                break
            self.next()
        self.close(")", opener)
        return args, kwargs

    def call(self, fn: Callable[..., Any], name: str, pos: int, args: list, kwargs: dict) -> Any:
        try:  # check the arguments first: a bad signature is a text error, not a library one
            inspect.signature(fn).bind(*args, **kwargs)
        except TypeError as err:
            raise self.error(f"{name}(...): {err}", pos) from None
        return self.build(fn, pos, *args, **kwargs)

    def value(self) -> Any:
        tok = self.next()
        if tok.kind in ("num", "str"):
            return tok.value
        if tok.kind == "name" and tok.text in _CONSTANTS:
            return _CONSTANTS[tok.text]
        if tok.kind == "name":
            raise self.error(f"unknown value {tok.text!r}; strings need quotes: '{tok.text}'", tok.pos)
        if tok.kind == "op" and tok.text in ("-", "+"):
            number = self.value()
            if not is_number(number):
                raise self.error(f"unary {tok.text} applies to numbers only", tok.pos)
            return -number if tok.text == "-" else number
        if tok.kind == "op" and tok.text in ("(", "["):
            self.nest(tok)
            closer = ")" if tok.text == "(" else "]"
            items, comma = [], False
            while not self.at(closer) and self.tok.kind != "end":
                items.append(self.value())
                if not self.at(","):
                    break
                self.next()
                comma = True
            self.close(closer, tok)
            self.depth -= 1
            return items[0] if tok.text == "(" and len(items) == 1 and not comma else tuple(items)
        kinds = "number, string, tuple, None, True or False"
        raise self.error(f"expected an argument value ({kinds}), got {_describe(tok)}", tok.pos)


def _unknown(name: str) -> str:
    lower = {n.lower(): n for n in CONSTRUCTORS}
    close = difflib.get_close_matches(name.lower(), list(lower), n=1)
    hint = f" (did you mean {lower[close[0]]}?)" if close else ""
    return f"unknown name {name!r}{hint}; known constructors: {', '.join(sorted(CONSTRUCTORS))}"


def parse(text: str) -> Expr | Piped | Pipeline | Processor:
    """Parse guidance text such as ``"CFG(7) + Autoguidance(1.5) | APG(eta=0)"``.

    Malformed text raises :class:`~guidekit.errors.ParseError` with the offending position;
    the algebra's and the constructors' own errors (two predictions added, a scale out of
    range) propagate unchanged.
    """
    if not isinstance(text, str):
        raise GuidanceTypeError(f"parse() takes guidance text (str), got {type(text).__name__}")
    if not text.strip():
        raise ParseError("empty guidance text; expected an expression such as CFG(7)", text, 0)
    parser = _Parser(text)
    value, start = parser.pipe()
    if parser.at(")"):
        raise parser.error("unmatched ')'")
    if parser.tok.kind != "end":
        raise parser.error(f"unexpected {_describe(parser.tok)} after a complete expression")
    parser.need_expr(value, start)
    return value
