"""Shared helpers of the benchmark scripts: the test models, thread pinning, interleaved timing.

Not a benchmark itself (the scripts are ``overhead.py``, ``split.py``, ``attention.py`` and
``adapters.py``). Every figure a script prints is measured in that run; nothing here holds a
number from an earlier run. What the scripts share: :class:`Session` (threads, load, the
header and footer lines, ``--write``), :func:`euler` (the sampling loop they time),
:func:`check_agree` (same samples before timing) and :func:`interleaved` (the timing).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Class labels 0..9; label 10 is the "no class" row the unconditional branch uses.
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES

Model = Callable[..., torch.Tensor]


def common_args(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: threads, repeats, markdown output."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    p.add_argument("--write", metavar="FILE", default=None, help="also write a markdown table")
    p.add_argument("--plain", action="store_true", help="use the plain-torch model even if "
                   "diffusers is installed")
    return p


def pin_threads(n: int) -> str:
    """Pin torch's intra-op threads (and one inter-op thread); return a line that says so."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set by an earlier parallel region: harmless
        pass
    return (
        f"machine: {platform.machine()} {platform.system()}, {_cpus()} logical CPUs; "
        f"python {platform.python_version()}; torch {torch.__version__}; "
        f"torch threads pinned to {torch.get_num_threads()}"
    )


def _cpus() -> str:
    return str(os.cpu_count())


def load() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews every timing."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average: unknown"
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min)"


# -- models -------------------------------------------------------------------------------------


class _Block(nn.Module):
    """A DiT block with adaLN-zero modulation from the conditioning embedding."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU("tanh"), nn.Linear(4 * dim, dim))
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.mod(emb).unsqueeze(1).chunk(6, dim=-1)
        a = self.norm1(h) * (1 + sc1) + sh1
        h = h + g1 * self.attn(a, a, a, need_weights=False)[0]
        m = self.norm2(h) * (1 + sc2) + sh2
        return h + g2 * self.mlp(m)


class PlainDiT(nn.Module):
    """A small class-conditional DiT in plain torch: the fallback when diffusers is missing.

    Same shape of computation as diffusers' ``DiTTransformer2DModel`` with the benchmark's
    settings (patch embedding, adaLN-zero blocks, linear unpatchify), written from the DiT
    paper's description (https://arxiv.org/abs/2212.09748), not copied from any library.
    """

    def __init__(
        self, size: int = 8, patch: int = 2, channels: int = 1, layers: int = 6,
        heads: int = 4, head_dim: int = 32,
    ) -> None:
        super().__init__()
        dim = heads * head_dim
        self.patch, self.size, self.channels = patch, size, channels
        tokens = (size // patch) ** 2
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.time = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(NUM_CLASSES + 1, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, patch * patch * channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=x.dtype) / half)
        ang = t.to(x.dtype)[:, None] * freqs[None]
        emb = self.time(torch.cat([ang.cos(), ang.sin()], dim=1)) + self.label(labels)
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.final_mod(emb).unsqueeze(1).chunk(2, dim=-1)
        h = self.out(self.norm(h) * (1 + scale) + shift)
        g, p, c = self.size // self.patch, self.patch, self.channels
        h = h.view(-1, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(-1, c, self.size, self.size)


def make_dit(layers: int = 6, seed: int = 0, plain: bool = False) -> tuple[Model, str]:
    """The benchmark DiT as a guidekit model ``(x, sigma, class_labels) -> eps``.

    diffusers' ``DiTTransformer2DModel`` (sample 8, patch 2 -> 16 tokens, 1 channel in and
    out, 4 heads of 32 dims, 10 classes) when diffusers is installed, else :class:`PlainDiT`.
    Returns the model and a line saying which one and how many parameters it has.
    """
    if not plain:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            plain = True
    torch.manual_seed(seed)
    if plain:
        net: nn.Module = _randomised(PlainDiT(layers=layers).eval())
        kind = "plain-torch DiT (benchmarks/_bench.py PlainDiT)"

        def model(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
            return net(x, _timestep(sigma), class_labels)
    else:
        net = diffusers_dit(layers=layers, seed=seed)
        import diffusers

        kind = f"diffusers {diffusers.__version__} DiTTransformer2DModel"

        def model(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
            return net(x, timestep=_timestep(sigma), class_labels=class_labels).sample

    return model, describe(net, kind, layers)


def diffusers_dit(layers: int = 6, seed: int = 0, classes: int = NUM_CLASSES) -> nn.Module:
    """diffusers' ``DiTTransformer2DModel`` of the benchmarks (sample 8, patch 2 -> 16 tokens,
    1 channel in and out, 4 heads of 32 dims), ``classes`` labels, random weights."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    net = DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=layers,
        num_attention_heads=4, attention_head_dim=32, num_embeds_ada_norm=classes,
    ).eval()  # type: ignore[attr-defined]
    return _randomised(net)


def _randomised(net: nn.Module) -> nn.Module:
    # Random weights: adaLN-zero starts at zero, which would make every block an identity.
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 1 and float(p.abs().sum()) == 0.0:
                p.normal_(0.0, 0.02)
    return net


