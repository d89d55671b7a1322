"""Read guidance text back into an expression, so that ``parse(str(e)) == e``.

The text is a Python expression, read by the standard library's :mod:`ast` (which evaluates
nothing) and then walked over a whitelist: constructor calls from
:data:`guidekit.registry.CONSTRUCTORS` with literal arguments (numbers, ``inf``, strings,
``None``/``True``/``False``, tuples and lists of those), numbers, unary ``-``/``+``, binary
``+ - * /`` and ``|``, and the method ``.between(lo, hi)``. Operators are applied to the real
objects with Python's own operators, so parse accepts and rejects exactly what the same
Python expression does (and raises the same library errors); anything else is a
:class:`~guidekit.errors.ParseError` with a position.

Limits (checked before any work, each with a position):

* :data:`MAX_LENGTH` characters of text;
* :data:`MAX_DEPTH` levels of brackets, signs or nested right operands;
* :data:`MAX_OPERATORS` operators between two top-level ``|`` (a pipe of any length is fine);
* :data:`MAX_NUMBER` characters in one number literal (write ``inf`` for an unbounded bound).

Time is linear in the length of the text: the top-level ``|`` chain is split on the tokens
and each part is read on its own, and consecutive post-processors are piped in one step.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import io
import math
import operator
import tokenize
import warnings
from collections.abc import Callable
from typing import Any

from guidekit.errors import GuidanceError, GuidanceTypeError, ParseError
from guidekit.expr import Expr, class_instead_of_instance, is_number
from guidekit.processor import AttentionModifier, Piped, Pipeline, Processor
from guidekit.registry import CONSTRUCTORS
from guidekit.schedules import SCHEDULES

#: longest guidance text accepted, in characters
MAX_LENGTH = 100_000
#: deepest nesting of brackets, signs and right operands
MAX_DEPTH = 64
#: most operators (``+ - * /`` and signs) between two top-level ``|``
MAX_OPERATORS = 1000
#: longest number literal, in characters
MAX_NUMBER = 100

_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {")", "]", "}"}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.Div: operator.truediv, ast.BitOr: operator.or_}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.BitOr: "|",
           ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**", ast.MatMult: "@",
           ast.BitAnd: "&", ast.BitXor: "^", ast.LShift: "<<", ast.RShift: ">>"}
_VALUES = "a number, 'string', tuple, None, True or False"


def _unknown(name: str) -> str:
    lower = {n.lower(): n for n in CONSTRUCTORS}
    close = difflib.get_close_matches(name.lower(), list(lower), n=3)
    # among equally close names, a transposition of the same letters wins (CGF -> CFG, not ICG)
    close.sort(key=lambda n: sorted(n) != sorted(name.lower()))
    hint = f" (did you mean {lower[close[0]]}?)" if close else ""
    return f"unknown name {name!r}{hint}; known constructors: {', '.join(sorted(CONSTRUCTORS))}"


def _kind(node: ast.AST) -> str:
    """A few words for an AST node the whitelist refuses."""
    if isinstance(node, ast.Constant):
        return f"the value {node.value!r}"
    words = {ast.Compare: "a comparison", ast.Lambda: "a lambda", ast.Subscript: "a subscript [...]",
             ast.BoolOp: "and/or", ast.IfExp: "an if/else", ast.Dict: "a dict",
             ast.Set: "a set", ast.NamedExpr: "an assignment :=", ast.JoinedStr: "an f-string",
             ast.Starred: "*unpacking", ast.Tuple: "a tuple", ast.List: "a list",
             ast.Call: "a call", ast.Attribute: "an attribute"}
    return next((w for t, w in words.items() if isinstance(node, t)), type(node).__name__)


class _Text:
    """Guidance text and the conversion from token / AST coordinates to character offsets."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.starts = [0]
        for i, ch in enumerate(text):
            if ch == "\n":
                self.starts.append(i + 1)

    def at(self, row: int, col: int) -> int:
        """Offset of (1-based row, character column) in the text."""
        return min(self.starts[min(row, len(self.starts)) - 1] + col, len(self.text))

    def error(self, message: str, pos: int) -> ParseError:
        return ParseError(message, self.text, max(0, min(pos, len(self.text))))


