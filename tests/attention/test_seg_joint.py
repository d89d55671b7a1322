"""SEG (arXiv 2408.00760) in joint attention: SD3 and Flux blur their image queries only.

Oracles as in test_seg_models.py, the reference's NumPy blur applied to the image tokens
(text queries attend as they are). Float64 models, 1e-9.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import guidekit
from guidekit import CFG, SEG

from ._joint_models import sd3_conds, sd3_fn, tiny_sd3
from ._seg_reference import TOL, check_calls, from_np, np_seg_attention, run_and_compare, to_np
from ._tiny import BATCH

# -- SD3: joint attention, image queries only ----------------------------------------------------


class NumpyJointSEGProcessor:
    """SD3's joint attention with NumPy-blurred IMAGE queries (text queries unchanged)."""

    def __init__(self, grid: tuple[int, int], sigma: float) -> None:
        self.grid, self.sigma = grid, sigma

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, **kw: Any) -> Any:
        assert attn.norm_q is None and getattr(attn, "norm_added_q", None) is None
        h, n = attn.heads, hidden_states.shape[1]
        q, k, v = (to_np(f(hidden_states), h) for f in (attn.to_q, attn.to_k, attn.to_v))
        tq, tk, tv = (to_np(f(encoder_hidden_states), h)
                      for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        kj, vj = np.concatenate([k, tk], 1), np.concatenate([v, tv], 1)
        img = from_np(np_seg_attention(q, kj, vj, self.grid, self.sigma), hidden_states)
        # text queries: plain attention (a 1-tap kernel leaves them as they are)
        txt = from_np(np_seg_attention(tq, kj, vj, (tq.shape[1], 1), 0.01), hidden_states)
        assert n == self.grid[0] * self.grid[1]
        img = attn.to_out[1](attn.to_out[0](img))
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt


def test_seg_on_sd3_blurs_image_queries_only() -> None:
    model = tiny_sd3()
    fn = sd3_fn(model)
    cond, uncond = sd3_conds()
    paths = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]

    def ref(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
        saved = {p: model.get_submodule(p).get_processor() for p in paths}
        try:
            for p in paths:
                model.get_submodule(p).set_processor(NumpyJointSEGProcessor((4, 6), 1.0))
            g = fn(x, sig, **cond)
        finally:
            for p, proc in saved.items():
                model.get_submodule(p).set_processor(proc)
        assert (c - g).abs().max() > 1e-4
        return u + 4 * (c - u) + 2 * (c - g)

    plan = guidekit.compile(CFG(4) + SEG(2, blur_sigma=1, layers=[0, 1]))
    worst, guided = run_and_compare(plan, model, fn, cond, uncond, ref, sigmas=(0.9, 0.5, 0.0))
    check_calls(guided, 2, 3)
    assert worst < TOL


# -- Flux: the queries as they enter scaled_dot_product_attention, image tokens only -------------


class NumpySEGMode(torch.overrides.TorchFunctionMode):
    """Inside the reference pass: every SDPA call attends with its IMAGE queries (after
    ``text`` text tokens) blurred by NumPy over ``grid``, explicit softmax, float64."""

    def __init__(self, text: int, grid: tuple[int, int], sigma: float) -> None:
        super().__init__()
        self.text, self.grid, self.sigma, self.calls = text, grid, sigma, 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        bound = dict(zip(("query", "key", "value"), args), **kwargs)
        q, k, v = (bound[n].detach().numpy().transpose(0, 2, 1, 3)  # [b, s, h, d]
                   for n in ("query", "key", "value"))
        assert bound.get("attn_mask") is None and not bound.get("is_causal")
        assert bound.get("scale") is None and not bound.get("dropout_p")
        t = self.text
        img = np_seg_attention(q[:, t:], k, v, self.grid, self.sigma)
        txt = np_seg_attention(q[:, :t], k, v, (t, 1), 0.01)  # a 1-tap kernel: plain
        out = np.concatenate([txt, img], axis=1).transpose(0, 2, 1, 3)
        return torch.from_numpy(np.ascontiguousarray(out)).to(bound["query"].dtype)


@pytest.mark.parametrize("layers", [[0], [1, 3]])  # double block 0; double 1 + single 1
def test_seg_on_flux_blurs_image_queries_only(layers: list[int]) -> None:
    """Flux's packed-token input has no spatial size: the grid is given to install."""
    from ._joint_models import TEXT_TOKENS, flux_fn, tiny_flux

    model = tiny_flux()
    fn = flux_fn(model)
    cond, uncond = sd3_conds()
    table = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
             "single_transformer_blocks.1"]
    paths = [f"{table[i]}.attn" for i in layers]

    def ref(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        c, u = fn(x, sig, **cond), fn(x, sig, **uncond)
        saved = {p: model.get_submodule(p).forward for p in paths}
        modes = []
        try:
            for p in paths:
                mode = NumpySEGMode(TEXT_TOKENS, (4, 4), 1.0)
                modes.append(mode)

                def forward(*a: Any, _f: Any = saved[p], _m: Any = mode, **kw: Any) -> Any:
                    with _m:
                        return _f(*a, **kw)

                model.get_submodule(p).forward = forward
            g = fn(x, sig, **cond)
        finally:
            for p, f in saved.items():
                model.get_submodule(p).forward = f
        assert all(m.calls == 1 for m in modes)
        assert (c - g).abs().max() > 1e-5
        return u + 3 * (c - u) + 2 * (c - g)

    plan = guidekit.compile(CFG(3) + SEG(2, blur_sigma=1, layers=layers))
    worst, guided = run_and_compare(plan, model, fn, cond, uncond, ref, sigmas=(0.9, 0.5, 0.0),
                                    shape=(BATCH, 16, 16), grid=(4, 4))
    check_calls(guided, 2, 3)
    assert worst < TOL
    # the model's own forwards are back (the engine's were restored by the reference too)
    assert all("forward" not in m.__dict__ for m in model.modules())
