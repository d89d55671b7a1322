"""PLADIS, GAG and NAG inside the batched forward of tiny real models, against references
written here: an explicit-map cross-attention processor (sparse maps by bisection) run one
branch at a time, the guidance combined by hand; few-step runs; composition with CFG and
PAG in one call; restoration; and the refusals."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import guidekit
from guidekit import CFG, GAG, NAG, PAG, PLADIS, Cond, GuidanceValueError
from guidekit.attention import install

from ._tiny import (
    BATCH,
    ENDINGS,
    Boom,
    SelfAttention,
    pixart_fn,
    processors,
    tiny_dit,
    tiny_pixart,
    tiny_plain,
    tiny_unet,
    unet_fn,
    value_only,
)
from .test_extrapolation import bisect_entmax

D64 = torch.float64


def inputs(dtype: torch.dtype = D64, seed: int = 0, tokens: int = 5, width: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4, 8, 8, generator=g).to(dtype)
    cond = {"text": torch.randn(BATCH, tokens, width, generator=g).to(dtype)}
    uncond = {"text": 0.5 * torch.randn(BATCH, tokens, width, generator=g).to(dtype)}
    return x, cond, uncond


def model_and_fn(kind: str, dtype: torch.dtype = D64) -> tuple[torch.nn.Module, Any]:
    model = (tiny_pixart() if kind == "pixart" else tiny_unet()).to(dtype)
    return model, (pixart_fn(model) if kind == "pixart" else unet_fn(model))


def context_of(model: torch.nn.Module, text: torch.Tensor) -> torch.Tensor:
    """The cross-attention context the model makes of a text tensor (PixArt projects it)."""
    proj = getattr(model, "caption_projection", None)
    return text if proj is None else proj(text)


# -- the reference: explicit maps, one branch at a time ----------------------------------------------


class RefCross:
    """A diffusers cross-attention with explicit maps, written for these tests.

    ``mode``: None (softmax), "pladis" or "gag" (with ``lam``, ``eta``, ``zeta``,
    ``alpha`` of the sparse map); ``nag`` (phi, tau, alpha) extrapolates away from the
    output for ``negative`` (the layer context of the negative prompt, ``[B, L, C]``).
    """

    def __init__(self, mode: str | None = None, lam: float = 0.0, eta: float | None = None,
                 zeta: float = 0.0, alpha: float = 1.5, nag: tuple | None = None,
                 negative: torch.Tensor | None = None) -> None:
        self.mode, self.lam, self.eta, self.zeta, self.alpha = mode, lam, eta, zeta, alpha
        self.nag, self.negative = nag, negative

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: Any = None) -> torch.Tensor:
        assert attention_mask is None and encoder_hidden_states is not None
        assert attn.group_norm is None and attn.spatial_norm is None and not attn.norm_cross
        assert not attn.residual_connection and attn.rescale_output_factor == 1
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            b, n, c = t.shape
            return t.view(b, n, heads, c // heads).transpose(1, 2)

        q = split(attn.to_q(hidden_states))

        def attention(ctx: torch.Tensor) -> torch.Tensor:
            k, v = split(attn.to_k(ctx)), split(attn.to_v(ctx))
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            dense = logits.softmax(-1)
            if self.mode is None:
                return dense @ v
            sparse = bisect_entmax(logits, self.alpha).to(q.dtype)
            if self.mode == "pladis":
                return ((1 - self.lam) * dense + self.lam * sparse) @ v
            s, d = sparse @ v, dense @ v
            delta = s - d
            par = (delta * s).sum(-1, keepdim=True) / (s * s).sum(-1, keepdim=True) * s
            g = par + self.zeta * (delta - par)
            norm = g.norm(dim=-1, keepdim=True)
            clamp = 1.0 if self.eta is None else torch.clamp(self.eta / norm, max=1.0)
            return s + self.lam * clamp * g

        z = attention(encoder_hidden_states)
        if self.nag is not None:
            phi, tau, a = self.nag
            zn = attention(self.negative)
            zt = phi * z - (phi - 1) * zn
            r = zt.abs().sum((1, 3), keepdim=True) / z.abs().sum((1, 3), keepdim=True)
            zh = zt * torch.clamp(r, max=tau) / r
            z = a * zh + (1 - a) * z
        b, _, n, _ = z.shape
        out = z.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def cross_layers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n.endswith("attn2") and m is not None]


@contextmanager
def processors_on(model: torch.nn.Module, procs: dict[str, Any]) -> Iterator[None]:
    saved = {p: model.get_submodule(p).processor for p in procs}
    try:
        for p, proc in procs.items():
            model.get_submodule(p).set_processor(proc)
        yield
    finally:
        for p, proc in saved.items():
            model.get_submodule(p).set_processor(proc)


def branch(model, fn, x, sigma, text, procs: dict[str, Any] | None = None,
           perturbed: tuple[str, ...] = ()) -> torch.Tensor:
    """One branch alone: reference processors in the named cross-attention layers and
    PAG's identity map (the tests' own value_only) in ``perturbed``."""
    s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype)
    with processors_on(model, procs or {}), value_only(model, perturbed):
        return fn(x, s, text)  # type: ignore[no-any-return]


def guided(model, fn, expr, x, sigma, cond, uncond, **kw: Any):
    plan = guidekit.compile(expr, **kw)
    with install(model, plan) as around_call:
        g = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around_call)
        y = g(x, sigma)
    return y, g.calls


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), f"max abs error {err:.3g}"


# -- oracles --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tol"), [(D64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize(("sparse", "alpha"), [("entmax15", 1.5), ("sparsemax", 2.0)])
def test_pladis_equals_explicit_maps_on_pixart(sparse: str, alpha: float, dtype, tol) -> None:
    model, fn = model_and_fn("pixart", dtype)
    x, cond, uncond = inputs(dtype)
    with torch.no_grad():
        y, calls = guided(model, fn, CFG(3) | PLADIS(2, sparse=sparse), x, 1.5, cond, uncond)
        ref = {p: RefCross("pladis", lam=2.0, alpha=alpha) for p in cross_layers(model)}
        c = branch(model, fn, x, 1.5, cond["text"], ref)
        u = branch(model, fn, x, 1.5, uncond["text"], ref)
        plain = u + 3 * (branch(model, fn, x, 1.5, cond["text"]) - u)
    close(y, u + 3 * (c - u), tol)
    assert float((y - plain).abs().max()) > 1e-3  # PLADIS really changed the forward
    assert [(r.rows, r.branches) for r in calls] == [(2 * BATCH, ("c", "u"))]


@pytest.mark.parametrize("kind", ["pixart", "unet"])
def test_gag_equals_explicit_formula(kind: str) -> None:
    model, fn = model_and_fn(kind)
    x, cond, uncond = inputs()
    # ||g|| of these tiny models is 0.001-0.2 (median about 0.02): eta = 0.02 clamps about
    # half of the tokens, which the comparison with the unclamped run shows
    expr = CFG(2) | GAG(5, eta=0.02, zeta=0.3)
    with torch.no_grad():
        y, _ = guided(model, fn, expr, x, 0.8, cond, uncond)
        free, _ = guided(model, fn, CFG(2) | GAG(5, eta=None, zeta=0.3), x, 0.8, cond, uncond)
        ref = {p: RefCross("gag", lam=5.0, eta=0.02, zeta=0.3) for p in cross_layers(model)}
        c = branch(model, fn, x, 0.8, cond["text"], ref)
        u = branch(model, fn, x, 0.8, uncond["text"], ref)
    close(y, u + 2 * (c - u), 1e-9)
    assert float((y - free).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["pixart", "unet"])
def test_nag_with_and_without_uncond_rows(kind: str) -> None:
    """CFG(3) | NAG(4): the negative context is the u rows' own; Cond() | NAG(4): it is made
    from the uncond conditioning (PixArt's caption projection, the UNet's raw text). Both
    equal a reference that is handed the negative layer context explicitly."""
    model, fn = model_and_fn(kind)
    x, cond, uncond = inputs()
    with torch.no_grad():
        neg = context_of(model, uncond["text"])
        ref = {p: RefCross(nag=(4.0, 2.5, 0.25), negative=neg) for p in cross_layers(model)}
        c_nag = branch(model, fn, x, 1.0, cond["text"], ref)
        u = branch(model, fn, x, 1.0, uncond["text"])
        c = branch(model, fn, x, 1.0, cond["text"])
        y_cfg, calls_cfg = guided(model, fn, CFG(3) | NAG(4), x, 1.0, cond, uncond)
        y_one, calls_one = guided(model, fn, Cond() | NAG(4), x, 1.0, cond, uncond)
        # a row budget of B rows puts c and u in separate calls: c falls back to the projection
        y_split, calls_split = guided(
            model, fn, CFG(3) | NAG(4), x, 1.0, cond, uncond, max_rows=BATCH
        )
    close(y_cfg, u + 3 * (c_nag - u), 1e-9)
    close(y_one, c_nag, 1e-9)
    close(y_split, y_cfg, 1e-9)
    assert float((c_nag - c).abs().max()) > 1e-3
    assert [r.rows for r in calls_cfg] == [2 * BATCH] and [r.rows for r in calls_one] == [BATCH]
    assert [r.branches for r in calls_split] == [("c",), ("u",)]


def test_nag_uses_the_rows_of_the_call_before_any_projection(monkeypatch) -> None:
    """With the architecture's context projection unknown, CFG(3) | NAG(4) still works (the
    negative context is read from the u rows of the call) and Cond() | NAG(4) says what to
    do instead of guessing."""
    import guidekit.attention.modifiers as modifiers

    monkeypatch.setattr(modifiers, "context_projection", lambda model: None)
    model, fn = model_and_fn("pixart")
    x, cond, uncond = inputs(seed=2)
    with torch.no_grad():
        neg = context_of(model, uncond["text"])
        ref = {p: RefCross(nag=(4.0, 2.5, 0.25), negative=neg) for p in cross_layers(model)}
        c_nag = branch(model, fn, x, 1.0, cond["text"], ref)
        u = branch(model, fn, x, 1.0, uncond["text"])
        y, _ = guided(model, fn, CFG(3) | NAG(4), x, 1.0, cond, uncond)
        close(y, u + 3 * (c_nag - u), 1e-9)
        with pytest.raises(GuidanceValueError, match="does not know how"):
            guided(model, fn, Cond() | NAG(4), x, 1.0, cond, uncond)


def test_pladis_and_nag_share_a_layer_with_pag_in_one_call() -> None:
    """CFG(3) + PAG(2) | PLADIS(2) | NAG(4): one call of 3B rows; PLADIS on every row of
    the cross-attention, NAG on c and PAG's perturbed c (both 'cond'), identity self-attention
    in PAG's layer for its rows only."""
    model, fn = model_and_fn("pixart")
    x, cond, uncond = inputs(seed=3)
    pag_layer = ("transformer_blocks.1.attn1",)
    with torch.no_grad():
        y, calls = guided(model, fn, CFG(3) + PAG(2) | PLADIS(2) | NAG(4), x, 2.0, cond, uncond)
        neg = context_of(model, uncond["text"])
        both = {p: RefCross("pladis", lam=2.0, nag=(4.0, 2.5, 0.25), negative=neg)
                for p in cross_layers(model)}
        only = {p: RefCross("pladis", lam=2.0) for p in cross_layers(model)}
        c = branch(model, fn, x, 2.0, cond["text"], both)
        u = branch(model, fn, x, 2.0, uncond["text"], only)
        p = branch(model, fn, x, 2.0, cond["text"], both, perturbed=pag_layer)
    close(y, u + 3 * (c - u) + 2 * (c - p), 1e-9)
    assert [(r.rows, r.branches) for r in calls] == [
        (3 * BATCH, ("c", "u", "c[IdentityAttention()]"))
    ]


