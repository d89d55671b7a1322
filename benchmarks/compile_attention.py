"""torch.compile with the attention engine: graphs, graph breaks and compiled frames per
expression on tiny diffusers models (CPU, ``backend="eager"``).

For each expression: ``torch._dynamo.explain`` of ONE guided model call (the first call of a
step, its row layout held by the engine's ``around_call``) gives graphs and breaks; then a
``torch.compile``-d model samples ``STEPS`` steps twice with the same engine and once more
after a fresh ``install``, and ``torch._dynamo.utils.counters["frames"]["ok"]`` counts the
frames compiled in each (the first includes the first compile).

    OMP_NUM_THREADS=1 python benchmarks/compile_attention.py
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)

import guidekit
from guidekit import CFG, EMAG, EMAGQ, GAG, NAG, PAG, PLADIS, SEG, SLG
from guidekit.attention import install

STEPS = 4
B = 2


def dit() -> tuple[torch.nn.Module, Callable[..., Any], dict[str, Any], dict[str, Any]]:
    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                              num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                              norm_num_groups=2).eval()

    def fn(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> Any:
        return m(x, timestep=sigma, class_labels=class_labels).sample

    return m, fn, {"class_labels": torch.tensor([3, 7])}, {"class_labels": torch.tensor([0, 0])}


def pixart() -> tuple[torch.nn.Module, Callable[..., Any], dict[str, Any], dict[str, Any]]:
    torch.manual_seed(0)
    m = PixArtTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        caption_channels=32, norm_num_groups=2, use_additional_conditions=False,
    ).eval()

    def fn(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> Any:
        return m(x, encoder_hidden_states=text, timestep=sigma,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    g = torch.Generator().manual_seed(1)
    return (m, fn, {"text": torch.randn(B, 5, 32, generator=g)},
            {"text": torch.randn(B, 5, 32, generator=g)})


def sd3() -> tuple[torch.nn.Module, Callable[..., Any], dict[str, Any], dict[str, Any]]:
    torch.manual_seed(0)
    m = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
    ).eval()

    def fn(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> Any:
        return m(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                 timestep=sigma * 100).sample

    return (m, fn, *_text_conds())  # type: ignore[return-value]


def flux() -> tuple[torch.nn.Module, Callable[..., Any], dict[str, Any], dict[str, Any]]:
    torch.manual_seed(0)
    m = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=False, axes_dims_rope=(4, 4, 8),
    ).eval()
    img_ids = torch.zeros(64, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(64) // 8, torch.arange(64) % 8

    def fn(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> Any:
        # x [B, 4, 8, 8] as 64 packed tokens of 4 channels
        tokens = x.flatten(2).transpose(1, 2)
        out = m(hidden_states=tokens, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=sigma, img_ids=img_ids, txt_ids=torch.zeros(5, 3)).sample
        return out.transpose(1, 2).reshape(x.shape)

    return (m, fn, *_text_conds())  # type: ignore[return-value]


def _text_conds() -> tuple[dict[str, Any], dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    return tuple(  # type: ignore[return-value]
        {"text": torch.randn(B, 5, 32, generator=g), "pooled": torch.randn(B, 32, generator=g)}
        for _ in range(2)
    )


EXPRESSIONS: list[tuple[str, Any, Callable[..., Any]]] = [
    ("CFG(3) (no engine)", CFG(3), dit),
    ("CFG(3) + PAG(2)", CFG(3) + PAG(2, layers=[0, 1]), dit),
    ("CFG(3) + SEG(2)", CFG(3) + SEG(2, layers=[0, 1]), dit),
    ("CFG(3) + EMAG(1.5)", CFG(3) + EMAG(1.5), dit),
    ("CFG(3) + EMAGQ(1.5)", CFG(3) + EMAGQ(1.5), dit),
    ("CFG(3) + SLG(2)", CFG(3) + SLG(2, layers=1), dit),
    ("CFG(3) + PAG(2).between(0.5, 10)", CFG(3) + PAG(2, layers=[0, 1]).between(0.5, 10), dit),
    ("CFG(3) | NAG(2)", CFG(3) | NAG(2), pixart),
    ("CFG(3) | PLADIS(1.5)", CFG(3) | PLADIS(1.5), pixart),
    ("CFG(3) | GAG(5)", CFG(3) | GAG(5), pixart),
    ("SD3: CFG(3) | NAG(2)", CFG(3) | NAG(2), sd3),
    ("SD3: CFG(3) | PLADIS(1.5)", CFG(3) | PLADIS(1.5), sd3),
    ("Flux: CFG(3) | NAG(2)", CFG(3) | NAG(2), flux),
    ("Flux: CFG(3) | PLADIS(1.5)", CFG(3) | PLADIS(1.5), flux),
]


def measure(expr: Any, build: Callable[..., Any]) -> dict[str, Any]:
    model, fn, cond, uncond = build()
    plan = guidekit.compile(expr)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 4, 8, 8, generator=g)
    calls: list[Any] = []

    def recording(*args: Any, **kw: Any) -> Any:
        calls.append((args, kw))
        return fn(*args, **kw)

    with torch.no_grad(), install(model, plan) as around:
        layouts: list[Any] = []

        def ac(layout: Any) -> Any:
            layouts.append(layout)
            return around(layout)

        guidekit.guide(plan, recording, cond=cond, uncond=uncond, around_call=ac)(x, 1.0)
        args, kw = calls[0]
        with around(layouts[0]):
            exp = torch._dynamo.explain(fn)(*args, **kw)
    row: dict[str, Any] = {"graphs": exp.graph_count, "breaks": exp.graph_break_count}
    row["frames"], _ = three_runs(model, plan, fn, cond, uncond,
                                  torch.linspace(10.0, 0.1, STEPS).tolist())
    return row


def three_runs(model: torch.nn.Module, plan: Any, fn: Callable[..., Any], cond: Any,
               uncond: Any, sigmas: list[float]) -> tuple[list[int], set[Any]]:
    """Frames compiled while a compiled ``fn`` samples ``sigmas`` in a first run, a second
    run with the same engine and a run after a new install; and the distinct active-branch
    sets (each call's branches) the runs had."""
    compiled = torch.compile(fn, backend="eager")
    x = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    sets: set[Any] = set()
    frames = []
    engine = install(model, plan)
    for fresh in (False, False, True):
        if fresh:
            engine = install(model, plan)
        before = torch._dynamo.utils.counters["frames"]["ok"]
        with torch.no_grad(), engine as around:
            def ac(layout: Any, around: Any = around) -> Any:
                sets.add(tuple(b for b, _, _ in layout.blocks))
                return around(layout)

            guided = guidekit.guide(plan, compiled, cond=cond, uncond=uncond, around_call=ac)
            for s in sigmas:
                guided(x, s)
        frames.append(torch._dynamo.utils.counters["frames"]["ok"] - before)
    torch._dynamo.reset()
    return frames, sets


GATED: list[tuple[str, Any]] = [
    ("CFG(5) + PAG(2).between(1, 10)", CFG(5) + PAG(2, layers=[0, 1]).between(1, 10)),
    ("CFG(5) + PAG(2).between(1, 10) + SEG(2).between(0.5, 5)",
     CFG(5) + PAG(2, layers=[0]).between(1, 10) + SEG(2, layers=[2]).between(0.5, 5)),
    ("CFG(5).between(2, 20) + PAG(2).between(1, 10) + SEG(2).between(0.5, 5)",
     CFG(5).between(2, 20) + PAG(2, layers=[0]).between(1, 10)
     + SEG(2, layers=[2]).between(0.5, 5)),
]
#: every gate edge above is crossed: 12 > 10, 9 and 7 in (5, 10], 4 .. 2 in (1, 5], ...
GATED_SIGMAS = [12.0, 9.0, 7.0, 4.0, 3.0, 2.0, 1.5, 0.8, 0.6, 0.3, 0.2]


def recompiles(expr: Any) -> tuple[int, list[int]]:
    """The distinct active-branch sets of a run over GATED_SIGMAS, and the frames compiled
    in its three runs (see :func:`three_runs`)."""
    model, fn, cond, uncond = dit()
    frames, sets = three_runs(model, guidekit.compile(expr), fn, cond, uncond, GATED_SIGMAS)
    return len(sets), frames


def main() -> None:
    print("| expression | graphs | graph breaks | frames compiled: run 1 / run 2 (same engine) / run 3 (new install) |")
    print("|---|---|---|---|")
    for name, expr, build in EXPRESSIONS:
        try:
            r = measure(expr, build)
            print(f"| `{name}` | {r['graphs']} | {r['breaks']} | {' / '.join(map(str, r['frames']))} |",
                  flush=True)
        except Exception as err:  # a row that fails says so instead of hiding the others
            print(f"| `{name}` | error: {type(err).__name__}: {str(err)[:120]} | | |", flush=True)
    print()
    print(f"| gated expression ({len(GATED_SIGMAS)} steps) | distinct active sets | frames compiled: run 1 / run 2 / run 3 (new install) |")
    print("|---|---|---|")
    for name, expr in GATED:
        n, frames = recompiles(expr)
        print(f"| `{name}` | {n} | {' / '.join(map(str, frames))} |", flush=True)


if __name__ == "__main__":
    main()
