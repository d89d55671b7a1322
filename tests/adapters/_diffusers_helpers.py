"""Shared set-up of the tests of guidekit.adapters.diffusers on tiny real pipelines.

The tiny pipelines (DiT, PixArt-alpha, SD3, Flux, Stable Diffusion; float64) as module-scoped
fixtures, their call arguments, a forward counter, snapshots of what a run may leave behind,
and the hand-written sampling loops (``Setup``) the adapter's results are checked against.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

import guidekit as gk

# the builders of tiny components live next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402

F64 = torch.float64
STEPS = 3
W = 4.0
# Different token lengths on purpose: the pipelines pad every prompt (and the empty negative
# prompt) to the tokenizer's max length, so cond and uncond rows share one batch.
PROMPTS = ["a cat", "a photo of a big dog on the grass"]
KINDS = ["dit", "pixart", "sd3", "flux", "sd"]


@pytest.fixture(scope="module", autouse=True)
def _quiet_single_thread() -> Iterator[None]:
    """One thread (tiny models run slower with more on a shared machine) and quiet logs."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    threads, dv, tv = torch.get_num_threads(), dlog.get_verbosity(), tlog.get_verbosity()
    torch.set_num_threads(1)
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    dlog.set_verbosity(dv)
    tlog.set_verbosity(tv)


_BUILD: dict[str, Callable[[], Any]] = {
    "dit": tiny.dit_pipeline, "pixart": tiny.pixart_pipeline, "sd3": tiny.sd3_pipeline,
    "flux": tiny.flux_pipeline, "sd": tiny.sd_pipeline,
}
_WEAK: dict[str, Callable[..., Any]] = {
    "dit": tiny.dit_transformer, "pixart": tiny.pixart_transformer,
    "sd3": tiny.sd3_transformer, "flux": tiny.flux_transformer, "sd": tiny.unet,
}
# The first submodule each denoiser runs on its input: a pre-hook there counts real forwards.
_ENTRY = {"dit": "pos_embed", "pixart": "pos_embed", "sd3": "pos_embed", "flux": "x_embedder",
          "sd": "conv_in"}


@pytest.fixture(scope="module")
def pipes() -> Callable[[str], Any]:
    """Each tiny pipeline (float64), built once per module on first use."""
    cache: dict[str, Any] = {}

    def get(kind: str) -> Any:
        if kind not in cache:
            cache[kind] = _BUILD[kind]().to(F64)
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def weak_models() -> Callable[[str], Any]:
    """A second tiny denoiser per kind (another seed): Autoguidance's weak model."""
    cache: dict[str, Any] = {}

    def get(kind: str) -> Any:
        if kind not in cache:
            cache[kind] = _WEAK[kind](seed=7).to(F64)
        return cache[kind]

    return get


def call_kwargs(kind: str, scale: float = W) -> dict[str, Any]:
    common = {"height": 16, "width": 16, "output_type": "latent"}
    if kind == "dit":
        return {"class_labels": [0, 1], "guidance_scale": scale, "output_type": "pt"}
    if kind == "pixart":
        return {**common, "prompt": PROMPTS, "guidance_scale": scale, "max_sequence_length": 16,
                "use_resolution_binning": False, "clean_caption": False}
    if kind == "sd3":
        return {**common, "prompt": PROMPTS, "guidance_scale": scale, "max_sequence_length": 16}
    if kind == "flux":
        negative = ["", ""] if scale > 1 else None
        return {**common, "prompt": PROMPTS, "negative_prompt": negative,
                "true_cfg_scale": scale, "max_sequence_length": 16}
    return {**common, "prompt": PROMPTS, "guidance_scale": scale}