def test_cfg_plus_pag_pipe_gag_in_one_call_on_unet() -> None:
    model, fn = model_and_fn("unet")
    x, cond, uncond = inputs(seed=4)
    pag_layer = tuple(n for n in dict(model.named_modules()) if n.startswith("mid_block")
                      and n.endswith("attn1"))
    with torch.no_grad():
        y, calls = guided(model, fn, CFG(2) + PAG(1) | GAG(5), x, 3.0, cond, uncond)
        ref = {p: RefCross("gag", lam=5.0, eta=15.0) for p in cross_layers(model)}
        c = branch(model, fn, x, 3.0, cond["text"], ref)
        u = branch(model, fn, x, 3.0, uncond["text"], ref)
        p = branch(model, fn, x, 3.0, cond["text"], ref, perturbed=pag_layer)
    close(y, u + 2 * (c - u) + (c - p), 1e-9)
    assert len(calls) == 1 and calls[0].rows == 3 * BATCH


def test_layer_subset_changes_only_those_layers() -> None:
    model, fn = model_and_fn("pixart")
    x, cond, _ = inputs(seed=5)
    with torch.no_grad():
        y, _ = guided(model, fn, Cond() | PLADIS(2, layers=0), x, 1.0, cond, None)
        ref = {"transformer_blocks.0.attn2": RefCross("pladis", lam=2.0)}
        c = branch(model, fn, x, 1.0, cond["text"], ref)
    close(y, c, 1e-9)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("which", ["nag", "pladis", "gag"])
