"""The same guided sampling through each guidekit adapter and through the peer's own way.

Run: ``python benchmarks/adapters.py [--threads 2] [--repeats N] [--steps S] [--write FILE]``.

The model is diffusers' ``DiTTransformer2DModel`` of the other benchmarks (16 tokens, 6
layers, 2.1M parameters; 1000 classes here, since ``DiTPipeline`` uses label 1000 as its
null class), random weights, float32. Per adapter, interleaved (see ``_bench.py``):

* **diffusers** -- a ``DiTPipeline`` (DDIM, with a tiny VAE that decodes the result) for
  ``CFG(4)`` and ``CFG(4) + PAG(2)`` in the last block:

  - peer: diffusers' own guiders, ``ClassifierFreeGuidance`` / ``PerturbedAttentionGuidance``,
    driven by the loop of diffusers' modular denoise blocks (``set_state``,
    ``prepare_inputs``, per batch ``prepare_models`` / forward / ``cleanup_models``, then the
    guider's combine and ``scheduler.step``): one forward of B rows per condition;
  - guidekit's guider: ``GuidekitGuidance(expr, batched=True)`` in the same loop: one
    forward of K x B rows (PAG: the attention engine installed for the run);
  - guidekit's pipeline: the unmodified ``DiTPipeline`` inside ``guided(pipe, expr)``;
  - for ``CFG(4)`` also the pipeline's own CFG (one forward of 2B rows), as a reference.

  diffusers' PAG guider never perturbs step 0 (its window has a strict lower bound), so
  guidekit's expression gates PAG the same way, ``PAG(2).between(0, sigma_1)``, to compare
  like with like.
* **k-diffusion** -- ``CFG(4)`` through ``sample_euler``, ``sample_heun`` and
  ``sample_dpmpp_2m`` (10 Karras steps) around k-diffusion's ``DiscreteEpsDDPMDenoiser``:
  peer, a hand-written ``CFGDenoiser`` (concatenate ``[x, x]``, call once, split);
  guidekit, ``KDiffusionGuided(CFG(4), ...)``. Skipped, with a note, when
  ``import k_diffusion`` fails.
* **flow_matching** -- ``CFG`` through ``ODESolver`` (midpoint, 10 grid steps) with a
  velocity model: peer, the library example's way (two separate forwards, ``(1 + w) c -
  w u``); guidekit, ``FlowGuided(CFG(1 + w), ...).model_wrapper()``.

For each it prints the time per sampling run, the ratio guidekit / peer (median over repeats
of neighbouring timings, ± half the IQR), the model forwards per run, and the largest
absolute difference of the samples (every variant computes the same guidance).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as bench  # noqa: E402

from guidekit import CFG, PAG  # noqa: E402

W, S = 4.0, 2.0
BATCHES = (1, 8)
LAYERS = 6
NULL = 1000  # DiTPipeline's null class


@contextlib.contextmanager
def counting(net: nn.Module, log: list[int]) -> Iterator[None]:
    """Append the rows of every real forward of ``net`` to ``log``."""
    entry = net.get_submodule("pos_embed")  # the first layer a DiT runs on its input
    handle = entry.register_forward_pre_hook(lambda _m, a: log.append(int(a[0].shape[0])))
    try:
        yield
    finally:
        handle.remove()


def timed_rows(
    variants: Mapping[str, Callable[[], torch.Tensor]], net: nn.Module, repeats: int
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor], dict[str, list[int]]]:
    """Each variant's output and forwards (one untimed run), then interleaved timings."""
    outs, forwards = {}, {}
    for name, fn in variants.items():
        log: list[int] = []
        with counting(net, log):
            outs[name] = torch.as_tensor(fn()).float()
        forwards[name] = log
    return bench.interleaved(dict(variants), repeats), outs, forwards


