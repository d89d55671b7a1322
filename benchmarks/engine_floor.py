"""The floor under the engine's cost: engine_cost.py's steps written by hand with only the
papers' operators, timed the same way (guided minus a bare forward of the same rows).

    OMP_NUM_THREADS=1 python benchmarks/engine_floor.py [--repeats 150]

Each hand-written step computes what guidekit's step computes at the same point of the
same run, and is checked against it before timing: the rows built (x repeated, the noise
levels; the class labels are built once, as a hand-written loop would), two hand-written
processors on the DiT's attention layers (PAG: one attention kernel over every row, the
perturbed row overwritten with ``V``; EMAG: the conditional row's map made explicitly, the
average blended with the previous step's map, the perturbed row ``average @ V``), the
combination as one matrix product over the rows, APG's projection in float64 (in x0 space,
folded into one conversion) and one non-finite check of the output (guidekit's rule,
"nothing silent"; no paper asks for it). With one candidate layer EMAG's selection needs
no spread, so the floor computes none; guidekit does (for its records).

The difference ``guidekit - floor`` is what the engine's generality costs on top of the
formulas: checks, routing, state, records, the split policy, its conversions.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import _bench as bench  # noqa: E402
import engine_cost as ec  # noqa: E402

import guidekit  # noqa: E402

#: the rows of each expression's call (layout order) and its coefficients on them
SHAPES: dict[str, tuple[str, dict[str, float], bool]] = {
    "CFG(7)": ("cu", {"c": 7.0, "u": -6.0}, False),
    "CFG(7) + PAG(3)": ("cup", {"c": 10.0, "u": -6.0, "p": -3.0}, False),
    "CFG(7) + EMAG(1.5)": ("cue", {"c": 8.5, "u": -6.0, "e": -1.5}, False),
    "CFG(7) + PAG(3) + EMAG(1.5) | APG(eta=0)":
        ("cupe", {"c": 11.5, "u": -6.0, "p": -3.0, "e": -1.5}, True),
}
#: the paper's decay of EMAG's average (guidekit's default)
BETA = 0.988
#: the attention layers guidekit's engine chooses on the 6-block DiT (PAG: the last block;
#: EMAG: the paper's candidate range scaled to 6 blocks, one layer), checked in main()
PAG_LAYER, EMAG_LAYER = "transformer_blocks.5.attn1", "transformer_blocks.3.attn1"


class Floor:
    """A stock self-attention processor for diffusers' ``Attention`` (no norms, no mask, 3-D
    input: the benchmark DiT's layers) with PAG's or EMAG's row overwritten."""

    def __init__(self, pag: int | None = None, emag: int | None = None) -> None:
        self.pag, self.emag = pag, emag
        self.held: torch.Tensor | None = None  # the average kept from the previous step
        self.current: torch.Tensor | None = None  # this step's conditional map

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: Any = None, attention_mask: Any = None,
                 temb: Any = None) -> torch.Tensor:
        rows, tokens, width = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states).view(rows, tokens, heads, -1).transpose(1, 2)
        k = attn.to_k(hidden_states).view(rows, tokens, heads, -1).transpose(1, 2)
        v = attn.to_v(hidden_states).view(rows, tokens, heads, -1).transpose(1, 2)
        core = F.scaled_dot_product_attention(q, k, v)
        if self.pag is not None:
            core[self.pag : self.pag + 1] = v[self.pag : self.pag + 1]
        if self.emag is not None:
            probs = torch.softmax(q[:1] @ k[:1].transpose(-1, -2) * attn.scale, dim=-1)
            self.current = probs
            if self.held is not None:
                average = torch.lerp(probs, self.held, BETA)
                core[self.emag : self.emag + 1] = average @ v[self.emag : self.emag + 1]
        out = core.transpose(1, 2).reshape(rows, tokens, width)
        return attn.to_out[1](attn.to_out[0](out))  # type: ignore[no-any-return]