def describe(net: nn.Module, kind: str, layers: int) -> str:
    """One line naming a benchmark model: kind, layers, parameters, tokens."""
    params = sum(p.numel() for p in net.parameters())
    return f"{kind}, {layers} layers, {params / 1e6:.2f}M parameters, 16 tokens"


def _timestep(sigma: torch.Tensor) -> torch.Tensor:
    """DDPM-like time in [0, 1000) from a VP noise level (monotone; exact mapping is moot)."""
    return 1000.0 * sigma / (1.0 + sigma)


def labels(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional class labels and the matching null labels, each ``[batch]``."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return c, torch.full((batch,), NULL_CLASS, dtype=torch.long)


def schedule(steps: int) -> list[float]:
    """A decreasing VP noise schedule (``sigma`` from 14.6 to 0.03), ``steps`` levels."""
    hi, lo = math.log(14.6), math.log(0.03)
    return [math.exp(hi + (lo - hi) * i / max(steps - 1, 1)) for i in range(steps)]


# -- sampling and timing ------------------------------------------------------------------------


def euler(
    predict: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor,
    sigmas: Sequence[float],
) -> torch.Tensor:
    """Euler steps of the eps ODE (VE): ``x += (sigma_next - sigma) predict(x, sigma)``,
    down to 0 after the last level. The sampling loop every script times."""
    for s, s_next in zip(sigmas, [*sigmas[1:], 0.0]):
        x = x + (s_next - s) * predict(x, s)
    return x


def check_agree(outputs: dict[str, torch.Tensor], rtol: float, what: str) -> float:
    """Raise unless every output equals the first up to ``rtol`` (relative to its largest
    magnitude); return the largest absolute difference. Variants that run the same model
    calls must give the same samples before their times mean anything."""
    names = list(outputs)
    ref = outputs[names[0]]
    scale = float(ref.abs().max()) or 1.0
    worst = 0.0
    for name in names[1:]:
        diff = float((outputs[name] - ref).abs().max())
        if not diff / scale <= rtol:
            raise AssertionError(
                f"{what}: {name} differs from {names[0]} by {diff / scale:.2e} (relative)"
            )
        worst = max(worst, diff)
    return worst


class Session:
    """One benchmark run's frame: pinned threads, the load at start and end, ``--write``.

    ``intro(...)`` prints the machine line, the load and the given lines; ``finish(text,
    markdown)`` prints the footer and, with ``--write``, writes the header, the footer and
    ``markdown`` to the file.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.header = pin_threads(args.threads)
        self.started = time.perf_counter()
        self.load_start = load()

    def intro(self, *lines: str) -> None:
        print(self.header)
        print(f"at start: {self.load_start}")
        for line in lines:
            print(line)

    def finish(self, markdown_lines: Sequence[str], notes: Sequence[str] = ()) -> None:
        footer = f"at end: {load()}; took {time.perf_counter() - self.started:.0f} s"
        print(f"\n{footer}")
        if self.args.write:
            text = "\n".join([
                f"{self.header}  ", f"at start: {self.load_start}; {footer}  ",
                *(f"{n}  " for n in notes[:-1]), *notes[-1:], "", *markdown_lines, "",
            ])
            with open(self.args.write, "w") as f:
                f.write(text)
            print(f"\nwrote {self.args.write}")


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def thread_timed(fn: Callable[[], Any]) -> float:
    """The CPU seconds this thread spent in ``fn`` (with one torch thread, all of the
    work): a thread descheduled by other load adds wall time but no CPU time."""
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def interleaved(
    variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2,
    clock: Callable[[Callable[[], Any]], float] = timed, shuffle: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``repeats`` times, order rotated every repeat.

    Rotating the order means slow drift of the machine (other load, thermal state) hits
    every variant alike, so ratios taken from one repeat are fair even when times move.
    ``clock`` times one call (wall time; :func:`thread_timed` for the thread's CPU time).
    ``shuffle``: a fresh random order every repeat (seeded) instead. A rotation keeps the
    cyclic order, so each variant always follows the same one; with small steps what that
    neighbour leaves behind (caches, allocator) biases the pair (3-6 % on the digits model
    at B = 1, docs/benchmarks.md).
    """
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    for r in range(repeats):
        k = r % len(names)
        order = rng.sample(names, len(names)) if shuffle else names[k:] + names[:k]
        for n in order:
            out[n].append(clock(variants[n]))
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over repeats of ``num[i] / den[i]``: each ratio from neighbouring timings."""
    return median([a / b for a, b in zip(num, den)])


def spread(xs: Sequence[float]) -> float:
    """Half the interquartile range relative to the median: a rough +- on one figure."""
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) >= 2 else [min(xs), 0.0, max(xs)]
    return (q[2] - q[0]) / 2 / median(xs)


def emit(text: str, write: str | None) -> None:
    """Print ``text`` and, given ``--write FILE``, write it to that file too."""
    print(text)
    if write:
        Path(write).write_text(text)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table; ``|`` inside a cell (``CFG(7) | APG(...)``) is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(header), "|" + "|".join("---" for _ in header) + "|"]
    lines += [line(r) for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*header), sep, *(fmt.format(*r) for r in rows)])