def _scan(src: _Text) -> list[tuple[int, int]]:
    """Check brackets, numbers and characters on the tokens; return the top-level ``|`` parts.

    The text is tokenized inside a pair of brackets (as Python reads a bracketed expression,
    so newlines are whitespace); returns ``(start, end)`` of each part between top-level ``|``.
    """
    text = src.text
    stack: list[tuple[str, int]] = []
    parts: list[tuple[int, int]] = []
    start = 0
    tokens = tokenize.generate_tokens(io.StringIO("(" + text + "\n)").readline)
    while True:
        try:
            tok = next(tokens)
        except StopIteration:
            break
        except (tokenize.TokenError, SyntaxError):
            break  # an unclosed bracket (reported below) or an error ast.parse reports
        row, col = tok.start
        pos = -1 if row > len(src.starts) else src.at(row, col - (row == 1))
        if pos < 0 or pos >= len(text):
            continue  # the wrapping brackets
        if tok.type == tokenize.ERRORTOKEN and not tok.string.isspace():
            what = "unterminated string" if tok.string[:1] in "'\"" else f"unexpected character {tok.string!r}"
            raise src.error(what, pos)
        if tok.type == tokenize.NUMBER and len(tok.string) > MAX_NUMBER:
            raise src.error(
                f"a number of {len(tok.string)} characters; at most {MAX_NUMBER} (a float is "
                f"finite below 1.8e308: write inf for an unbounded value)", pos)
        if tok.type != tokenize.OP:
            continue
        if tok.string in _OPEN:
            stack.append((tok.string, pos))
            if len(stack) > MAX_DEPTH:
                raise src.error(f"brackets nested more than {MAX_DEPTH} deep", pos)
        elif tok.string in _CLOSE:
            if not stack:
                raise src.error(f"unmatched {tok.string!r}", pos)
            opener, at = stack.pop()
            if _OPEN[opener] != tok.string:
                raise src.error(f"expected {_OPEN[opener]!r} to close the {opener!r} at "
                                f"position {at}, got {tok.string!r}", pos)
        elif tok.string == "|" and not stack:
            parts.append((start, pos))
            start = pos + 1
    if stack:
        opener, at = stack[-1]
        raise src.error(f"unclosed {opener!r}: add the matching {_OPEN[opener]!r}", at)
    return [*parts, (start, len(text))]