def floor_step(
    net: torch.nn.Module, name: str, x: torch.Tensor, sigma: float, cond: torch.Tensor,
    uncond: torch.Tensor,
) -> Callable[[], torch.Tensor]:
    """The hand-written step of ``name`` at ``sigma`` on ``net`` (processors installed), in
    the state guidekit's timed step starts from: EMAG's average is the map of the step at
    ``ec.SIGMAS[0]``."""
    rows, coefs, apg = SHAPES[name]
    k = len(rows)
    model = ec._forward(net)
    procs: dict[str, Floor] = {}
    if "p" in rows:
        procs[PAG_LAYER] = Floor(pag=rows.index("p"))
    if "e" in rows:
        procs[EMAG_LAYER] = Floor(emag=rows.index("e"))
    for path, proc in procs.items():
        net.get_submodule(path).set_processor(proc)  # type: ignore[operator]
    labels = torch.cat([cond if r != "u" else uncond for r in rows])
    if "e" in rows:  # the previous step's map, as guidekit's run holds it
        with torch.no_grad():
            model(torch.cat([x] * k), torch.full((k,), ec.SIGMAS[0]), labels)
        emag = procs[EMAG_LAYER]
        emag.held = emag.current
    noise = guidekit.Noise("vp")
    a, b = noise.coefficients(sigma)
    batch = x.shape[0]
    if apg:
        # rows [X, u] of APG's CFG form: X = (y + 6 u) / 7 in eps space (its x0 conversion is
        # the same affine map as each branch's), w = 7
        w = -coefs["u"] + 1.0
        lin = torch.tensor([[coefs.get(r, 0.0) + (6.0 if r == "u" else 0.0) for r in rows],
                            [1.0 if r == "u" else 0.0 for r in rows]]) / torch.tensor([[w], [1.0]])
    else:
        lin = torch.tensor([[coefs.get(r, 0.0) for r in rows]])

    def step() -> torch.Tensor:
        with torch.no_grad():
            out = model(torch.cat([x] * k), torch.full((k * batch,), sigma), labels)
            flat = out.view(k, -1)
            if not apg:
                y = (lin @ flat).view_as(x)
            else:
                xu = (lin @ flat).double()
                x64 = x.double().view(1, -1)
                x0 = torch.add(x64, xu, alpha=-b).div_(a)  # [X0; u0]
                X0, u0 = x0[0], x0[1]
                d = X0 - u0
                ratio = torch.dot(d, X0).div_(torch.dot(X0, X0))
                out0 = torch.add(X0, d, alpha=w - 1.0).addcmul_(X0, ratio, value=-(w - 1.0))
                y = torch.add(x64.view(-1), out0, alpha=-a).div_(b).float().view_as(x)
            if not bool(torch.isfinite(y).all()):
                raise FloatingPointError("non-finite guided output")
            return y

    return step


def main() -> None:
    p = bench.common_args(__doc__.splitlines()[0])
    p.set_defaults(threads=1)
    args = p.parse_args()
    session = bench.Session(args)
    net = bench.diffusers_dit()
    session.intro(bench.describe(net, "diffusers DiTTransformer2DModel", 6) + f"; B = {ec.B}")
    c, u = bench.labels(ec.B)
    x = torch.randn(ec.B, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    steps: dict[str, Callable[[], Any]] = {}
    engines = []
    pairs = []
    worst = 0.0
    for name, expr in ec.EXPRESSIONS.items():
        guided, engine, rows = ec.guided_step(copy.deepcopy(net), expr)
        engines.append(engine)
        floor = floor_step(copy.deepcopy(net), name, x, ec.SIGMAS[1], c, u)
        ref, mine = guided(), floor()
        err = float((ref - mine).abs().max() / ref.abs().max())
        worst = max(worst, err)
        if err > 1e-4:
            raise SystemExit(f"{name}: the floor differs from guidekit's step by {err:.1e}")
        steps[name] = guided
        steps[f"floor {name}"] = floor
        # a bare copy of its own, used as often as the guided and floor copies (see engine_cost)
        steps[f"bare {name}"] = ec.bare_step(copy.deepcopy(net), rows)
        pairs += [(name, f"bare {name}", rows), (f"floor {name}", f"bare {name}", rows)]
    try:
        for s in steps.values():
            for _ in range(5):
                s()
        ops = {n: ec.op_count(s) for n, s in steps.items()}
        times = ec.paired(steps, pairs, args.repeats or 150, bench.thread_timed)
    finally:
        for engine in engines:
            engine.__exit__(None, None, None)

    def extra(n: str) -> float:
        return bench.median([g - b for g, b in zip(times[n], times[f"bare {name}"])]) * 1e3

    table = []
    for name in ec.EXPRESSIONS:
        g, f = extra(name), extra(f"floor {name}")
        table.append([name, f"{g:.2f}", f"{f:.2f}", f"{g - f:.2f}",
                      str(ops[name] - ops[f"bare {name}"]),
                      str(ops[f"floor {name}"] - ops[f"bare {name}"])])
    header = ["expression", "guidekit - bare ms", "floor - bare ms", "guidekit - floor ms",
              "guidekit extra ops", "floor extra ops"]
    print(bench.text_table(header, table))
    note = (f"{args.repeats or 150} paired repeats, medians, thread CPU time; floor vs "
            f"guidekit output: max relative difference {worst:.1e}")
    print(note)
    session.finish([bench.markdown(header, table)], [note])


if __name__ == "__main__":
    main()
