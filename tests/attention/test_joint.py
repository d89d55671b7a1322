"""Joint text-image attention (SD3): perturbations act on the image queries only.

References are written here: a processor for diffusers' SD3 ``Attention`` that computes the
joint attention with an explicit softmax, image tokens first, and perturbs the image-query
rows of the map (identity for PAG, the moving average for EMAG) in separate passes."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import guidekit
from guidekit import CFG, EMAG, PAG, SAG

from ._tiny import sharpen

sys.path.insert(0, str(Path(__file__).parents[1] / "adapters"))
from tiny_diffusers import flux_transformer, sd3_transformer  # noqa: E402

B = 2


class JointRef:
    """Explicit joint attention; ``mode``: None, "record" (image-query rows of the map),
    "identity" (PAG on image queries) or "map" (image-query rows replaced)."""

    def __init__(self) -> None:
        self.mode: str | None = None
        self.maps: torch.Tensor | None = None
        self.replacement: torch.Tensor | None = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, **kw: Any) -> Any:
        b, n, _ = hidden_states.shape
        h = attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2)

        q = heads(attn.to_q(hidden_states))
        k = heads(attn.to_k(hidden_states))
        v = heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        tq = heads(attn.add_q_proj(encoder_hidden_states))
        tk = heads(attn.add_k_proj(encoder_hidden_states))
        tv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        Q, K, V = (torch.cat(p, dim=2) for p in ((q, tq), (k, tk), (v, tv)))
        probs = (Q @ K.transpose(-1, -2) / Q.shape[-1] ** 0.5).softmax(-1)
        if self.mode == "record":
            self.maps = probs[:, :, :n].clone()
        elif self.mode == "identity":
            probs = probs.clone()
            probs[:, :, :n] = 0
            probs[:, :, :n, :n] = torch.eye(n)
        elif self.mode == "map":
            probs = probs.clone()
            probs[:, :, :n] = self.replacement
        out = (probs @ V).transpose(1, 2).reshape(b, -1, h * V.shape[-1])
        img, txt = out[:, :n], out[:, n:]
        img = attn.to_out[1](attn.to_out[0](img))
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt


@contextlib.contextmanager
def joint_refs(model: Any, paths: list[str]) -> Iterator[dict[str, JointRef]]:
    old = {p: model.get_submodule(p).processor for p in paths}
    refs = {p: JointRef() for p in paths}
    for p, r in refs.items():
        model.get_submodule(p).set_processor(r)
    try:
        yield refs
    finally:
        for p, proc in old.items():
            model.get_submodule(p).set_processor(proc)


def model_and_inputs(layers: int = 3) -> tuple[Any, Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = sharpen(sd3_transformer(), 3.0)
    if layers != 2:
        torch.manual_seed(0)
        from diffusers import SD3Transformer2DModel

        model = sharpen(SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
            caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16,
        ).eval(), 3.0)

    def fn(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> Any:
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=sigma * 1000).sample

    g = torch.Generator().manual_seed(0)
    cond = {"text": torch.randn(B, 5, 64, generator=g), "pooled": torch.randn(B, 64, generator=g)}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    return model, fn, cond, uncond


def test_pag_on_sd3_perturbs_image_queries_only() -> None:
    model, fn, cond, uncond = model_and_inputs()
    path = "transformer_blocks.1.attn"
    x = torch.randn(B, 4, 8, 8)
    sig = torch.full((B,), 0.6)
    with torch.no_grad():
        with joint_refs(model, [path]) as refs:
            c = fn(x, sig, **cond)
            u = fn(x, sig, **uncond)
            refs[path].mode = "identity"
            p = fn(x, sig, **cond)
        plan = guidekit.compile(CFG(2) + PAG(1.5, layers=1), prediction="flow", noise="flow")
        before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
        with guidekit.attention.install(model, plan) as around:
            g = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
            out = g(x, 0.6)
        after = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert before == after
    assert (p - c).abs().max() > 1e-3
    torch.testing.assert_close(out, u + 2 * (c - u) + 1.5 * (c - p), rtol=1e-5, atol=1e-5)
    assert [cl.rows for cl in g.calls] == [3 * B]


def test_emag_on_sd3_matches_separate_passes() -> None:
    model, fn, cond, uncond = model_and_inputs(layers=3)
    paths = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    sigmas = [0.9, 0.7, 0.5, 0.3]
    x0 = torch.randn(B, 4, 8, 8)
    beta = 0.9
    # reference: separate passes, the paper's update, previous step's delta selects
    ema: dict[str, torch.Tensor] = {}
    delta: dict[str, float] = {}
    ref_outs, used = [], []
    x = x0.clone()
    with torch.no_grad(), joint_refs(model, paths) as refs:
        for i, s in enumerate(sigmas):
            sig = torch.full((B,), s)
            chosen = max(paths, key=lambda p: delta[p]) if delta else None
            for r in refs.values():
                r.mode = "record"
            c = fn(x, sig, **cond)
            for p, r in refs.items():
                ema[p] = r.maps.clone() if p not in ema else beta * ema[p] + (1 - beta) * r.maps
                delta[p] = float((ema[p] - r.maps).abs().mean())
                r.mode = None
            u = fn(x, sig, **uncond)
            if chosen is not None:
                refs[chosen].mode, refs[chosen].replacement = "map", ema[chosen]
            e = fn(x, sig, **cond)
            for r in refs.values():
                r.mode = None
            out = u + 3 * (c - u) + 2 * (c - e)
            ref_outs.append(out)
            used.append(chosen)
            x = x + ((sigmas[i + 1] if i + 1 < len(sigmas) else 0.0) - s) * out
    plan = guidekit.compile(CFG(3) + EMAG(2, layers=(0, 1), beta=beta), prediction="flow",
                            noise="flow")
    x = x0.clone()
    outs, states = [], []
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:
        g = guidekit.guide(plan, fn, cond=cond, uncond=uncond, sigmas=sigmas, around_call=around)
        for i, s in enumerate(sigmas):
            out = g(x, s)
            outs.append(out)
            states.append(g.state.current[-1])
            x = x + ((sigmas[i + 1] if i + 1 < len(sigmas) else 0.0) - s) * out
    assert [st.used for st in states] == used
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for p in paths:  # image-query rows over image and text keys
        assert states[-1].ema[p].shape == (B, 2, 16, 16 + 5)
        torch.testing.assert_close(states[-1].ema[p], ema[p], rtol=1e-5, atol=1e-6)


def test_sag_on_sd3_reads_image_keys() -> None:
    model, fn, cond, uncond = model_and_inputs()
    plan = guidekit.compile(CFG(2) + SAG(0.5, kernel=3, layers=1), prediction="flow",
                            noise="flow")
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:
        g = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
        out = g(torch.randn(B, 4, 8, 8), 0.5)
    assert torch.isfinite(out).all()
    assert [c.rows for c in g.calls] == [2 * B, B]


# -- Flux: text tokens first, double- and single-stream blocks ------------------------------------


def flux_inputs() -> tuple[Any, Any, dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    from diffusers.models.attention_processor import Attention  # noqa: F401 (sharpen's import)

    model = flux_transformer()
    with torch.no_grad():  # sharper maps, so that a perturbation changes the output clearly
        for m in model.modules():
            if type(m).__name__ == "FluxAttention":
                m.to_q.weight.mul_(3.0)
                m.to_k.weight.mul_(3.0)
    n_img, n_txt = 16, 4
    img_ids = torch.zeros(n_img, 3)
    img_ids[:, 1] = torch.arange(n_img) // 4
    img_ids[:, 2] = torch.arange(n_img) % 4
    txt_ids = torch.zeros(n_txt, 3)

    def fn(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> Any:
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=sigma, img_ids=img_ids, txt_ids=txt_ids).sample

    g = torch.Generator().manual_seed(1)
    cond = {"text": torch.randn(B, n_txt, 32, generator=g), "pooled": torch.randn(B, 32, generator=g)}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    return model, fn, cond, uncond, torch.randn(B, n_img, 16, generator=g)


@pytest.mark.parametrize("layer", [0, 1])  # the double-stream block, the single-stream block
def test_pag_on_flux_perturbs_image_queries_only(layer: int, monkeypatch: Any) -> None:
    model, fn, cond, uncond, x = flux_inputs()
    path = guidekit.attention.layer_table(model).paths[layer]
    sig = torch.full((B,), 0.6)
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    target = model.get_submodule(path)
    original_forward = target.forward
    n_txt = cond["text"].shape[1]

    def identity_on_image(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          **kw: Any) -> Any:
        q, k, v = query, key, value
        out = real_sdpa(q, k, v, **kw).clone()
        out[..., n_txt:, :] = v[..., n_txt:, :]  # image queries attend only to themselves
        return out

    def perturbed_forward(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", identity_on_image)
        try:
            return original_forward(*args, **kwargs)
        finally:
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real_sdpa)

    with torch.no_grad():
        c = fn(x, sig, **cond)
        u = fn(x, sig, **uncond)
        target.forward = perturbed_forward
        try:
            p = fn(x, sig, **cond)
        finally:
            del target.forward
        plan = guidekit.compile(CFG(2) + PAG(1.5, layers=layer), prediction="flow", noise="flow")
        with guidekit.attention.install(model, plan) as around:
            g = guidekit.guide(plan, fn, cond=cond, uncond=uncond, around_call=around)
            out = g(x, 0.6)
    assert "forward" not in target.__dict__
    assert (p - c).abs().max() > 1e-3
    torch.testing.assert_close(out, u + 2 * (c - u) + 1.5 * (c - p), rtol=1e-5, atol=1e-5)
    assert [cl.rows for cl in g.calls] == [3 * B]


def test_emag_on_flux_runs_in_one_call() -> None:
    model, fn, cond, uncond, x = flux_inputs()
    plan = guidekit.compile(CFG(2) + EMAG(1.5, layers=(0, 1)), prediction="flow", noise="flow")
    sigmas = [0.9, 0.6, 0.3]
    with torch.no_grad(), guidekit.attention.install(model, plan) as around:
        g = guidekit.guide(plan, fn, cond=cond, uncond=uncond, sigmas=sigmas, around_call=around)
        for s in sigmas:
            out = g(x, s)
        st = g.state.current[-1]
    assert torch.isfinite(out).all()
    assert st.steps == 3 and st.used in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn")
    # averaged maps hold the image-query rows over text + image keys
    assert {tuple(t.shape) for t in st.ema.values()} == {(B, 2, 16, 20)}
    assert [c.rows for c in g.calls] == [3 * B] * 3
