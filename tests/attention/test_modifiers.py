"""PLADIS, GAG and NAG inside the batched forward of tiny real models, against references
written in ``_modifiers_reference.py``: an explicit-map cross-attention processor (sparse maps
by bisection) run one branch at a time, the guidance combined by hand; few-step runs;
composition with CFG and PAG in one call. Plain SDPA modules: test_modifiers_plain.py;
restoration and refusals: test_modifiers_restore.py."""

from __future__ import annotations

import pytest
import torch

import guidekit
from guidekit import CFG, GAG, NAG, PAG, PLADIS, Cond, GuidanceValueError
from guidekit.attention import install

from ._modifiers_reference import (
    D64,
    RefCross,
    branch,
    close,
    context_of,
    cross_layers,
    guided,
    inputs,
    model_and_fn,
)
from ._tiny import BATCH

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
