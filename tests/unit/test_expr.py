"""The expression tree: kinds, normal form, repr and operator plumbing."""

import pytest
import torch

from guidekit import (
    APG,
    CADS,
    CFG,
    Autoguidance,
    Cond,
    GuidanceTypeError,
    Piped,
    Pipeline,
    Rescale,
    Scaled,
    Sum,
    Uncond,
)
from guidekit.expr import fmt_number

D = Autoguidance(1.5)
E = Autoguidance(2, model="tiny")


def test_values_are_frozen_hashable_and_convert_numbers():
    assert CFG(7) == CFG(7.0)
    assert hash(CFG(7)) == hash(CFG(7.0))
    assert len({CFG(7), CFG(7.0), CFG(3)}) == 2
    with pytest.raises(AttributeError):
        CFG(7).scale = 3  # type: ignore[misc]


def test_kinds():
    assert CFG(7).is_prediction and Cond().is_prediction and Uncond().is_prediction
    assert D.is_direction
    assert (Cond() - Uncond()).is_direction
    assert (CFG(7) + D).is_prediction
    assert (D + E).is_direction
    assert (2 * D).is_direction
    assert (CFG(7) - Cond() + Cond()).is_prediction


def test_precedence_matches_python():
    g = CFG(7) + D | APG(eta=0)
    assert isinstance(g, Piped)
    assert g.expr == Sum((CFG(7), D))
    assert g.steps == (APG(eta=0),)
    assert (Cond() + 2 * D) == Sum((Cond(), Scaled(2.0, D)))


def test_sums_flatten_left_operand_only():
    a, b, c = Cond(), D, E
    assert (a + b + c) == Sum((a, b, c))
    assert (a + (b + c)) == Sum((a, Sum((b, c))))
    assert (a - b - c) == Sum((a, Scaled(-1.0, b), Scaled(-1.0, c)))


def test_scaling_normal_form():
    assert 2 * (3 * D) == 6 * D
    assert 1 * D is D
    negated = -D
    assert -negated == D
    assert D / 2 == 0.5 * D
    assert sum([D, E]) == D + E


@pytest.mark.parametrize(
    "expr, text",
    [
        (CFG(7) + D | APG(eta=0), "CFG(7) + Autoguidance(1.5) | APG()"),
        (CFG(7) - Cond() + 2 * (Cond() - Uncond()), "CFG(7) - Cond() + 2 * (Cond() - Uncond())"),
        (Cond() - (D + E), "Cond() - (Autoguidance(1.5) + Autoguidance(2, model='tiny'))"),
        (Cond() - 2 * D, "Cond() - 2 * Autoguidance(1.5)"),
        (-(Cond() - Uncond()) + Cond(), "-(Cond() - Uncond()) + Cond()"),
        ((2 * D).between(0.5, 10) + Cond(), "(2 * Autoguidance(1.5)).between(0.5, 10) + Cond()"),
        (CFG(3).between(1, float("inf")), "CFG(3).between(1, inf)"),
        (CFG(3) | APG(eta=1, norm_threshold=5, momentum=-0.5) | Rescale(0.7),
         "CFG(3) | APG(eta=1, norm_threshold=5, momentum=-0.5) | Rescale(0.7)"),
        (CFG(2) | CADS(keys=("y",)), "CFG(2) | CADS(keys=('y',))"),
    ],
)
def test_repr_shows_parse_with_minimal_parentheses(expr, text):
    assert repr(expr) == text
    assert str(expr) == text


def test_processor_pipelines_compose_associatively():
    p, q, r = APG(eta=0), Rescale(0.5), CADS()
    assert isinstance(p | q, Pipeline)
    assert ((CFG(3) | p) | q) == (CFG(3) | (p | q))
    assert ((p | q) | r) == (p | (q | r))


def test_fmt_number_round_trips():
    for v in [7.0, 0.1, 1e-05, -2.5, 1e20, float("inf")]:
        assert float(fmt_number(v)) == v
    assert fmt_number(7.0) == "7"


def test_tensor_scales_are_rejected_by_name():
    with pytest.raises(GuidanceTypeError, match=r"CFG\(scale=\.\.\.\).*float\(t\)"):
        CFG(torch.tensor(7.0))


def test_branches_in_first_appearance_order():
    assert [b.label for b in (D + CFG(2)).branches()] == ["c", "c@weak", "u"]