def sample(pipe: Any, **kwargs: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.as_tensor(pipe(generator=gen, num_inference_steps=STEPS, **kwargs).images)


def denoiser(pipe: Any) -> torch.nn.Module:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


@contextlib.contextmanager
def forwards(kind: str, **modules: torch.nn.Module) -> Iterator[list[tuple[str, int]]]:
    """Log ``(name, rows)`` for every real forward of the named denoisers."""
    log: list[tuple[str, int]] = []
    handles = [
        getattr(m, _ENTRY[kind]).register_forward_pre_hook(
            lambda _m, args, name=name: log.append((name, int(args[0].shape[0])))
        )
        for name, m in modules.items()
    ]
    try:
        yield log
    finally:
        for h in handles:
            h.remove()


def snapshot(obj: Any) -> dict[str, int]:
    """The object's instance attributes by identity: equal snapshots mean nothing was left."""
    return {k: id(v) for k, v in vars(obj).items()}


def pipe_untouched(pipe: Any, before: dict[str, int]) -> bool:
    """No attribute added to or left on the pipeline (a run re-sets some of its own values)."""
    patched = {"prepare_latents", "encode_prompt"}
    return set(vars(pipe)) == set(before) and not patched & set(vars(pipe))


def _guide_loop(
    plan: gk.Plan, scheduler: Any, x: torch.Tensor, make_model: Callable[[Any], Any],
    cond: dict[str, Any], uncond: dict[str, Any], weak: Any, sigma_of: Callable[[int, Any], float],
    around_call: Any = None, seed: int = 0, conds: dict[str, Any] | None = None,
    sigmas: Any = None,
) -> torch.Tensor:
    """A diffusers-style loop: scale the input, guide with ``guidekit.guide``, step.

    ``now`` (shared with the models) holds the current timestep ``t`` and step index ``i``;
    ``conds`` are named conditionings, ``sigmas`` the run's schedule (progress shapes).
    """
    now: dict[str, Any] = {}
    extra = {"conds": conds} if conds else {}
    guided_model = gk.guide(
        plan, make_model(None, now), cond=cond, uncond=uncond,
        models={"weak": make_model(weak, now)}, around_call=around_call, seed=seed,
        sigmas=sigmas, **extra,
    )
    for i, t in enumerate(scheduler.timesteps):
        now["t"], now["i"] = t, i
        scale = getattr(scheduler, "scale_model_input", None)  # flow schedulers have none
        inp = scale(x, t) if scale is not None else x
        pred = guided_model(inp, sigma_of(i, t))
        x = scheduler.step(pred, t, x).prev_sample
    return x


# -- reference set-ups: each pipeline on fixed inputs, and the same sampling by hand ----------


@attrs.frozen
class Setup:
    """One pipeline call on fixed inputs and the pieces of a hand-written loop that repeats it.

    ``kwargs``: the pipeline call (``sample(pipe, **kwargs)``); ``cond`` / ``uncond``: the
    denoiser's conditionings; ``make(net, now)``: the denoiser as a guidekit model;
    ``sigma_of(i, t)``: the noise level of step ``i``; ``finish``: what the pipeline does to
    the final latents; ``scheduler``: a fresh copy with the run's timesteps.
    """

    kwargs: dict[str, Any]
    latents: torch.Tensor
    cond: dict[str, Any]
    uncond: dict[str, Any]
    make: Callable[[Any, dict[str, Any]], Any]
    sigma_of: Callable[[int, Any], float]
    scheduler: Any
    prediction: str
    noise: Any
    finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    def compile(self, expr: Any) -> gk.Plan:
        return gk.compile(expr, prediction=self.prediction, noise=self.noise)

    def loop(
        self, plan: gk.Plan, around_call: Any = None, weak: Any = None, seed: int = 0,
        conds: dict[str, Any] | None = None, sigmas: Any = None,
    ) -> torch.Tensor:
        x = _guide_loop(
            plan, self.scheduler, self.latents, self.make, self.cond, self.uncond, weak,
            self.sigma_of, around_call=around_call, seed=seed, conds=conds, sigmas=sigmas,
        )
        return self.finish(x)


def setup_for(kind: str, pipe: Any) -> Setup:
    """The embeddings path of ``kind``'s pipeline (DiT: its class labels), latents fixed."""
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = copy.deepcopy(pipe.scheduler)  # from_config would drop defaulted settings
    scheduler.set_timesteps(STEPS)
    abar = scheduler.alphas_cumprod.double() if hasattr(scheduler, "alphas_cumprod") else None
    # the scheduler's own table, as guided(...) reads it (CADS's time comes from it)
    vp = gk.Noise("vp", alphas_cumprod=scheduler.alphas_cumprod) if abar is not None else None
    net = denoiser(pipe)
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    common = {"latents": lat, "height": 16, "width": 16, "output_type": "latent",
              "guidance_scale": W}

    def ddpm_sigma(i: int, t: Any) -> float:
        return float(((1 - abar[int(t)]) / abar[int(t)]).sqrt())

    if kind == "dit":  # the pipeline draws its latents from the generator: the same draw
        lat = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(0), dtype=F64)
        labels = torch.tensor([0, 1])

        def make_dit(module: Any, now: dict[str, Any]) -> Any:
            m = module if module is not None else net

            def model(x: torch.Tensor, sigma: torch.Tensor, class_labels: Any) -> torch.Tensor:
                return m(x, timestep=now["t"].expand(x.shape[0]), class_labels=class_labels).sample[:, :4]

            return model

        def decode(x: torch.Tensor) -> torch.Tensor:
            return (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

        return Setup(call_kwargs("dit"), lat, {"class_labels": labels},
                     {"class_labels": torch.full_like(labels, 1000)}, make_dit, ddpm_sigma,
                     scheduler, "eps", vp, decode)
    if kind == "pixart":
        pe, pm, npe, nm = pipe.encode_prompt(
            PROMPTS, True, negative_prompt="", device="cpu", max_sequence_length=16
        )

        def make_pixart(module: Any, now: dict[str, Any]) -> Any:
            m = module if module is not None else net

            def model(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
                return m(x, timestep=now["t"].expand(x.shape[0]), return_dict=False,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                         **cond)[0][:, :4]  # eps channels (learned sigma)

            return model

        kwargs = {**common, "prompt_embeds": pe, "prompt_attention_mask": pm,
                  "negative_prompt": None, "negative_prompt_embeds": npe,
                  "negative_prompt_attention_mask": nm, "use_resolution_binning": False}
        return Setup(kwargs, lat, {"encoder_hidden_states": pe, "encoder_attention_mask": pm},
                     {"encoder_hidden_states": npe, "encoder_attention_mask": nm},
                     make_pixart, lambda i, t: float(scheduler.sigmas[i]), scheduler, "eps", vp)
    if kind == "sd":
        pe, npe = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)

        def make_sd(module: Any, now: dict[str, Any]) -> Any:
            m = module if module is not None else net

            def model(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
                return m(x, now["t"], **cond).sample

            return model

        kwargs = {**common, "prompt_embeds": pe, "negative_prompt_embeds": npe}
        return Setup(kwargs, lat * scheduler.init_noise_sigma, {"encoder_hidden_states": pe},
                     {"encoder_hidden_states": npe}, make_sd, ddpm_sigma, scheduler, "eps", vp)
    assert kind == "sd3"
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, negative_prompt=["", ""],
        do_classifier_free_guidance=True, max_sequence_length=16,
    )

    def make_sd3(module: Any, now: dict[str, Any]) -> Any:
        m = module if module is not None else net

        def model(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
            return m(hidden_states=x, timestep=now["t"].expand(x.shape[0]), return_dict=False,
                     **cond)[0]

        return model

    kwargs = {**common, "prompt_embeds": pe, "negative_prompt_embeds": npe,
              "pooled_prompt_embeds": ppe, "negative_pooled_prompt_embeds": nppe}
    return Setup(kwargs, lat, {"encoder_hidden_states": pe, "pooled_projections": ppe},
                 {"encoder_hidden_states": npe, "pooled_projections": nppe}, make_sd3,
                 lambda i, t: float(t) / 1000.0, scheduler, "flow", "flow")


def text_inputs(kind: str, pipe: Any, texts: list[str], length: int = 16) -> dict[str, torch.Tensor]:
    """The denoiser inputs of ``texts`` (one row each), encoded as the pipeline does, without
    CFG; ``length``: the T5 tokens of PixArt and SD3 (``max_sequence_length``)."""
    if kind == "sd":
        pe, _ = pipe.encode_prompt(texts, "cpu", 1, False)
        return {"encoder_hidden_states": pe}
    if kind == "pixart":
        pe, pm, _, _ = pipe.encode_prompt(texts, False, device="cpu", max_sequence_length=length)
        return {"encoder_hidden_states": pe, "encoder_attention_mask": pm}
    pe, _, ppe, _ = pipe.encode_prompt(
        prompt=texts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=length,
    )
    return {"encoder_hidden_states": pe, "pooled_projections": ppe}


# -- the modular SD3 denoise step (tests of the guider=) ------------------------------------------


@torch.no_grad()
def modular_sd3_case(texts: list[str]) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    """The tiny SD3 pipeline and its modular denoise step's inputs (``_modular_sd3.sd3_setup``)
    with the guider inputs of ``texts`` (``encoder_hidden_states``, ``text_embeds``), encoded
    by the pipeline."""
    from _modular_sd3 import sd3_setup

    pipe, inputs = sd3_setup()
    other, _, pooled, _ = pipe.encode_prompt(
        prompt=texts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=16,
    )
    return pipe, inputs, {"encoder_hidden_states": other, "text_embeds": pooled}


def modular_sd3(pipe: Any, guider: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The latents of a modular SD3 denoise step on ``pipe``'s components with ``guider``."""
    from _modular_sd3 import sd3_modular

    out: torch.Tensor = sd3_modular(pipe, guider)(output="latents", **inputs)
    return out


def attention_state(module: torch.nn.Module) -> dict[str, Any]:
    """Every attention processor, instance ``forward`` and hook of ``module``, by identity:
    equal snapshots mean the attention engine left nothing behind."""
    out: dict[str, Any] = {}
    for path, m in module.named_modules():
        if hasattr(m, "processor"):
            out[f"{path}.processor"] = id(m.processor)
        if "forward" in vars(m):
            out[f"{path}.forward"] = id(vars(m)["forward"])
        hooks = (m._forward_hooks, m._forward_pre_hooks)
        if any(hooks):
            out[f"{path}.hooks"] = tuple(tuple(h) for h in hooks)
    return out
