"""The math of PLADIS, GAG and NAG (guidekit.attention.extrapolation) against definitions
written here: sparse maps by bisection and by their variational definitions, the three
methods by explicit per-head formulas; plus the terms' values, text and validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import guidekit
from guidekit import CFG, GAG, NAG, PAG, PLADIS, Cond, GuidanceTypeError, GuidanceValueError, parse
from guidekit.attention.extrapolation import (
    entmax15,
    gag_attention,
    nag_combine,
    pladis_attention,
    sparsemax,
)
from guidekit.registry import PROCESSORS, kind

D64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- independent definitions ------------------------------------------------------------------------


def bisect_entmax(z: torch.Tensor, alpha: float, iters: int = 200) -> torch.Tensor:
    """alpha-entmax over the last axis by bisection on the threshold (float64):
    ``p = [(alpha - 1) z - tau]_+^(1 / (alpha - 1))`` with ``sum p = 1``; the threshold lies
    in ``[max - 1, max]`` of ``(alpha - 1) z``."""
    x = (alpha - 1) * z.to(D64)
    hi = x.amax(-1, keepdim=True)
    lo = hi - 1
    for _ in range(iters):
        mid = (lo + hi) / 2
        total = (x - mid).clamp_min(0).pow(1 / (alpha - 1)).sum(-1, keepdim=True)
        lo = torch.where(total > 1, mid, lo)
        hi = torch.where(total > 1, hi, mid)
    return (x - (lo + hi) / 2).clamp_min(0).pow(1 / (alpha - 1))


def tsallis_objective(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``<p, z> + H_1.5(p)``, ``H_1.5(p) = sum(p - p^1.5) / 0.75``: 1.5-entmax maximises it
    over the simplex (Peters et al. 2019, eq. 7)."""
    return (p * z).sum(-1) + (p - p.clamp_min(0).pow(1.5)).sum(-1) / 0.75


def random_simplex(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    e = -torch.log(torch.rand(size, n, generator=g, dtype=D64))
    mask = torch.rand(size, n, generator=g, dtype=D64) < 0.5  # sparse points too
    e = torch.where(mask, torch.zeros_like(e), e) + 1e-12
    return e / e.sum(-1, keepdim=True)


# -- sparse maps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spread", [0.05, 1.0, 6.0, 60.0])
def test_sparse_maps_equal_bisection(spread: float) -> None:
    z = torch.randn(64, 23, generator=gen(1), dtype=D64) * spread
    for ours, alpha in ((entmax15, 1.5), (sparsemax, 2.0)):
        p = ours(z)
        assert torch.allclose(p, bisect_entmax(z, alpha), atol=1e-12, rtol=0)
        assert torch.allclose(p.sum(-1), torch.ones(64, dtype=D64), atol=1e-12)
        assert (p >= 0).all()


def test_known_values() -> None:
    two = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0]], dtype=D64)
    # 1.5-entmax of (1, 0): x = (0.5, 0); (0.5 - t)^2 + t^2 = 1 -> t = (0.5 - sqrt(1.75)) / 2
    t = (0.5 - math.sqrt(1.75)) / 2
    want = torch.tensor([[0.5, 0.5], [1.0, 0.0], [(0.5 - t) ** 2, t**2]], dtype=D64)
    assert torch.allclose(entmax15(two), want, atol=1e-14)
    # sparsemax of (1, 0.5, 0): support {1, 0.5}, tau = 0.25
    got = sparsemax(torch.tensor([1.0, 0.5, 0.0], dtype=D64))
    assert torch.allclose(got, torch.tensor([0.75, 0.25, 0.0], dtype=D64), atol=1e-15)
    assert torch.equal(sparsemax(torch.tensor([5.0, 1.0, -2.0])), torch.tensor([1.0, 0.0, 0.0]))


