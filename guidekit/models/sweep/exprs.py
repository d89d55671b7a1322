"""Guidance expressions given to the sweep as text, besides its named methods.

An expression with a ``{s}`` placeholder is swept over the scales (``--scales``); one without
runs once per seed. Every expression is read by ``guidekit.parse`` (at every scale it will
run at) before anything is sampled, so a typo stops the sweep at once, naming the expression.
Its method column is the expression's repr, with ``{s}`` where the scale goes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

import guidekit
from guidekit.errors import GuidanceError, GuidanceValueError

#: where the swept scale goes in an expression's text
PLACEHOLDER = "{s}"
# a number no one writes, parsed in the placeholder's stead to read the expression's repr
_PROBE = "7919.625"


def fmt_scale(scale: float | None) -> str:
    """A scale as the CSV writes it (``""``: the job has no scale)."""
    return "" if scale is None else f"{scale:g}"


@attrs.frozen
class Expr:
    """One sweep expression: ``template`` (``{s}`` where the scale goes) and ``method``,
    the readable name its rows, summary lines and Pareto panel go by."""

    template: str
    method: str

    @property
    def swept(self) -> bool:
        return PLACEHOLDER in self.template

    def text(self, scale: float | None) -> str:
        """The guidance text at ``scale`` (read by ``guidekit.parse``)."""
        if scale is None:
            return self.template
        return self.template.replace(PLACEHOLDER, fmt_scale(scale))


def method_name(template: str) -> str:
    """The expression's repr, ``{s}`` kept: ``"CFG({s})|APG(eta=0)"`` -> ``CFG({s}) | APG()``.

    Falls back to the text itself (spaces collapsed) where the probe number cannot stand in
    for ``{s}`` (a bound it breaks) or the repr does not show it once per placeholder.
    """
    plain = " ".join(template.split())
    if PLACEHOLDER not in template:
        return repr(guidekit.parse(template))
    try:
        shown = repr(guidekit.parse(template.replace(PLACEHOLDER, _PROBE)))
    except GuidanceError:
        return plain
    if _PROBE in template or shown.count(_PROBE) != template.count(PLACEHOLDER):
        return plain
    return shown.replace(_PROBE, PLACEHOLDER)


def read_exprs(path: str | Path) -> list[str]:
    """The expressions in a file: one per line; ``#`` starts a comment, blank lines skipped."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line]


def check_exprs(texts: Iterable[str], scales: Sequence[float] | None) -> list[Expr]:
    """Parse every expression at every scale it will run at; raise GuidanceValueError naming
    the expression on a parse error, on ``{s}`` without scales, or on a repeat."""
    out: list[Expr] = []
    seen: dict[str, str] = {}
    for raw in texts:
        template = raw.strip()
        if PLACEHOLDER in template and not scales:
            raise GuidanceValueError(
                f"sweep expression {template!r} has a {PLACEHOLDER} placeholder but no scales "
                "were given: pass --scales (scales=...) or write the scale in")
        at = [None] if PLACEHOLDER not in template else list(scales or ())
        for scale in at:
            text = Expr(template, "").text(None if scale is None else float(scale))
            try:
                guidekit.parse(text)
            except GuidanceError as err:
                raise GuidanceValueError(f"sweep expression {template!r}"
                                         + (f" at scale {fmt_scale(scale)}" if scale is not None
                                            else "") + f": {err}") from err
        method = method_name(template)
        if method in seen:
            raise GuidanceValueError(f"sweep expressions {seen[method]!r} and {template!r} are "
                                     f"the same expression ({method}): give it once")
        seen[method] = template
        out.append(Expr(template, method))
    return out