def test_few_step_flow_sampling(steps: int, which: str) -> None:
    """A 1-4 step Euler run of a flow model with no CFG (the distilled-model setting): the
    guided sampler equals a hand loop over the reference forward; B rows per step."""
    model, fn = model_and_fn("pixart")
    x, cond, uncond = inputs(seed=6)
    neg = context_of(model, uncond["text"]).detach()
    expr, ref = {
        "nag": (Cond() | NAG(5), RefCross(nag=(5.0, 2.5, 0.25), negative=neg)),
        "pladis": (Cond() | PLADIS(2), RefCross("pladis", lam=2.0)),
        "gag": (Cond() | GAG(7, eta=1.0), RefCross("gag", lam=7.0, eta=1.0)),
    }[which]
    sigmas = torch.linspace(1, 0, steps + 1, dtype=D64)
    plan = guidekit.compile(expr, prediction="flow", noise="flow")
    with torch.no_grad():
        with install(model, plan) as around_call:
            g = guidekit.guide(plan, fn, cond=cond, uncond=uncond, sigmas=sigmas,
                               around_call=around_call)
            xs = x.clone()
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                xs = xs + (s_next - s) * g(xs, s)
        xr = x.clone()
        procs = dict.fromkeys(cross_layers(model), ref)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            xr = xr + (s_next - s) * branch(model, fn, xr, float(s), cond["text"], procs)
    close(xs, xr, 1e-9)
    assert [(r.rows, r.branches) for r in g.calls] == [(BATCH, ("c",))] * steps