def test_kkt_and_variational_definitions() -> None:
    g = gen(2)
    z = torch.randn(40, 9, generator=g, dtype=D64) * 2
    # sparsemax: p = [z - tau]_+ (constant z - p on the support, z <= tau off it) and it is
    # the closest point of the simplex to z
    p = sparsemax(z)
    on = p > 0
    tau = ((z - p) * on).sum(-1, keepdim=True) / on.sum(-1, keepdim=True)
    assert torch.allclose(torch.where(on, z - p, tau), tau.expand_as(z), atol=1e-12)
    assert (torch.where(on, tau.expand_as(z) - 1, z) <= tau + 1e-12).all()
    others = random_simplex(9, 2000, g)
    best = (p - z).square().sum(-1)
    for i in range(z.shape[0]):
        assert ((others - z[i]).square().sum(-1) >= best[i] - 1e-12).all()
    # 1.5-entmax: sqrt(p) = z/2 - tau on the support (constant), z/2 <= tau off it, and it
    # maximises the Tsallis-regularised score over the simplex
    p = entmax15(z)
    on = p > 0
    tau = ((z / 2 - p.sqrt()) * on).sum(-1, keepdim=True) / on.sum(-1, keepdim=True)
    assert torch.allclose(torch.where(on, z / 2 - p.sqrt(), tau), tau.expand_as(z), atol=1e-12)
    assert (torch.where(on, tau.expand_as(z) - 1, z / 2) <= tau + 1e-12).all()
    best = tsallis_objective(p, z)
    for i in range(z.shape[0]):
        assert (tsallis_objective(others, z[i]) <= best[i] + 1e-12).all()


def test_sparse_maps_shift_permutation_mask_dim_and_half() -> None:
    z = torch.randn(5, 7, generator=gen(3), dtype=D64) * 3
    perm = torch.randperm(7, generator=gen(4))
    for f in (entmax15, sparsemax):
        assert torch.allclose(f(z + 11.5), f(z), atol=1e-12)
        assert torch.allclose(f(z[:, perm]), f(z)[:, perm], atol=1e-14)
        assert torch.allclose(f(z.T, dim=0), f(z).T, atol=1e-14)
        masked = z.clone()
        masked[:, 2] = float("-inf")
        want = bisect_entmax(torch.cat([z[:, :2], z[:, 3:]], 1), 1.5 if f is entmax15 else 2.0)
        got = f(masked)
        assert torch.equal(got[:, 2], torch.zeros(5, dtype=D64))
        assert torch.allclose(torch.cat([got[:, :2], got[:, 3:]], 1), want, atol=1e-12)
        half = f(z.half())
        assert half.dtype == torch.float16
        assert torch.allclose(half.double().sum(-1), torch.ones(5, dtype=D64), atol=3e-3)
    with pytest.raises(GuidanceValueError, match="finite logit"):
        entmax15(torch.full((2, 3), float("-inf")))


# -- the three methods -------------------------------------------------------------------------------


def qkv(seed: int, rows: int = 2, heads: int = 2, q: int = 6, k: int = 5, d: int = 4):
    g = gen(seed)
    return (
        torch.randn(rows, heads, q, d, generator=g, dtype=D64) * 2,
        torch.randn(rows, heads, k, d, generator=g, dtype=D64) * 2,
        torch.randn(rows, heads, k, d, generator=g, dtype=D64),
    )


def maps(query: torch.Tensor, key: torch.Tensor, alpha: float, bias: torch.Tensor | None = None):
    logits = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1), bisect_entmax(logits, alpha)


