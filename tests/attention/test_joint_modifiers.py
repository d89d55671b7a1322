"""PLADIS, GAG and NAG on joint text-image attention (SD3, Flux double- and single-stream
blocks): the image queries are modified, the text queries attend as usual.

The oracle is written here from the papers' equations (shared/reference/methods.md), not
from guidekit: a TorchFunctionMode replaces every ``scaled_dot_product_attention`` call the
unhooked model makes by an explicit softmax; on the image-query rows it applies PLADIS
(``A_dense + lam (A_sparse - A_dense)``, 1.5-entmax found by bisection), GAG, or NAG
(``Z+`` over the row's own joint keys, ``Z-`` over its image keys joined with the text keys
the negative prompt's pass had at the same layer, recorded from a separate unconditional
pass). Branches run as separate passes and CFG combines them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import guidekit
from guidekit import CFG, GAG, NAG, PAG, PLADIS, Cond
from guidekit.attention import install
from guidekit.errors import GuidanceValueError

from ._joint_models import TEXT_TOKENS, sd3_conds, tiny_flux, tiny_sd3
from ._tiny import BATCH

SD3_IMAGE = 16  # (8 / patch 2)^2 image tokens, first in SD3's joint sequence


def entmax15_bisect(z: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """1.5-entmax ``[z/2 - tau]_+^2`` with the threshold found by bisection on its sum."""
    x = z / 2
    lo = x.amax(-1, keepdim=True) - 1.0  # the sum is >= 1 here
    hi = x.amax(-1, keepdim=True)  # and 0 here
    for _ in range(iters):
        tau = (lo + hi) / 2
        total = (x - tau).clamp_min(0).square().sum(-1, keepdim=True)
        lo = torch.where(total >= 1, tau, lo)
        hi = torch.where(total >= 1, hi, tau)
    p = (x - (lo + hi) / 2).clamp_min(0).square()
    return p / p.sum(-1, keepdim=True)


def nag_ref(zp: torch.Tensor, zn: torch.Tensor, phi: float, tau: float, alpha: float) -> torch.Tensor:
    """NAG on ``[rows, heads, tokens, d]``: one token's channels are its heads' features."""
    zt = phi * zp - (phi - 1) * zn
    r = zt.abs().sum((1, 3), keepdim=True) / zp.abs().sum((1, 3), keepdim=True)
    zh = zt * torch.minimum(r, torch.full_like(r, tau)) / r
    return alpha * zh + (1 - alpha) * zp


class Reference(TorchFunctionMode):
    """Explicit joint attention; ``image(n_tokens)`` gives the image tokens' slice.

    ``mode``: None (plain), "record" (keep each call's keys and values), "pladis", "gag"
    or "nag" (on the image-query rows; "nag" reads the recorded negative pass).
    """

    def __init__(self, image: Callable[[int], slice], text: Callable[[int], slice]) -> None:
        super().__init__()
        self.image, self.text = image, text
        self.mode: str | None = None
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.calls = 0
        self.lam = self.phi = 0.0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        bound = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
        q, k, v = bound["query"], bound["key"], bound["value"]
        assert bound.get("attn_mask") is None and bound.get("scale") is None
        i, self.calls = self.calls, self.calls + 1
        if self.mode == "record":
            self.recorded.append((k, v))
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        dense = logits.softmax(-1)
        out = dense @ v
        img = self.image(q.shape[-2])
        if self.mode in ("pladis", "gag"):
            sparse = entmax15_bisect(logits[..., img, :])
            if self.mode == "pladis":
                out[..., img, :] = (dense[..., img, :] + self.lam * (sparse - dense[..., img, :])) @ v
            else:  # GAG with eta = inf, zeta = 0: S + lam delta_par
                s, d = sparse @ v, dense[..., img, :] @ v
                delta = s - d
                par = (delta * s).sum(-1, keepdim=True) / (s * s).sum(-1, keepdim=True) * s
                out[..., img, :] = s + self.lam * par
        elif self.mode == "nag":
            nk, nv = (t.clone() for t in (k, v))
            txt = self.text(q.shape[-2])
            rk, rv = self.recorded[i]
            nk[..., txt, :], nv[..., txt, :] = rk[..., txt, :], rv[..., txt, :]
            zn = (q[..., img, :] @ nk.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ nv
            out[..., img, :] = nag_ref(out[..., img, :], zn, self.phi, 2.5, 0.25)
        return out


def sd3_case(dtype: torch.dtype) -> tuple[Any, Any, Reference, Any, Any, torch.Tensor]:
    model = tiny_sd3(layers=2).to(dtype)

    def fn(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> Any:
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=sigma * 100).sample

    cond, uncond = sd3_conds()
    cond, uncond = ({k: v.to(dtype) for k, v in c.items()} for c in (cond, uncond))
    ref = Reference(lambda n: slice(0, SD3_IMAGE), lambda n: slice(SD3_IMAGE, None))
    x = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=dtype)
    return model, fn, ref, cond, uncond, x


def flux_case(dtype: torch.dtype) -> tuple[Any, Any, Reference, Any, Any, torch.Tensor]:
    model = tiny_flux(double=2, single=2).to(dtype)
    ids = torch.zeros(16, 3, dtype=dtype)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4

    def fn(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> Any:
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=sigma, img_ids=ids,
                     txt_ids=torch.zeros(TEXT_TOKENS, 3, dtype=dtype)).sample

    cond, uncond = sd3_conds()
    cond, uncond = ({k: v.to(dtype) for k, v in c.items()} for c in (cond, uncond))
    ref = Reference(lambda n: slice(TEXT_TOKENS, None), lambda n: slice(0, TEXT_TOKENS))
    x = torch.randn(BATCH, 16, 16, generator=torch.Generator().manual_seed(3), dtype=dtype)
    return model, fn, ref, cond, uncond, x


CASES = {"sd3": sd3_case, "flux": flux_case}


def separate(fn: Any, ref: Reference, cond: Any, uncond: Any, x: torch.Tensor, sigma: float,
             w: float, mode: str, value: float) -> torch.Tensor:
    """The oracle: u and c in separate passes (the modifier as ``mode``), ``u + w (c - u)``."""
    sig = torch.full((BATCH,), sigma, dtype=x.dtype)
    with ref:
        ref.calls, ref.recorded = 0, []
        ref.mode = "record" if mode == "nag" else mode
        ref.lam = ref.phi = value
        u = fn(x, sig, **uncond)
        ref.calls, ref.mode = 0, mode
        c = fn(x, sig, **cond)
        ref.mode = None
    return u + w * (c - u)


def guided(model: Any, fn: Any, expr: Any, cond: Any, uncond: Any, x: torch.Tensor,
           sigma: float, **compile_kw: Any) -> tuple[torch.Tensor, Any]:
    plan = guidekit.compile(expr, prediction="flow", noise="flow", **compile_kw)
    with install(model, plan) as around:
        g = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
        return g(x, sigma), g


@pytest.mark.parametrize("arch", ["sd3", "flux"])
@pytest.mark.parametrize(("name", "expr", "mode", "value"), [
    ("NAG", CFG(3) | NAG(4), "nag", 4.0),
    ("PLADIS", CFG(3) | PLADIS(1.5), "pladis", 1.5),
    ("GAG", CFG(3) | GAG(2, eta=None), "gag", 2.0),
], ids=["NAG", "PLADIS", "GAG"])
def test_joint_modifiers_equal_the_papers_equations(arch: str, name: str, expr: Any, mode: str,
                                                    value: float) -> None:
    """float64: one batched call of u and c rows equals the oracle's separate passes."""
    model, fn, ref, cond, uncond, x = CASES[arch](torch.float64)
    with torch.no_grad():
        want = separate(fn, ref, cond, uncond, x, 0.6, 3.0, mode, value)
        plain = separate(fn, ref, cond, uncond, x, 0.6, 3.0, "none", 0.0)
        out, g = guided(model, fn, expr, cond, uncond, x, 0.6)
    assert [c.rows for c in g.calls] == [2 * BATCH]
    assert (want - plain).abs().max() > 1e-3, "the modifier must change the output"
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_joint_nag_float32_equals_separate_passes(arch: str) -> None:
    model, fn, ref, cond, uncond, x = CASES[arch](torch.float32)
    with torch.no_grad():
        want = separate(fn, ref, cond, uncond, x, 0.6, 3.0, "nag", 4.0)
        out, _ = guided(model, fn, CFG(3) | NAG(4), cond, uncond, x, 0.6)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_joint_pladis_batched_rows_equal_one_call_per_branch(arch: str) -> None:
    model, fn, _, cond, uncond, x = CASES[arch](torch.float32)
    with torch.no_grad():
        one, g1 = guided(model, fn, CFG(3) | PLADIS(1.5), cond, uncond, x, 0.6)
        split, g2 = guided(model, fn, CFG(3) | PLADIS(1.5), cond, uncond, x, 0.6,
                           max_rows=BATCH)
    assert [c.rows for c in g1.calls] == [2 * BATCH]
    assert [c.rows for c in g2.calls] == [BATCH, BATCH]
    torch.testing.assert_close(one, split, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_joint_nag_with_a_perturbation_and_text_untouched(arch: str) -> None:
    """NAG leaves the unconditional rows alone and composes with PAG in other layers."""
    model, fn, ref, cond, uncond, x = CASES[arch](torch.float64)
    layers = ("transformer_blocks.0.attn",)
    with torch.no_grad():
        out, g = guided(model, fn, CFG(3) + PAG(1, layers=-1) | NAG(4, layers=layers),
                        cond, uncond, x, 0.6)
    assert [c.rows for c in g.calls] == [3 * BATCH]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_joint_nag_without_negative_rows_says_what_to_change(arch: str) -> None:
    """Issue 11: the hint names the change to make, never the expression the user wrote."""
    model, fn, _, cond, uncond, x = CASES[arch](torch.float64)
    with torch.no_grad():
        with pytest.raises(GuidanceValueError, match=r"no branch of .* runs 'uncond'") as err:
            guided(model, fn, Cond() | NAG(4), cond, uncond, x, 0.6)
        assert "Cond() | NAG(4)" not in str(err.value).split("runs 'uncond'")[1]
        with pytest.raises(GuidanceValueError, match=r"max_rows=2 put the 'uncond' rows") as err:
            guided(model, fn, CFG(3) | NAG(4), cond, uncond, x, 0.6, max_rows=BATCH)
        assert "CFG(w) | NAG(4)" not in str(err.value)