# -- plain modules (scaled_dot_product_attention) ----------------------------------------------------


class CrossAttention(torch.nn.Module):
    """Cross-attention through ``F.scaled_dot_product_attention`` ([B, H, L, D])."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = (torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 2 * dim),
                                     torch.nn.Linear(dim, dim))

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(ctx).chunk(2, dim=-1)
        o = F.scaled_dot_product_attention(self.split(self.q(h)), self.split(k), self.split(v))
        return self.out(o.transpose(1, 2).reshape(h.shape))


class TextModel(torch.nn.Module):
    """``model(x [B, 4, 8, 8], sigma [B], text [B, L, 16])``: one cross-attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.cross, self.mlp = (torch.nn.Linear(4, 16), CrossAttention(16, 2),
                                          torch.nn.Linear(16, 4))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(2).transpose(1, 2)) * sigma[:, None, None]
        h = h + self.cross(h, text)
        return self.mlp(h).transpose(1, 2).reshape(x.shape)


def nag_cross_reference(m: CrossAttention, h: torch.Tensor, ctx: torch.Tensor,
                        neg: torch.Tensor, phi: float, tau: float, a: float) -> torch.Tensor:
    def attend(c: torch.Tensor) -> torch.Tensor:
        k, v = m.kv(c).chunk(2, dim=-1)
        q, k, v = m.split(m.q(h)), m.split(k), m.split(v)
        return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v

    zp, zn = attend(ctx), attend(neg)
    zt = phi * zp - (phi - 1) * zn
    r = zt.abs().sum((1, 3), keepdim=True) / zp.abs().sum((1, 3), keepdim=True)
    z = a * zt * torch.clamp(r, max=tau) / r + (1 - a) * zp
    return m.out(z.transpose(1, 2).reshape(h.shape))


def test_nag_on_a_plain_module_reads_the_uncond_rows() -> None:
    torch.manual_seed(0)
    model = TextModel().double()
    x, _, _ = inputs()
    g = torch.Generator().manual_seed(9)
    cond = {"text": 3 * torch.randn(BATCH, 5, 16, generator=g, dtype=D64)}
    uncond = {"text": 3 * torch.randn(BATCH, 5, 16, generator=g, dtype=D64)}
    expr = CFG(2) | NAG(4, layers="cross")
    plan = guidekit.compile(expr)
    with torch.no_grad():
        with install(model, plan) as around_call:
            gd = guidekit.guide(plan, model, cond=cond, uncond=uncond, around_call=around_call)
            y = gd(x, 0.7)
        s = torch.full((BATCH,), 0.7, dtype=D64)
        u = model(x, s, uncond["text"])
        model.cross.forward = lambda h, ctx: nag_cross_reference(  # type: ignore[method-assign]
            model.cross, h, ctx, uncond["text"], 4.0, 2.5, 0.25
        )
        c = model(x, s, cond["text"])
        del model.cross.forward
    close(y, u + 2 * (c - u), 1e-9)
    # without u rows in the call a plain module cannot make the negative keys: it says so
    plan = guidekit.compile(Cond() | NAG(4, layers="cross"))
    with install(model, plan) as around_call, pytest.raises(GuidanceValueError, match="same model call"):
        guidekit.guide(plan, model, cond=cond, uncond=uncond, around_call=around_call)(x, 0.7)