@pytest.mark.parametrize(("sparse", "alpha"), [("entmax15", 1.5), ("sparsemax", 2.0)])
def test_pladis_is_the_extrapolated_map(sparse: str, alpha: float) -> None:
    q, k, v = qkv(5)
    dense, sp = maps(q, k, alpha)
    for lam in (0.0, 1.0, 2.0, -0.5):
        got = pladis_attention(q, k, v, scale=lam, sparse=sparse)
        assert torch.allclose(got, (dense + lam * (sp - dense)) @ v, atol=1e-10)
    assert torch.allclose(pladis_attention(q, k, v, scale=0.0), F.scaled_dot_product_attention(q, k, v))
    # masks as scaled_dot_product_attention reads them: boolean keeps, float adds
    keep = torch.rand(2, 1, 6, 5, generator=gen(6)) > 0.3
    keep[..., 0] = True
    bias = torch.where(keep, 0.0, float("-inf")).to(D64)
    dense, sp = maps(q, k, alpha, bias)
    want = (dense + 2 * (sp - dense)) @ v
    assert torch.allclose(pladis_attention(q, k, v, scale=2.0, mask=keep, sparse=sparse), want, atol=1e-10)
    soft = torch.randn(2, 1, 6, 5, generator=gen(7), dtype=D64)
    dense, sp = maps(q, k, alpha, soft)
    want = (dense + 2 * (sp - dense)) @ v
    assert torch.allclose(pladis_attention(q, k, v, scale=2.0, mask=soft, sparse=sparse), want, atol=1e-10)


def gag_reference(q, k, v, lam: float, eta: float | None, zeta: float) -> torch.Tensor:
    """methods.md, token by token and head by head."""
    dense, sp = maps(q, k, 1.5)
    out = torch.empty_like(q[..., :1].expand(*q.shape[:-1], v.shape[-1])).clone()
    for r in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                s = sp[r, h, i] @ v[r, h]
                d = dense[r, h, i] @ v[r, h]
                delta = s - d
                par = (delta @ s) / (s @ s) * s
                gvec = par + zeta * (delta - par)
                norm = float(gvec.norm())
                clamp = 1.0 if eta is None else min(1.0, eta / norm)
                out[r, h, i] = s + lam * clamp * gvec
    return out


def test_gag_formula_clamp_and_pladis_limit() -> None:
    q, k, v = qkv(8)
    for lam, eta, zeta in ((5.0, 15.0, 0.0), (7.0, 0.05, 0.3), (2.0, None, 1.0)):
        got = gag_attention(q, k, v, scale=lam, eta=math.inf if eta is None else eta, zeta=zeta)
        assert torch.allclose(got, gag_reference(q, k, v, lam, eta, zeta), atol=1e-10)
    # the clamp: each token moves from S by lam * min(||g||, eta)
    dense, sp = maps(q, k, 1.5)
    free = (gag_attention(q, k, v, scale=3.0, eta=math.inf, zeta=0.5) - sp @ v).norm(dim=-1)
    moved = (gag_attention(q, k, v, scale=3.0, eta=1e-3, zeta=0.5) - sp @ v).norm(dim=-1)
    assert torch.allclose(moved, free.clamp_max(3e-3), atol=1e-12)
    assert (free > 3e-3).float().mean() > 0.5  # most tokens are clamped here
    # zeta = 1 without a clamp is PLADIS with scale + 1
    assert torch.allclose(
        gag_attention(q, k, v, scale=2.5, eta=math.inf, zeta=1.0),
        pladis_attention(q, k, v, scale=3.5), atol=1e-10,
    )