def row(
    adapter: str, config: str, b: int, peer: str, mine: str, times: dict[str, list[float]],
    outs: dict[str, torch.Tensor], forwards: dict[str, list[int]],
) -> dict[str, Any]:
    ratios = [g / p for g, p in zip(times[mine], times[peer])]
    return {
        "adapter": adapter, "config": config, "B": b, "peer": peer, "guidekit": mine,
        "peer_ms": bench.median(times[peer]) * 1e3, "mine_ms": bench.median(times[mine]) * 1e3,
        "ratio": bench.median(ratios), "spread": bench.spread(ratios),
        "diff": float((outs[mine] - outs[peer]).abs().max()),
        "calls": f"{len(forwards[peer])} ({sum(forwards[peer])} rows) / "
                 f"{len(forwards[mine])} ({sum(forwards[mine])} rows)",
    }


# -- diffusers ------------------------------------------------------------------------------------


def dit_pipeline() -> tuple[Any, nn.Module]:
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    net = bench.diffusers_dit(layers=LAYERS, seed=0, classes=1000)
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=1, block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=2, layers_per_block=1, sample_size=16,
    ).eval()  # type: ignore[attr-defined]
    pipe = DiTPipeline(transformer=net, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipe, net


def guider_loop(
    pipe: Any, guider: Any, labels: torch.Tensor, steps: int, seed: int
) -> torch.Tensor:
    """The loop of diffusers' modular denoise blocks, written out for a DiT: the guider
    decides the batches, the loop runs one forward per batch, the guider combines."""
    from diffusers.utils.torch_utils import randn_tensor

    net, scheduler = pipe.transformer, pipe.scheduler
    x = randn_tensor((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    null = torch.full_like(labels, NULL)
    scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(step=i, num_inference_steps=steps, timestep=t)
        batches = guider.prepare_inputs({"hidden_states": (x, x), "class_labels": (labels, null)})
        for batch in batches:
            guider.prepare_models(net)
            rows = batch.hidden_states
            batch.noise_pred = net(
                rows, timestep=t.expand(rows.shape[0]), class_labels=batch.class_labels
            ).sample
            guider.cleanup_models(net)
        x = scheduler.step(guider(batches).pred, t, x).prev_sample
    # what DiTPipeline does with the final latents (the variants compare images)
    images = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def diffusers_rows(b: int, steps: int, repeats: int) -> list[dict[str, Any]]:
    from diffusers.guiders import ClassifierFreeGuidance, PerturbedAttentionGuidance

    from guidekit.adapters.diffusers import GuidekitGuidance, guided
    from guidekit.attention import install

    pipe, net = dit_pipeline()
    labels = torch.arange(b) % 1000
    seed = 0
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.double()
    t1 = int(scheduler.timesteps[1])
    sigma_1 = float(((1 - abar[t1]) / abar[t1]).sqrt())
    last = f"transformer_blocks.{LAYERS - 1}.attn1"
    configs = {
        "CFG(4)": (CFG(W), ClassifierFreeGuidance(guidance_scale=W)),
        # the peer's PAG skips step 0: the same gate in guidekit's expression
        "CFG(4) + PAG(2), last block": (
            CFG(W) + PAG(S, layers=last).between(0, sigma_1 * (1 + 1e-9)),
            PerturbedAttentionGuidance(
                guidance_scale=W, perturbed_guidance_scale=S, perturbed_guidance_start=0.0,
                perturbed_guidance_stop=1.0, perturbed_guidance_layers=[LAYERS - 1],
            ),
        ),
    }

    def call_pipe() -> torch.Tensor:
        return pipe(class_labels=labels.tolist(), guidance_scale=W, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images

    out = []
    for config, (expr, peer) in configs.items():
        ours = GuidekitGuidance(expr, batched=True).attach(scheduler=pipe.scheduler)

        def with_peer(peer: Any = peer) -> torch.Tensor:
            return guider_loop(pipe, peer, labels, steps, seed)

        def with_guider(ours: Any = ours) -> torch.Tensor:
            with contextlib.ExitStack() as stack:
                if any(br.perturbation is not None for br in ours.plan.branches):
                    ours.attach(around_call=stack.enter_context(install(net, ours.plan)))
                return guider_loop(pipe, ours, labels, steps, seed)

        def with_pipeline(expr: Any = expr) -> torch.Tensor:
            with guided(pipe, expr):
                return call_pipe()

        variants: dict[str, Callable[[], torch.Tensor]] = {
            "diffusers guider": with_peer, "guidekit guider": with_guider,
            "guidekit guided(pipe)": with_pipeline,
        }
        if config == "CFG(4)":
            variants["DiTPipeline own CFG"] = call_pipe
        times, outs, forwards = timed_rows(variants, net, repeats)
        for mine in [n for n in variants if n.startswith("guidekit")]:
            out.append(row("diffusers", config, b, "diffusers guider", mine, times, outs,
                           forwards))
        if "DiTPipeline own CFG" in variants:
            out.append(row("diffusers", config, b, "diffusers guider", "DiTPipeline own CFG",
                           times, outs, forwards))
            # what guided(...) costs over the pipeline's own batched CFG (same rows)
            out.append(row("diffusers", config, b, "DiTPipeline own CFG",
                           "guidekit guided(pipe)", times, outs, forwards))
    return out


# -- k-diffusion ----------------------------------------------------------------------------------


class EpsNet(nn.Module):
    """The DiT as the raw eps network k-diffusion's DDPM wrappers call: ``(x, t, cond)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(x, timestep=t, class_labels=cond).sample


class CFGDenoiser:
    """Classifier-free guidance the way k-diffusion users write it by hand: both halves of
    the batch in one call, then ``u + (c - u) w``."""

    def __init__(self, model: Callable[..., torch.Tensor], scale: float) -> None:
        self.model, self.scale = model, scale

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor
    ) -> torch.Tensor:
        both = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                          cond=torch.cat([cond, uncond]))
        c, u = both.chunk(2)
        return u + (c - u) * self.scale


def kdiffusion_rows(b: int, steps: int, repeats: int, K: Any) -> list[dict[str, Any]]:
    from guidekit.adapters.kdiffusion import KDiffusionGuided

    net = bench.diffusers_dit(layers=LAYERS, seed=0, classes=1000)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    den = K.external.DiscreteEpsDDPMDenoiser(EpsNet(net), torch.cumprod(1 - betas, 0), quantize=False)
    sigmas = K.sampling.get_sigmas_karras(steps, 0.03, 14.6)
    cond, uncond = torch.arange(b) % 1000, torch.full((b,), NULL)
    x = torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    peer = CFGDenoiser(den, W)
    ours = KDiffusionGuided(CFG(W), den, uncond=uncond, cond_key="cond", sigmas=sigmas)
    out = []
    for name in ("euler", "heun", "dpmpp_2m"):
        sampler = getattr(K.sampling, f"sample_{name}")

        def with_peer(sampler: Any = sampler) -> torch.Tensor:
            return sampler(peer, x, sigmas, extra_args={"cond": cond, "uncond": uncond},
                           disable=True)

        def with_guidekit(sampler: Any = sampler) -> torch.Tensor:
            ours.reset()
            return sampler(ours, x, sigmas, extra_args={"cond": cond}, disable=True)

        peer_name, mine = "hand-written CFGDenoiser", "guidekit KDiffusionGuided"
        times, outs, forwards = timed_rows(
            {peer_name: with_peer, mine: with_guidekit}, net, repeats
        )
        out.append(row("k-diffusion", f"CFG(4), sample_{name}", b, peer_name, mine, times, outs,
                       forwards))
    return out


# -- flow_matching --------------------------------------------------------------------------------


class Velocity(nn.Module):
    """The DiT as a flow_matching velocity model ``(x, t, cond) -> u`` (t: 0 noise -> 1)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0])  # ODESolver passes a 0-d time
        return self.net(x, timestep=1000 * (1 - t), class_labels=cond).sample


def flow_rows(b: int, steps: int, repeats: int) -> list[dict[str, Any]]:
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    from guidekit.adapters.flow import FlowGuided

    class TwoPassCFG(ModelWrapper):
        """flow_matching's example CFG: the conditional and unconditional forwards one after
        the other, combined as ``(1 + w) c - w u``."""

        def forward(self, x: torch.Tensor, t: torch.Tensor, **extras: Any) -> torch.Tensor:
            w = extras["cfg_scale"]
            c = self.model(x, t, extras["cond"])
            u = self.model(x, t, extras["uncond"])
            return (1.0 + w) * c - w * u

    net = bench.diffusers_dit(layers=LAYERS, seed=0, classes=1000)
    model = Velocity(net)
    grid = torch.linspace(0, 1, steps + 1)
    cond, uncond = torch.arange(b) % 1000, torch.full((b,), NULL)
    x = torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    w = W - 1.0  # the example's (1 + w) c - w u is guidekit's CFG(1 + w)
    peer = ODESolver(velocity_model=TwoPassCFG(model))
    ours = FlowGuided(CFG(1.0 + w), model, uncond=uncond, time_grid=grid)
    solver = ODESolver(velocity_model=ours.model_wrapper())

    def with_peer() -> torch.Tensor:
        return peer.sample(x_init=x, step_size=None, method="midpoint", time_grid=grid,
                           cond=cond, uncond=uncond, cfg_scale=w)

    def with_guidekit() -> torch.Tensor:
        ours.reset()
        return solver.sample(x_init=x, step_size=None, method="midpoint", time_grid=grid,
                             cond=cond)

    peer_name, mine = "two forwards (library example)", "guidekit FlowGuided"
    times, outs, forwards = timed_rows({peer_name: with_peer, mine: with_guidekit}, net, repeats)
    return [row("flow_matching", "CFG(4), midpoint", b, peer_name, mine, times, outs, forwards)]


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def main() -> None:
    p = bench.common_args(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="sampling steps per run")
    args = p.parse_args()
    session = bench.Session(args)
    repeats = args.repeats or 10
    try:
        import k_diffusion as K
    except Exception as err:  # noqa: BLE001 -- any import failure means: skip this peer
        K = None
        k_note = f"k-diffusion: SKIPPED, `import k_diffusion` failed: {type(err).__name__}: {err}"
    else:
        k_note = f"k-diffusion {_version('k-diffusion')}"
    versions = f"diffusers {_version('diffusers')}; {k_note}; flow_matching {_version('flow_matching')}"
    session.intro(
        "model: diffusers DiTTransformer2DModel, 6 layers, 4 heads x 32, 16 tokens, "
        "1000 classes, float32, random weights",
        versions,
        f"{args.steps} steps per run, {repeats} interleaved repeats (+2 warm-up); "
        f"ratio = median over repeats of guidekit / peer\n",
    )
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for b in BATCHES:
            rows += diffusers_rows(b, args.steps, repeats)
            if K is not None:
                rows += kdiffusion_rows(b, args.steps, repeats, K)
            rows += flow_rows(b, args.steps, repeats)
    if K is None:
        print(f"NOTE: {k_note}\n")

    head = ["adapter", "config", "B", "peer", "guidekit", "peer ms/run", "guidekit ms/run",
            "guidekit/peer", "forwards (rows) per run: peer / guidekit", "max |diff|"]
    table = [
        [r["adapter"], r["config"], str(r["B"]), r["peer"], r["guidekit"], f"{r['peer_ms']:.1f}",
         f"{r['mine_ms']:.1f}", f"{r['ratio']:.2f} ± {r['spread']:.2f}", r["calls"],
         f"{r['diff']:.1e}"]
        for r in rows
    ]
    print(bench.text_table(head, table))
    session.finish(
        [bench.markdown(head, table)],
        notes=[versions, f"{args.steps} steps per run, {repeats} interleaved repeats"],
    )


if __name__ == "__main__":
    main()
