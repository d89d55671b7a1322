"""A guided denoiser for every sampler of k-diffusion (``k_diffusion.sampling``).

k-diffusion's samplers call ``model(x, sigma, **extra_args)`` with ``sigma`` a ``[B]`` tensor
of one noise level and expect the denoised ``x0`` back, in the VE convention
``x = x0 + sigma n`` (https://github.com/crowsonkb/k-diffusion). :class:`KDiffusionGuided`
is such a callable; it never imports k-diffusion. Per call it runs ``Plan.step`` once
(one batched model call per forward group) and returns the guided prediction as ``x0``.

What it wraps (``prediction=``):

* ``"x0"`` (default): a k-diffusion denoiser ``den(x, sigma, **cond) -> x0`` -- k-diffusion's
  own ``DiscreteEpsDDPMDenoiser``, ``VDenoiser``, ``CompVisDenoiser``, or any function of that
  form. guidekit's model-space parts (``Rescale``, ``CFGZeroStar``, ``TCFG``) then act on x0.
* ``"eps"`` / ``"v"``: a raw network ``net(x * c_in, time, **cond)`` that predicts the
  noise, or v (as k-diffusion's ``VDenoiser``/``DiscreteVDDPMDenoiser`` define it, with
  ``sigma_data = 1``). ``c_in = 1 / sqrt(sigma^2 + 1)``; ``time`` is the DDPM timestep
  interpolated in log sigma when ``alphas_cumprod`` is given (k-diffusion's
  ``DiscreteSchedule.sigma_to_t``), ``timestep(sigma)`` when given, else ``sigma``.
  guidekit then sees the model's own space.

Conditionings: ``cond=``/``uncond=`` (and ``conds=`` for other names) at construction,
and/or the sampler's ``extra_args`` with the same names; per call, ``extra_args`` win.
A bare tensor stands for ``{cond_key: tensor}``.

Steps: pass the sampler's ``sigmas`` so that state (APG momentum, CADS's step) advances once
per step although heun, dpm_2, dpm_2_ancestral, dpmpp_2s_ancestral and dpmpp_sde evaluate the
model twice per step (see :mod:`guidekit.state`). ``sample_dpm_fast`` and
``sample_dpm_adaptive`` have no schedule: leave ``sigmas`` out and every model evaluation at
a new, lower noise level is a step; when ``dpm_adaptive`` rejects a trial step and evaluates
again at its start, the state returns to what it was before that level was first evaluated
(the rejected trial's evaluations are forgotten).

Sampling: ``sample_euler(guided, x, sigmas)`` as with any denoiser, or
``guided.sample(sample_euler, x, sigmas, ...)``, a new run on the call's ``sigmas`` that for
``CFGpp`` (CFG++) reads the sampler and its ``eta`` from the call itself
(``adapters/_kdiffusion_sample.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

import guidekit
from guidekit.checks import check_first_level
from guidekit.errors import GuidanceTypeError, GuidanceValueError
from guidekit.finite import check_policy
from guidekit.renoise import sampler_term

from ._kdiffusion_sample import bind, cfgpp_settings, function_name, off_schedule, sampler_sigmas
from ._renoise import renoised, renoiser
from ._sampling import ModelFn, SamplerAdapter, as_plan, level_of

_KINDS = ("x0", "eps", "v")
CHURN = (
    "Either the sampler churns (s_churn > 0 in sample_euler, sample_heun, sample_dpm_2 raises "
    "each step's level by (1 + gamma) before calling the model, so the first call is off the "
    "schedule): sample with s_churn=0, or, for sample_euler (one call per step), leave sigmas= "
    "out so that every call is a step"
)


def discrete_timestep(
    sigma: torch.Tensor, alphas_cumprod: Any, quantize: bool = False
) -> torch.Tensor:
    """The DDPM timestep of noise level ``sigma`` for a model trained on ``alphas_cumprod``.

    ``sigma_t = sqrt((1 - abar_t) / abar_t)``; between two table entries ``t`` is
    interpolated linearly in ``log sigma`` and clamped to ``[0, T - 1]`` (the mapping of
    k-diffusion's ``DiscreteSchedule``). ``quantize`` rounds to the nearest entry (an int64
    tensor, as DDPM timesteps are).
    """
    noise = guidekit.Noise("ve", alphas_cumprod=alphas_cumprod)
    last = torch.as_tensor(alphas_cumprod).numel() - 1
    # guidekit.Noise.t is this interpolation as a fraction of the table (CADS's time)
    values = [noise.t(float(s)) * last for s in sigma.detach().flatten().tolist()]
    t = torch.tensor(values, dtype=torch.float64, device=sigma.device).view(sigma.shape)
    if quantize:
        return t.round().long()
    return t.to(sigma.dtype if sigma.is_floating_point() else torch.float32)


def _alphas_from(model: Any) -> torch.Tensor | None:
    """``alphas_cumprod`` of a k-diffusion ``DiscreteSchedule`` denoiser, read from its
    ``sigmas`` table (duck-typed: no k-diffusion import)."""
    table = getattr(model, "sigmas", None)
    if isinstance(table, torch.Tensor) and table.ndim == 1 and table.numel() > 1:
        table = table.detach().double().cpu()
        return 1.0 / (1.0 + table**2)
    return None


class KDiffusionGuided(SamplerAdapter):
    """A k-diffusion denoiser ``(x, sigma, **extra_args) -> x0`` running a guidance plan.

    Args:
        guidance: an expression (``CFG(7) | APG(eta=0)``), guidance text, or a plan compiled
            with ``prediction=`` this adapter's ``prediction`` and ``noise="ve"``.
        model: the main model (see the module docstring for ``prediction``).
        prediction: ``"x0"`` for a k-diffusion denoiser, ``"eps"`` or ``"v"`` for a raw net.
        cond, uncond, conds: conditionings (dicts of the model's keyword tensors, batch
            first, or one tensor passed as ``cond_key``); ``conds`` names the others an
            expression reads (``conds={"neg": ...}`` for ``CFG(7, negative="neg")``);
            ``extra_args`` of the same names replace them per call.
        models: other models by name (``{"weak": ...}`` for Autoguidance), of the same kind
            as ``model`` and translated the same way.
        sigmas: the sampler's schedule; leave out for ``dpm_fast`` / ``dpm_adaptive``.
        seed: seeds CADS's noise.
        max_rows: row budget passed to :func:`guidekit.compile`.
        alphas_cumprod: the model's DDPM training schedule: raw nets then receive DDPM
            timesteps, and CADS's time is read from it. Taken from a ``DiscreteSchedule``
            denoiser's ``sigmas`` when not given.
        timestep: ``sigma_rows -> time`` for raw nets trained on another time variable.
        quantize: round DDPM timesteps to integers (raw nets with ``alphas_cumprod``).
        scale_input: multiply a raw net's input by ``c_in`` (default: ``True`` for raw nets).
        cond_key: the keyword a bare conditioning tensor is passed as.
        around_call: the attention engine's hook, for plans with attention-space terms
            (PAG, ...): ``with guidekit.attention.install(net, plan) as around_call:``;
            compile the plan yourself then (the engine needs it) and pass it as ``guidance``.
        nonfinite: ``"raise"`` (default) stops at the first NaN/inf in a model output or the
            guided output with a :class:`~guidekit.errors.NonFiniteError` naming the step,
            sigma, branch and terms; ``"warn"`` warns once per run and goes on.
        tokens: :class:`guidekit.Tokens` -- how conditionings of different token lengths
            share one call (padded under the model's mask, or repeated); by default they
            run as separate calls.
        sampler, eta: for ``CFGpp`` (CFG++) called by the sampler directly, the sampler you
            call -- ``"euler"`` (``sample_euler``, ``s_churn=0``), ``"euler_ancestral"``
            (``eta=`` required: the one you pass the sampler) or ``"dpmpp_2m"`` -- which the
            adapter's prediction makes take CFG++ steps (see ``adapters/_renoise.py``);
            CFGpp needs ``sigmas=`` too. Leave both out and sample through :meth:`sample`,
            which reads them from the call. Other samplers are refused for CFGpp; without
            CFGpp these are not used.
    """

    def __init__(
        self,
        guidance: Any,
        model: ModelFn,
        *,
        prediction: str = "x0",
        cond: Any = None,
        uncond: Any = None,
        conds: Mapping[str, Any] | None = None,
        models: Mapping[str, ModelFn] | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        seed: int = 0,
        max_rows: int | str | None = None,
        alphas_cumprod: Any = None,
        timestep: Callable[[torch.Tensor], torch.Tensor] | None = None,
        quantize: bool = False,
        scale_input: bool | None = None,
        cond_key: str = "cond",
        around_call: Any = None,
        nonfinite: str = "raise",
        tokens: Any = None,
        sampler: str | None = None,
        eta: float | None = None,
    ) -> None:
        if prediction not in _KINDS:
            raise GuidanceValueError(
                f"KDiffusionGuided(prediction={prediction!r}): use 'x0' for a k-diffusion "
                f"denoiser (returns x0), 'eps' or 'v' for a raw network"
            )
        raw = prediction != "x0"
        if not raw and (timestep is not None or scale_input or quantize):
            raise GuidanceValueError(
                "KDiffusionGuided: timestep=, quantize= and scale_input= describe a raw network; "
                "a k-diffusion denoiser (prediction='x0') scales its own input. Pass "
                "prediction='eps' or 'v' with the raw network instead"
            )
        if timestep is not None and alphas_cumprod is not None:
            raise GuidanceValueError(
                "KDiffusionGuided: give timestep= or alphas_cumprod= (DDPM timesteps), not both"
            )
        if alphas_cumprod is None and not raw:
            alphas_cumprod = _alphas_from(model)
        self.prediction = prediction
        self.alphas_cumprod = alphas_cumprod
        self.timestep = timestep
        self.quantize = quantize
        self.scale_input = raw if scale_input is None else scale_input
        noise = guidekit.Noise("ve", alphas_cumprod=alphas_cumprod)
        plan = as_plan(
            guidance, prediction=prediction, noise=noise, max_rows=max_rows,
            adapter="KDiffusionGuided",
        )
        self._start_run(
            plan, model, models, {"cond": cond, "uncond": uncond, **(conds or {})},
            sigmas=sigmas, seed=seed, cond_key=cond_key, adapter="KDiffusionGuided",
            around_call=around_call, nonfinite=check_policy(nonfinite, "KDiffusionGuided"),
            tokens=tokens,
        )
        self._declared = (sampler, eta)
        # CFG++ without sampler=: the step is read from sample()'s call; a direct call refuses
        self._unstepped = sampler is None and eta is None and sampler_term(plan.expr) is not None
        if not self._unstepped:
            self._renoise = renoiser(plan, sampler, sigmas, "KDiffusionGuided", eta=eta)

    # -- translation ------------------------------------------------------------------------
    def _time(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.timestep is not None:
            return self.timestep(sigma)
        if self.alphas_cumprod is not None:
            return discrete_timestep(sigma, self.alphas_cumprod, self.quantize)
        return sigma

    def _translate(self, model: ModelFn) -> ModelFn:
        if not callable(model):
            raise GuidanceTypeError(
                f"KDiffusionGuided: models must be callables, got {type(model).__name__}"
            )
        if self.prediction == "x0":
            return model  # already k-diffusion's contract: (x, sigma, **cond) -> x0

        def net(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
            if self.scale_input:
                c_in = (sigma**2 + 1).rsqrt().view(-1, *([1] * (x.ndim - 1)))
                x = x * c_in
            return model(x, self._time(sigma), **cond)

        return net

    # -- the k-diffusion contract ----------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma: Any, **extra_args: Any) -> torch.Tensor:
        """The guided ``x0`` at ``(x, sigma)``; ``extra_args`` name conditionings."""
        if self.run.state.level_sigma is None and self.run.state.schedule is not None:
            check_first_level(level_of(sigma), self.run.state.schedule, "KDiffusionGuided", CHURN)
            self._check_sampler(self.run.state.schedule)
        if self._renoise is None:
            if self._unstepped:
                raise GuidanceValueError(
                    f"KDiffusionGuided: {self.plan.expr!r} re-noises inside the sampler's step, "
                    f"which this call does not say: sample through guided.sample(k_diffusion."
                    f"sampling.sample_euler, x, sigmas, ...) (it reads the sampler and its eta), "
                    f"or pass sampler= ('euler' | 'euler_ancestral' with eta= | 'dpmpp_2m') and "
                    f"sigmas= when building the adapter"
                )
            return self.run(x, sigma, extra_args, output="x0")
        return renoised(
            self._renoise, lambda keep: self.run(x, sigma, extra_args, "x0", keep),
            x, level_of(sigma), "x0",
        )

    def _check_sampler(self, schedule: tuple[float, ...]) -> None:
        """At a run's first call: refuse a schedule the calling k-diffusion sampler does not
        step on (its levels read from the sampler's frame, see ``sampler_sigmas``)."""
        found = sampler_sigmas()
        if found is None:
            return
        name, levels = found
        extra = off_schedule(levels, schedule)
        if not extra:
            return
        shown = ", ".join(f"{s:.4g}" for s in extra[:4]) + (", ..." if len(extra) > 4 else "")
        raise GuidanceValueError(
            f"KDiffusionGuided: {name} steps on {len(levels)} sigmas, but {len(extra)} of its "
            f"levels ({shown}) are not in the schedule the adapter was given ({len(schedule)} "
            f"levels as sigmas=): they would read as midpoints of a step and guidance state "
            f"(APG momentum, EMAG, CADS, gates) would advance on the wrong steps. Give the "
            f"adapter the sampler's own sigmas (KDiffusionGuided(..., sigmas=sigmas)), or "
            f"sample through guided.sample({name}, x, sigmas), which reads them from the call"
        )

    def sample(self, fn: Callable[..., Any], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``fn(self, x, *args, **kwargs)`` -- a ``k_diffusion.sampling`` sampler -- as a new
        run on the call's ``sigmas``.

        For ``CFGpp`` the sampler and its ``eta`` are read from the call (the arguments
        given, else ``fn``'s defaults; see ``adapters/_kdiffusion_sample.py``), so the
        re-noising always matches the step the sampler takes; a function or setting that is
        no CFG++ step (``sample_heun``, ``s_churn > 0``) is refused by name.
        """
        call = bind(fn, self, x, args, kwargs)
        sigmas = call.get("sigmas")
        term = sampler_term(self.plan.expr)
        own, self._renoise = self._renoise, None
        try:
            self.reset(sigmas=sigmas)
            if term is not None:
                sampler, eta = cfgpp_settings(fn, call, term)
                if self._declared != (None, None) and self._declared != (sampler, eta):
                    raise GuidanceValueError(
                        f"KDiffusionGuided.sample({function_name(fn)}, ...): the adapter was "
                        f"built with sampler={self._declared[0]!r}, eta={self._declared[1]!r} "
                        f"but this call steps sampler={sampler!r}, eta={eta!r}; leave "
                        f"sampler= and eta= out of the adapter: sample() reads them from the call"
                    )
                where = f"KDiffusionGuided.sample({function_name(fn)}, ...)"
                self._renoise = renoiser(self.plan, sampler, sigmas, where, eta=eta)
            return fn(self, x, *args, **kwargs)
        finally:
            self._renoise = own

    def __repr__(self) -> str:
        return f"<KDiffusionGuided {self.plan.expr!r}, model predicts {self.prediction}>"


__all__ = ["KDiffusionGuided", "discrete_timestep"]
