"""Named conditionings: ``Cond("style")`` and ``CFG(w, cond=..., negative=...)``."""

from __future__ import annotations

import pytest
import torch

import guidekit
from guidekit import CFG, Cond, Uncond, parse
from guidekit.errors import GuidanceValueError


def _model(x: torch.Tensor, sigma: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
    return x * y[:, None]


def test_a_negative_prompt_replaces_the_empty_one_in_one_call() -> None:
    e = CFG(7, negative="neg")
    assert parse(str(e)) == e and str(e) == "CFG(7, negative='neg')"
    plan = guidekit.compile(e, prediction="eps")
    x = torch.ones(2, 3)
    conds = {"neg": {"y": torch.tensor([2.0, 2.0])}}
    g = guidekit.guide(plan, _model, cond={"y": torch.tensor([5.0, 5.0])}, conds=conds)
    out = g(x, 1.0)
    torch.testing.assert_close(out, 2.0 + 7 * (5.0 - 2.0) * x)
    assert [(c.rows, c.branches) for c in g.calls] == [(4, ("c", "neg"))]


def test_equal_named_branches_are_one_row_block() -> None:
    e = CFG(7, negative="neg") + 2 * (Cond("style") - Cond("neg")) + (Cond("style") - Uncond())
    plan = guidekit.compile(e, prediction="eps")
    assert [b.label for b in plan.branches] == ["c", "u", "neg", "style"]
    assert plan.rows(1.0, batch=3) == 12


def test_a_missing_named_conditioning_is_refused_by_name() -> None:
    plan = guidekit.compile(CFG(7, cond="style"), prediction="eps")
    with pytest.raises(GuidanceValueError, match="'style'"):
        guidekit.guide(plan, _model, cond={"y": torch.ones(1)}, uncond={"y": torch.ones(1)})


def test_cfg_between_one_conditioning_and_itself_is_refused() -> None:
    with pytest.raises(GuidanceValueError, match="the same"):
        CFG(7, cond="neg", negative="neg")
