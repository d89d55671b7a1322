"""Conditionings of different token lengths in one call: ``guidekit.padding`` (share, Tokens)
through ``guide()``, on a plain softmax cross-attention model written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import guidekit
from guidekit import CFG, Cond, Tokens, Uncond
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.padding import share

B, C = 2, 6


class CrossAttention(torch.nn.Module):
    """``x [B, 4, C]`` attends to ``text [B, L, C]`` (no positions: repetition is exact);
    ``text_mask [B, L]`` (1 = attend) masks keys out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(C, C) for _ in range(3))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        bias = None
        if text_mask is not None:
            bias = ((1 - text_mask.to(x.dtype)) * -10000.0)[:, None, :]
        h = F.scaled_dot_product_attention(self.q(x), self.k(text), self.v(text), bias)
        return x + h * sigma.view(-1, 1, 1)


def _text(length: int, seed: int) -> torch.Tensor:
    return torch.randn(B, length, C, generator=torch.Generator().manual_seed(seed))


X = torch.randn(B, 4, C, generator=torch.Generator().manual_seed(9))
NET = CrossAttention().eval()


def _alone(text: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return NET(X, torch.full((B,), 0.5), text)


def _run(expr: guidekit.Expr, conds: dict[str, torch.Tensor], **kw: object) -> guidekit.Guided:
    plan = guidekit.compile(expr, prediction="eps")
    named = {n: {"text": t} for n, t in conds.items()}
    g = guidekit.guide(plan, NET, cond=named.pop("cond"), uncond=named.pop("uncond", None),
                       conds=named, **kw)
    with torch.no_grad():
        g.out = g(X, 0.5)  # type: ignore[attr-defined]
    return g


def test_a_shorter_negative_is_padded_under_the_mask_in_one_call() -> None:
    c, neg = _text(8, 1), _text(5, 2)
    g = _run(CFG(7, negative="neg"), {"cond": c, "neg": neg},
             tokens=Tokens("text", mask="text_mask"))
    ref = _alone(neg) + 7 * (_alone(c) - _alone(neg))
    torch.testing.assert_close(g.out, ref, rtol=0, atol=1e-5)
    [call] = g.calls
    assert (call.rows, call.branches) == (2 * B, ("c", "neg"))
    assert call.tokens == "padded 'text' to 8 tokens under 'text_mask' (cond 8, neg 5)"
    assert "tokens main [c neg]: padded 'text' to 8 tokens" in str(g.plan)


def test_exact_repetition_to_a_common_multiple_is_one_call() -> None:
    c, u, neg = _text(8, 1), _text(4, 3), _text(2, 2)
    expr = CFG(5) - 2 * (Cond("neg") - Uncond())
    g = _run(expr, {"cond": c, "uncond": u, "neg": neg}, tokens=Tokens("text", repeat=True))
    a, b, n = _alone(c), _alone(u), _alone(neg)
    torch.testing.assert_close(g.out, b + 5 * (a - b) - 2 * (n - b), rtol=0, atol=1e-5)
    [call] = g.calls
    assert call.rows == 3 * B and call.tokens.startswith("repeated 'text' to 8 tokens")


def test_repetition_past_max_repeat_runs_separate_calls() -> None:
    c, neg = _text(8, 1), _text(5, 2)  # lcm 40 > 4 x 5
    g = _run(CFG(7, negative="neg"), {"cond": c, "neg": neg}, tokens=Tokens("text", repeat=True))
    torch.testing.assert_close(g.out, _alone(neg) + 7 * (_alone(c) - _alone(neg)),
                               rtol=0, atol=1e-5)
    assert [(r.rows, r.branches) for r in g.calls] == [(B, ("c",)), (B, ("neg",))]
    assert all(r.tokens.startswith("separate call") for r in g.calls)


def test_undeclared_lengths_run_as_separate_calls_and_say_how_to_share() -> None:
    c, u, neg = _text(8, 1), _text(5, 3), _text(8, 2)
    g = _run(CFG(3) + 2 * (Cond() - Cond("neg")), {"cond": c, "uncond": u, "neg": neg})
    a, b, n = _alone(c), _alone(u), _alone(neg)
    torch.testing.assert_close(g.out, b + 3 * (a - b) + 2 * (a - n), rtol=0, atol=1e-5)
    # c and neg (8 tokens) share a call; u (5 tokens) runs alone, after them in layout order
    assert [(r.rows, r.branches) for r in g.calls] == [(2 * B, ("c", "neg")), (B, ("u",))]
    how = g.calls[0].tokens
    assert how.startswith("separate call 1 of 2 ('text' cond [2, 8, 6], uncond [2, 5, 6]")
    assert "declare tokens=Tokens(key, mask=...)" in how
    assert "tokens main [u]: separate call 2 of 2" in str(g.plan)


def test_a_mask_carried_by_some_conditionings_is_filled_for_the_others() -> None:
    c = {"text": _text(8, 1), "text_mask": torch.ones(B, 8)}
    c["text_mask"][:, 6:] = 0  # cond's own padding
    neg = {"text": _text(5, 2)}
    plan = guidekit.compile(CFG(7, negative="neg"), prediction="eps")
    g = guidekit.guide(plan, NET, cond=c, conds={"neg": neg},
                       tokens=[Tokens("text", mask="text_mask")])
    with torch.no_grad():
        out = g(X, 0.5)
        a = NET(X, torch.full((B,), 0.5), c["text"][:, :6])
    torch.testing.assert_close(out, _alone(neg["text"]) + 7 * (a - _alone(neg["text"])),
                               rtol=0, atol=1e-5)
    assert len(g.calls) == 1


def test_share_leaves_the_given_conditionings_unchanged() -> None:
    conds = {"cond": {"text": _text(8, 1)}, "neg": {"text": _text(5, 2)}}
    [part] = share(["cond", "neg"], conds, (Tokens("text", mask="m"),))
    assert part.indices == (0, 1)
    assert part.conds["neg"]["text"].shape == (B, 8, C) and conds["neg"]["text"].shape[1] == 5
    assert part.conds["neg"]["m"].tolist() == [[1] * 5 + [0] * 3] * B
    assert "m" not in conds["neg"] and "m" not in conds["cond"]


def test_a_feature_width_difference_is_still_refused() -> None:
    plan = guidekit.compile(CFG(7), prediction="eps")
    g = guidekit.guide(plan, lambda x, s, y: x, cond={"y": torch.ones(B, 4)},
                       uncond={"y": torch.ones(B, 5)})
    with pytest.raises(GuidanceValueError, match="differ at key 'y'"):
        g(torch.ones(B, 3), 1.0)


def test_a_mask_of_the_wrong_shape_is_refused_by_name() -> None:
    conds = {"cond": {"text": _text(8, 1), "m": torch.ones(B, 7)}, "neg": {"text": _text(5, 2)}}
    with pytest.raises(GuidanceValueError, match=r"mask 'm' is \[2, 7\].*\[2, 8\]"):
        share(["cond", "neg"], conds, (Tokens("text", mask="m"),))


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: Tokens("text"), GuidanceValueError, "neither mask= nor repeat=True"),
        (lambda: Tokens("text", mask="text"), GuidanceValueError, "its own keyword"),
        (lambda: Tokens("text", repeat=True, max_repeat=0), GuidanceValueError, "max_repeat"),
        (lambda: Tokens("text", mask="m", axis=0), GuidanceValueError, "axis"),
        (lambda: Tokens(3, mask="m"), GuidanceTypeError, "keyword name"),  # type: ignore[arg-type]
        (lambda: guidekit.guide(guidekit.compile(CFG(2)), NET, cond={}, uncond={},
                                tokens="text"),  # type: ignore[arg-type]
         GuidanceTypeError, r"guide\(tokens= takes guidekit.Tokens"),
    ],
)
def test_bad_declarations_are_refused(make: object, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        make()  # type: ignore[operator]


def test_a_made_mask_takes_the_given_masks_dtype() -> None:
    conds = {"cond": {"text": _text(8, 1), "m": torch.ones(B, 8, dtype=torch.bool)},
             "neg": {"text": _text(5, 2)}}
    [part] = share(["cond", "neg"], conds, (Tokens("text", mask="m"),))
    assert part.conds["neg"]["m"].dtype == torch.bool
    assert part.conds["neg"]["m"].tolist() == [[True] * 5 + [False] * 3] * B


def test_print_plan_forgets_a_mix_the_last_step_did_not_have() -> None:
    g = _run(CFG(7, negative="neg"), {"cond": _text(8, 1), "neg": _text(5, 2)},
             tokens=Tokens("text", mask="text_mask"))
    assert "tokens main [c neg]" in str(g.plan)
    g.conds["neg"] = {"text": _text(8, 2)}
    with torch.no_grad():
        g(X, 0.25)
    assert "tokens main" not in str(g.plan) and g.calls[-1].tokens == ""