class _Reader:
    """Evaluate one part's AST over the whitelist, with positions relative to the whole text."""

    def __init__(self, src: _Text, start: int, end: int) -> None:
        self.src = src
        self.start = start
        self.code = "(" + src.text[start:end] + "\n)"
        self.lines = self.code.split("\n")

    def pos(self, node: Any, end: bool = False) -> int:
        row, col = (node.end_lineno, node.end_col_offset) if end else (node.lineno, node.col_offset)
        return self.offset(row, col)

    def offset(self, row: int, col_bytes: int) -> int:
        """Text offset of an AST (row, UTF-8 byte column) in this part's wrapped code."""
        line = self.lines[row - 1] if row - 1 < len(self.lines) else ""
        col = len(line.encode()[:col_bytes].decode(errors="ignore"))
        before = sum(len(x) + 1 for x in self.lines[: row - 1])
        return self.start + before + col - 1

    def error(self, message: str, node: Any) -> ParseError:
        return self.src.error(message, self.pos(node))

    def read(self) -> Any:
        end = self.start + len(self.code) - 3
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # Python's warnings (bad escapes) are errors here
                tree = ast.parse(self.code, mode="eval")
        except SyntaxError as err:
            row, col = err.lineno or 1, (err.offset or 1) - 1
            line = self.lines[row - 1] if row - 1 < len(self.lines) else ""
            pos = self.offset(row, len(line[:col].encode()))
            if pos >= end:  # the part ended where an operand was still needed
                what = "the end of the text" if end >= len(self.src.text) else repr(self.src.text[end])
                raise self.src.error(f"expected a term such as CFG(7), a number or '(', got {what}",
                                     end) from None
            raise self.src.error(f"invalid syntax ({err.msg}); guidance text is a Python "
                                 f"expression such as CFG(7) + PAG(3) | APG()", pos) from None
        except (RecursionError, MemoryError):
            raise self.src.error(f"expression too deeply nested; at most {MAX_DEPTH} levels",
                                 self.start) from None
        ops = sum(isinstance(n, (ast.BinOp, ast.UnaryOp)) for n in ast.walk(tree.body))
        if ops > MAX_OPERATORS:
            raise self.src.error(f"{ops} operators between two '|'; at most {MAX_OPERATORS}: "
                                 f"split the sum, e.g. with guidekit.expr.total([...])", self.start)
        return self.expr(tree.body, 0), self.pos(tree.body)

    # -- expressions -----------------------------------------------------------------------------
    def expr(self, node: ast.AST, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.error(f"expression nested more than {MAX_DEPTH} deep", node)
        chain: list[Any] = []  # left-associative operators and method calls, read without recursion
        while True:
            if isinstance(node, ast.BinOp):
                chain.append(node)
                node = node.left
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                chain.append(node)
                node = node.func.value
            else:
                break
        value = self.atom(node, depth)
        for link in reversed(chain):
            if isinstance(link, ast.BinOp):
                value = self.binary(link, value, self.expr(link.right, depth + 1))
            else:
                value = self.method(link, value, depth)
        return value

    def atom(self, node: ast.AST, depth: int) -> Any:
        if isinstance(node, ast.Constant) and is_number(node.value):
            return node.value
        if isinstance(node, ast.Name):
            if node.id == "inf":
                return math.inf
            cls = CONSTRUCTORS.get(node.id)
            raise self.error(_unknown(node.id) if cls is None else class_instead_of_instance(cls), node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            cls = CONSTRUCTORS.get(node.func.id)
            if cls is None:
                raise self.error(_unknown(node.func.id), node)
            return self.call(cls, node.func.id, node, depth, self.pos(node))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.expr(node.operand, depth + 1)
            fn = operator.neg if isinstance(node.op, ast.USub) else operator.pos
            return fn(value) if is_number(value) else self.build(fn, node, value)
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            raise self.error("a string stands where an expression is needed; strings are "
                             "argument values, e.g. Cond(model='weak')", node)
        if isinstance(node, ast.Call):
            raise self.error("only constructors such as CFG(7) and .between(lo, hi) can be "
                             "called", node)
        if isinstance(node, ast.Attribute):
            dot = self.pos(node.value, end=True)
            if node.attr == "between":
                raise self.src.error("between is a method: call it, e.g. .between(lo, hi)", dot)
            raise self.src.error(f"unknown method {node.attr!r}: only .between(lo, hi)", dot + 1)
        raise self.error(f"{_kind(node)} is not part of guidance text; write terms such as "
                         f"CFG(7) combined with + - * / and |", node)

    def need_expr(self, value: Any, node: ast.AST) -> None:
        if is_number(value):
            raise self.error(f"the number {value!r} stands where an expression is needed; "
                             f"numbers only scale directions, e.g. 2 * Autoguidance(1)", node)

    def binary(self, node: ast.BinOp, left: Any, right: Any) -> Any:
        fn = _ARITH.get(type(node.op))
        symbol = _SYMBOL.get(type(node.op), type(node.op).__name__)
        after = self.pos(node.left, end=True)
        at = self.src.text.find(symbol, after, max(after, self.pos(node.right)))
        at = after if at < 0 else at  # where the operator stands
        if fn is None:
            raise self.src.error(f"operator {symbol!r} is not part of guidance text; use "
                                 f"+ - * / and |", at)
        if fn is operator.truediv and isinstance(right, Expr):
            raise self.error(f"cannot divide by {right!r}: divide a direction by a nonzero "
                             f"number, e.g. Autoguidance(1) / 2", node.right)
        if is_number(left) and is_number(right) and fn is not operator.or_:
            if fn is operator.truediv and right == 0:
                raise self.error("division by zero", node.right)
            return fn(left, right)  # literal arithmetic, as Python does it
        if fn is not operator.mul and fn is not operator.truediv:
            self.need_expr(left, node.left)
            self.need_expr(right, node.right)
        return _build(self.src, at, fn, left, right)

    def method(self, node: ast.Call, value: Any, depth: int) -> Any:
        attr = node.func
        assert isinstance(attr, ast.Attribute)
        dot = self.pos(attr.value, end=True)
        if attr.attr != "between":
            raise self.src.error(f"unknown method {attr.attr!r}: only .between(lo, hi)", dot + 1)
        if not isinstance(value, (Expr, AttentionModifier)) or isinstance(value, type):
            raise self.src.error(f".between applies to a guidance expression or an attention "
                                 f"modifier, not {value!r}", dot)
        return self.call(value.between, "between", node, depth, dot)

    def build(self, fn: Callable[..., Any], node: ast.AST, *args: Any, **kwargs: Any) -> Any:
        return _build(self.src, self.pos(node), fn, *args, **kwargs)

    # -- calls and argument values ---------------------------------------------------------------
    def call(self, fn: Callable[..., Any], name: str, node: ast.Call, depth: int, pos: int) -> Any:
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            raise self.src.error(f"{name}(...): *args and **kwargs are not part of guidance text", pos)
        args = [self.value(a, depth + 1) for a in node.args]
        kwargs: dict[str, Any] = {}
        for k in node.keywords:
            if k.arg in kwargs:  # Python's compiler refuses this; ast.parse alone does not
                raise self.error(f"keyword argument {k.arg!r} repeated: give it once", k)
            kwargs[str(k.arg)] = self.value(k.value, depth + 1)
        try:  # check the arguments first: a bad signature is a text error, not a library one
            inspect.signature(fn).bind(*args, **kwargs)
        except TypeError as err:
            raise self.src.error(f"{name}(...): {err}", pos) from None
        return _build(self.src, pos, fn, *args, **kwargs)

    def value(self, node: ast.AST, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.error(f"argument nested more than {MAX_DEPTH} deep", node)
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, str))
                                               or is_number(node.value)):
            return node.value
        if isinstance(node, ast.Name):
            if node.id == "inf":
                return math.inf
            raise self.error(f"unknown value {node.id!r}; strings need quotes: '{node.id}'", node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            number = self.value(node.operand, depth + 1)
            if not is_number(number):
                sign = "-" if isinstance(node.op, ast.USub) else "+"
                raise self.error(f"unary {sign} applies to numbers only", node)
            return -number if isinstance(node.op, ast.USub) else number
        if isinstance(node, (ast.Tuple, ast.List)):
            return tuple(self.value(item, depth + 1) for item in node.elts)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (
            node.func.id in SCHEDULES
        ):  # a scale by noise level, e.g. CFG(Cosine(7))
            return self.call(SCHEDULES[node.func.id], node.func.id, node, depth, self.pos(node))
        raise self.error(f"expected an argument value ({_VALUES}, or a schedule such as "
                         f"Cosine(7)), got {_kind(node)}", node)


def read_value(text: str) -> Any:
    """Read one argument value (``3``, ``'a'``, ``(1, -inf)``, ``None``) as parse reads it."""
    src = _Text(text)
    _scan(src)
    reader = _Reader(src, 0, len(text))
    try:
        tree = ast.parse(reader.code, mode="eval")
    except SyntaxError as err:
        raise src.error(f"invalid syntax ({err.msg})", (err.offset or 1) - 2) from None
    return reader.value(tree.body, 0)


def _build(src: _Text, pos: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Apply an operator or constructor; the library's errors pass through with a note."""
    try:
        return fn(*args, **kwargs)
    except GuidanceError as err:
        if not isinstance(err, ParseError) and hasattr(err, "add_note"):
            err.add_note(f"(while parsing {src.text!r} at position {pos})")
        raise
    except (TypeError, ValueError, ArithmeticError) as err:  # Python's own, e.g. 2 / CFG(7)
        raise src.error(f"{err}; guidance text combines terms with + - * / and |", pos) from None


def _pipe_all(src: _Text, values: list[tuple[Any, int]]) -> Any:
    """``v0 | v1 | ...`` left to right as Python does it, runs of processors in one step."""
    result = values[0][0]
    i = 1
    while i < len(values):
        j = i
        while j < len(values) and isinstance(values[j][0], (Processor, Pipeline)):
            j += 1
        if j - i > 1 and not isinstance(result, type):
            steps: list[Any] = []
            for value, _ in values[i:j]:
                steps.extend(value.steps if isinstance(value, Pipeline) else (value,))
            try:
                result = result | Pipeline(tuple(steps))
                i = j
                continue
            except GuidanceError:
                pass  # apply them one by one below, to report the failing one where it stands
        value, bar = values[i]
        result = _build(src, bar, operator.or_, result, value)
        i += 1
    return result


def parse(text: str) -> Expr | Piped | Pipeline | Processor:
    """Parse guidance text such as ``"CFG(7) + Autoguidance(1.5) | APG(eta=0)"``.

    Malformed text raises :class:`~guidekit.errors.ParseError` with the offending position;
    the algebra's and the constructors' own errors (two predictions added, a scale out of
    range) propagate unchanged. Limits: :data:`MAX_LENGTH`, :data:`MAX_DEPTH`,
    :data:`MAX_OPERATORS`, :data:`MAX_NUMBER` (see the module docstring).
    """
    if not isinstance(text, str):
        raise GuidanceTypeError(f"parse() takes guidance text (str), got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ParseError(f"guidance text of {len(text)} characters; at most {MAX_LENGTH}",
                         text, MAX_LENGTH)
    src = _Text(text)
    if not text.strip():
        raise src.error("empty guidance text; expected an expression such as CFG(7)", 0)
    values: list[tuple[Any, int]] = []
    for start, end in _scan(src):
        if not text[start:end].strip():
            pos = end if start == 0 else start + len(text[start:end]) - len(text[start:end].lstrip())
            got = "the end of the text" if pos >= len(text) else repr(text[pos])
            raise src.error(f"expected a term such as CFG(7) on each side of '|', got {got}", pos)
        reader = _Reader(src, start, end)
        value, pos = reader.read()
        if is_number(value):
            raise src.error(f"the number {value!r} stands where an expression is needed; "
                            f"numbers only scale directions, e.g. 2 * Autoguidance(1)", pos)
        values.append((value, start - 1))
    return _pipe_all(src, values)