def test_pladis_on_a_plain_self_attention_module() -> None:
    model = tiny_plain().double()
    x, _, _ = inputs()
    cond = {"y": torch.tensor([3, 7])}
    plan = guidekit.compile(Cond() | PLADIS(1.5, layers=1))
    with torch.no_grad():
        with install(model, plan, attention_class=SelfAttention) as around_call:
            y = guidekit.guide(plan, model, cond=cond, around_call=around_call)(x, 2.0)
        attn = model.blocks[1].attn

        def reference(h: torch.Tensor) -> torch.Tensor:
            q, k, v = (attn.split(t) for t in attn.qkv(h).chunk(3, dim=-1))
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            dense = logits.softmax(-1)
            out = (dense + 1.5 * (bisect_entmax(logits, 1.5) - dense)) @ v
            return attn.proj(attn.merge(out))

        attn.forward = reference  # type: ignore[method-assign]
        want = model(x, torch.full((BATCH,), 2.0, dtype=D64), cond["y"])
        del attn.forward
    close(y, want, 1e-9)


# -- restoration and refusals -----------------------------------------------------------------------


@pytest.mark.parametrize("ending", ENDINGS)
def test_exit_restores_processors_and_outputs(ending: str) -> None:
    model, fn = model_and_fn("pixart", torch.float32)
    x, cond, uncond = inputs(torch.float32)
    s = torch.full((BATCH,), 1.0)
    with torch.no_grad():
        before_out = fn(x, s, cond["text"])
        before = processors(model)
        plan = guidekit.compile(CFG(3) + PAG(1) | GAG(5) | NAG(3))
        error = {"normal": None, "exception": Boom, "interrupt": KeyboardInterrupt}[ending]
        try:
            with install(model, plan) as around_call:
                changed = processors(model)
                assert all(changed[p] is not before[p] for p in cross_layers(model))
                # outside a guided call the hooked model is unchanged
                assert torch.equal(fn(x, s, cond["text"]), before_out)
                guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around_call)(x, 1.0)
                if error is Boom:
                    raise Boom()
                if error is KeyboardInterrupt:  # from inside a model call, hooks active

                    def interrupted(*args: Any, **kw: Any) -> torch.Tensor:
                        fn(*args, **kw)
                        raise KeyboardInterrupt

                    guidekit.guide(plan, interrupted, cond=cond, uncond=uncond,
                                   around_call=around_call)(x, 1.0)
        except (Boom, KeyboardInterrupt):
            pass
        after = processors(model)
        assert after.keys() == before.keys()
        assert all(after[k] is v for k, v in before.items())
        assert torch.equal(fn(x, s, cond["text"]), before_out)


def test_refusals_say_what_to_do() -> None:
    x, cond, uncond = inputs(torch.float32)
    with pytest.raises(GuidanceValueError, match="no cross-attention layer"):
        install(tiny_dit(), guidekit.compile(CFG(3) | PLADIS(2)))
    model, fn = model_and_fn("pixart", torch.float32)
    plan = guidekit.compile(CFG(3) | PLADIS(2))
    with pytest.raises(GuidanceValueError, match="needs the attention engine"):
        guidekit.guide(plan, fn, cond=cond, uncond=uncond)(x, 1.0)
    with pytest.raises(GuidanceValueError, match="conditioning"):
        guidekit.guide(guidekit.compile(Cond() | NAG(4)), fn, cond=cond)
    with pytest.raises(GuidanceValueError, match="at most one of"):
        install(model, guidekit.compile(CFG(3) | PLADIS(2) | GAG(5, layers=1)))
    with pytest.raises(GuidanceValueError, match=r"out of range.*transformer_blocks.1.attn2"):
        install(model, guidekit.compile(CFG(3) | PLADIS(2, layers=5)))
    with pytest.raises(GuidanceValueError, match="cannot share a layer"):
        install(tiny_plain(), guidekit.compile(CFG(3) + PAG(1, layers=0) | PLADIS(2, layers=0)),
                attention_class=SelfAttention)
    # nothing was hooked by the refused installs
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in processors(model).values())