def test_nag_combine_formula() -> None:
    g = gen(9)
    zp = torch.randn(2, 3, 7, 4, generator=g, dtype=D64)
    zn = zp + 0.8 * torch.randn(2, 3, 7, 4, generator=g, dtype=D64)
    phi, tau, alpha = 4.0, 2.5, 0.25
    zt = phi * zp - (phi - 1) * zn
    norm = lambda t: t.abs().sum((1, 3), keepdim=True)  # noqa: E731 (per token, all heads)
    r = norm(zt) / norm(zp)
    want = alpha * zt * torch.minimum(r, torch.full_like(r, tau)) / r + (1 - alpha) * zp
    got = nag_combine(zp, zn, scale=phi, tau=tau, alpha=alpha, dims=(-3, -1))
    assert torch.allclose(got, want, atol=1e-12)
    assert (r > tau).any() and (r < tau).any()  # both sides of the clamp are exercised
    clamped = (r > tau).expand_as(zt)
    zh = (got - (1 - alpha) * zp) / alpha
    ratio = norm(zh) / norm(zp)
    assert torch.allclose(ratio[r > tau], torch.full_like(ratio[r > tau], tau))
    assert torch.allclose(zh[~clamped], zt[~clamped])
    assert torch.equal(nag_combine(zp, zn, scale=1.0, tau=tau, alpha=alpha, dims=(-3, -1)), zp)
    assert torch.allclose(nag_combine(zp, zn, scale=phi, tau=None, alpha=0.5), 0.5 * zt + 0.5 * zp)
    # merged heads [rows, tokens, heads * d]: the same per-token norm over the last axis
    merged = lambda t: t.transpose(1, 2).reshape(2, 7, 12)  # noqa: E731
    got2 = nag_combine(merged(zp), merged(zn), scale=phi, tau=tau, alpha=alpha)
    assert torch.allclose(got2, merged(got), atol=1e-12)
    zero = torch.zeros(1, 1, 2, 3, dtype=D64)  # Z+ = 0: the guidance part is dropped, no NaN
    out = nag_combine(zero, torch.ones_like(zero), scale=phi, tau=tau, alpha=alpha, dims=(-3, -1))
    assert torch.equal(out, zero)


# -- the terms ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        CFG(3) | PLADIS(2),
        CFG(3) | PLADIS(1.5, sparse="sparsemax", layers=(0, "transformer_blocks.1.attn2")),
        Cond() | NAG(4),
        CFG(5) | NAG(3, tau=None, alpha=0.5, negative="neg", key="text", layers=-1),
        CFG(2) + PAG(1) | GAG(5),
        CFG(2) | GAG(7, eta=None, zeta=0.5) | guidekit.APG(eta=0),
    ],
)
def test_text_round_trips(expr) -> None:
    assert parse(str(expr)) == expr
    assert str(parse(str(expr))) == str(expr)


def test_terms_are_modifiers_that_add_no_rows() -> None:
    for name in ("PLADIS", "GAG", "NAG"):
        assert kind(PROCESSORS[name]) == "attention"
    plan = guidekit.compile(CFG(3) + PAG(2) | PLADIS(2) | NAG(4) | guidekit.APG())
    plain = guidekit.compile(CFG(3) + PAG(2) | guidekit.APG())
    assert plan.branches == plain.branches and plan.rows(1.0, 4) == plain.rows(1.0, 4) == 12
    assert plan.attention == (PLADIS(2), NAG(4)) and plan.post == plain.post
    assert "PLADIS(2) | NAG(4)" in str(plan)
    # NAG reads the negative conditioning even where no branch runs it
    assert guidekit.compile(Cond() | NAG(4)).conditionings == ("cond", "uncond")
    assert guidekit.compile(Cond() | NAG(4, negative="neg")).conditionings == ("cond", "neg")
    assert guidekit.compile(Cond() | PLADIS(2)).conditionings == ("cond",)


def test_bad_values_name_the_term() -> None:
    with pytest.raises(GuidanceValueError, match=r"PLADIS\(sparse=...\)"):
        PLADIS(2, sparse="softmax")
    with pytest.raises(GuidanceValueError, match=r"GAG\(eta=...\)"):
        GAG(5, eta=0)
    with pytest.raises(GuidanceValueError, match=r"NAG\(alpha=...\)"):
        NAG(4, alpha=1.5)
    with pytest.raises(GuidanceValueError, match="must differ from the positive"):
        NAG(4, negative="cond")
    with pytest.raises(GuidanceTypeError, match="NAG"):
        NAG(4, key=3)
    with pytest.raises(GuidanceTypeError, match="post-processor"):
        CFG(3) + PLADIS(2)  # type: ignore[operator]
    with pytest.raises(GuidanceTypeError, match="class"):
        CFG(3) | PLADIS  # type: ignore[operator]
