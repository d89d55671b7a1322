"""``GuidekitGuidance``: a guidekit expression as a diffusers ``guider=`` component.

diffusers' modular pipelines run their denoise loop against the ``BaseGuidance`` contract:

1. ``guider.set_state(step, num_inference_steps, timestep)`` once per step;
2. ``batches = guider.prepare_inputs({"name": (cond_value, uncond_value), ...})``;
3. for each batch: ``guider.prepare_models(model)``; ``batch.noise_pred = model(...)``;
   ``guider.cleanup_models(model)``;
4. ``guider(batches)`` -> ``GuiderOutput(pred, pred_cond, pred_uncond)``.

This guider answers that contract from a compiled plan: one batch per branch the plan needs
at this noise level (``cond``, ``uncond``, a weak model's ``cond`` ...), or, with
``batched=True``, one batch per forward group with the branches' rows concatenated (for
loops that pass the latents through the guider, as the SD3 blocks do). Batches of another
model (Autoguidance's weak model) run on that model: ``prepare_models`` points the loop's
denoiser at it for that batch and ``cleanup_models`` undoes it.

The run's state (APG momentum, CADS's step) lives on a :class:`guidekit.run.Run`: each
pipeline call (step 0) starts a fresh run, and so does a level above the last one. CFG++
returns the prediction the loop's scheduler steps into a CFG++ step
(``adapters/_diffusers_guider_renoise.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict, register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from guidekit import GuidanceTypeError, GuidanceValueError, Noise, compile, parse
from guidekit.branch import COND, MAIN, UNCOND, Branch
from guidekit.compiled import call_slot, swap
from guidekit.expr import Expr
from guidekit.plan import ForwardGroup, Plan, RowLayout
from guidekit.run import Run
from guidekit.state import ForwardState

from . import _diffusers_guider_batches as batches_
from ._diffusers_cads import for_guider as cads_for_guider
from ._diffusers_guider_args import (
    cfg_scale,
    check_guidance_scale,
    check_models,
    refuse_setting,
    refuse_unknown,
    run_conditions,
    with_rescale,
)
from ._diffusers_guider_attention import (
    attention_models,
    engine_for,
    enter_engine,
    refuse_unsupported,
)
from ._diffusers_guider_level import needs_x, step_level
from ._diffusers_guider_renoise import check_window, guider_renoiser
from ._diffusers_guider_rows import tile_inputs
from ._diffusers_guider_state import combine
from ._diffusers_pools import plan_pools
from ._diffusers_prompts import named_conds
from ._diffusers_schedule import conventions, schedule_of

LATENT_KEYS = batches_.LATENT_KEYS
_DDPM_FALLBACK = Noise("vp")


class GuidekitGuidance(BaseGuidance):
    """Any guidekit expression as a modular pipeline's ``guider``.

    Args:
        expression: the guidance, as text (``"CFG(5) + Autoguidance(1) | APG(eta=0)"``) or an
            expression object (stored as its text, so the config saves and loads).
        prediction, noise: the model's conventions; by default read from the scheduler given
            to :meth:`attach`, else ``"eps"`` / ``"vp"``.
        seed: seeds CADS.
        batched: one batch per forward group (rows concatenated) instead of one per branch.
        latent_key: the guider input that holds the latents (default: the first of
            ``hidden_states``, ``latents``, ``sample``, ``x`` present); needed only when the
            expression converts between spaces (APG, for example).
        start, stop, enabled: diffusers' step-fraction window: outside it, or when disabled,
            the guider runs only the conditional batch and returns it.
        guidance_scale: as in diffusers' guiders, accepted where it equals the expression's
            CFG scale (a different one is refused: write it in the expression).
        guidance_rescale: ``phi > 0`` pipes the expression into ``Rescale(phi)``.

    Call :meth:`attach` with the pipeline's scheduler (exact noise levels: needed for
    intervals, APG and CADS) and any extra models (``weak=...``) before running.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]  # type: ignore[assignment]

    @register_to_config
    def __init__(
        self,
        expression: Any = "CFG(7.5)",
        prediction: str | None = None,
        noise: str | None = None,
        seed: int = 0,
        batched: bool = False,
        latent_key: str | None = None,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
    ) -> None:
        expr: Any
        if isinstance(expression, str):
            expr = parse(expression)
        elif isinstance(expression, Expr):
            expr = expression
        else:
            raise GuidanceTypeError(
                f"GuidekitGuidance(expression=...) takes a guidance expression or its text, "
                f"got {type(expression).__name__}"
            )
        # The config holds the expression as text (a saved guider is read back with
        # guidekit.parse) and every value as given: register_to_config marks positional
        # arguments as unused defaults, which from_config / new() would then drop.
        config = {k: v for k, v in self._internal_dict.items() if k != "_use_default_values"}
        config.update(
            expression=repr(expr), prediction=prediction, noise=noise, seed=seed,
            batched=batched, latent_key=latent_key, start=start, stop=stop, enabled=enabled,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
        )
        self._internal_dict = FrozenDict(config)
        self._given = expr
        self._expr = with_rescale(expr, guidance_rescale)
        self._guidance_scale = guidance_scale
        self._prediction = prediction
        self._noise = noise
        self._seed = seed
        self._batched = batched
        self._latent_key = latent_key
        self._scheduler: Any = None
        self._models: dict[str, Callable[..., Any]] = {}
        self._around_call: Any = None
        self._plan = self._compile()
        check_window(self._plan, start, stop)
        self._run = Run(self._plan, seed=seed, on_rise="restart")
        self._eta: float | None = None  # DDIM's, as attach(eta=) states it (CFG++)
        self._renoise: Any = None  # CFG++ stepping, per pipeline call
        self._input_predictions = [batches_.identifier(b) for b in self._plan.branches]
        super().__init__(start, stop, enabled)
        self._sigma: float | None = None
        self._ended = False  # the last step's combine ran: a pipeline call may start anew
        self._batches: list[batches_.Unit] = []
        self._x: torch.Tensor | None = None
        self._conds: dict[str, dict[str, Any]] = {}
        self._named: dict[str, dict[str, Any]] = {}  # attach(conds=...)
        self._forward_state: ForwardState | None = None
        self._undo: list[Callable[[], None]] = []
        self._entered: Any = None
        self._engines: dict[tuple[str, int, int], Any] = {}

    @classmethod
    def from_config(  # type: ignore[override]
        cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        """diffusers' ``from_config`` (and so ``new`` and ``from_pretrained``), refusing the
        settings this guider does not take instead of dropping them."""
        refuse_unknown(cls, [*(config if isinstance(config, Mapping) else {}), *kwargs])
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # -- set-up -------------------------------------------------------------------------------------
    def _compile(self) -> Plan:
        pred, noise = ("eps", _DDPM_FALLBACK)
        if self._scheduler is not None:
            pred, noise = conventions(self._scheduler)
        plan = compile(
            self._expr,
            prediction=self._prediction or pred,
            noise=self._noise if self._noise is not None else noise,
        )
        check_guidance_scale(plan, self._guidance_scale, repr(self._given))
        refuse_unsupported(plan)
        return plan

    @property
    def plan(self) -> Plan:
        """The compiled plan (recompiled by :meth:`attach` when a scheduler is given)."""
        return self._plan

    @property
    def run(self) -> Run:
        """The current pipeline call's run: its state (``run.state.named()``) and steps."""
        return self._run

    @property
    def guidance_scale(self) -> float:
        """The expression's CFG scale, as diffusers' guiders expose theirs (the SDXL blocks
        read it for a UNet with a guidance embedding)."""
        w = cfg_scale(self._plan)
        if w is None:
            raise GuidanceValueError(
                f"{self._expr!r} has no one CFG scale (it changes with the noise level), which "
                f"this pipeline reads as guider.guidance_scale: use an ungated CFG term"
            )
        return w

    @guidance_scale.setter
    def guidance_scale(self, value: float) -> None:
        if value != cfg_scale(self._plan):
            raise refuse_setting("guidance_scale", value, "guider.new(expression=...)")

    @property
    def guidance_rescale(self) -> float:
        """The ``Rescale`` phi added by ``guidance_rescale`` (0: none)."""
        return float(self.config["guidance_rescale"])

    @guidance_rescale.setter
    def guidance_rescale(self, value: float) -> None:
        if value != self.guidance_rescale:
            raise refuse_setting("guidance_rescale", value, f"guider.new(guidance_rescale={value!r})")

    def attach(
        self,
        scheduler: Any = None,
        models: Mapping[str, Callable[..., Any]] | None = None,
        around_call: Any = None,
        conds: Mapping[str, Mapping[str, Any]] | None = None,
        eta: float | None = None,
        **named_models: Callable[..., Any],
    ) -> GuidekitGuidance:
        """Bind run-time objects the config cannot hold; returns the guider.

        ``scheduler`` gives the prediction/noise conventions and maps timesteps to sigma;
        ``models`` (or keywords such as ``weak=small_transformer``) are the extra models the
        expression names; ``around_call`` is passed the row layout of each batch; ``conds``
        the named conditionings the expression reads (``Cond("style")``, ``CFG(7,
        negative="neg")``), each a dict keyed by the loop's guider inputs, e.g.
        ``{"neg": {"encoder_hidden_states": e, "text_embeds": pooled}}`` (inputs the loop
        passes alike for cond and uncond, such as time ids, may be left out). ``eta`` states
        the loop's DDIM eta, which CFG++ under ``DDIMScheduler`` needs (only 0 is supported).
        """
        self._eta = self._eta if eta is None else float(eta)
        if conds is not None:
            reads, pools = named_conds(self._plan), plan_pools(self._plan)
            self._named.update(batches_.check_named(conds, reads, repr(self._expr), pools))
        if scheduler is not None:
            self._scheduler = scheduler
            self._plan = self._compile()
            self._run = Run(self._plan, seed=self._seed, on_rise="restart")
        self._models.update(check_models(self._plan, {**(models or {}), **named_models}))
        if around_call is not None:
            self._around_call = around_call
        return self

    # -- the BaseGuidance contract ------------------------------------------------------------------
    def _active(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None or self._step is None:
            return True
        lo = int(self._start * self._num_inference_steps)
        hi = int(self._stop * self._num_inference_steps)
        return lo <= self._step < hi

    def set_state(self, step: int, num_inference_steps: int, timestep: Any) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._ended = False
        sigma = step_level(self._plan, self._scheduler, step, num_inference_steps, timestep)
        # step 0 is a new pipeline call; a level above the last one is a new run too. Each
        # starts with an empty call log, so a guider reused for many calls holds one run's.
        if step == 0 or self._run.rose(sigma):
            if self._plan.scheduled and self._scheduler is not None:
                # a scale by the run's progress needs its schedule (guidekit.schedules)
                self._run.reset(sigmas=schedule_of(self._scheduler))
            else:
                self._run.reset()
            # CFG++: the scheduler's levels of this call (adapters/_diffusers_guider_renoise.py)
            self._renoise = guider_renoiser(self._plan, self._scheduler, self._eta)
        self._sigma = sigma

    def _current_sigma(self) -> float:
        return self._sigma if self._sigma is not None else float("inf")

    def _groups(self) -> tuple[ForwardGroup, ...]:
        if not self._active():
            return (ForwardGroup(MAIN, (Branch(MAIN, COND),)),)
        return self._plan.program(self._current_sigma(), self._run.state.schedule).groups

    @property
    def num_conditions(self) -> int:
        if self._step is None or self._ended:
            # between runs: a modular pipeline's encoders ask whether to prepare the negative
            # embeddings (> 1) before the loop's first step, so say what the whole run reads
            return run_conditions(self._plan) if self._enabled else 1
        groups = self._groups()
        return len(groups) if self._batched else sum(len(g.branches) for g in groups)

    @property
    def is_conditional(self) -> bool:
        i = self._count_prepared - 1
        if not 0 <= i < len(self._batches):
            return True
        return any(b.cond == COND for b in self._batches[i][1])

    def prepare_inputs(self, data: Any) -> list[Any]:
        """One input batch per branch (or forward group) the plan runs at this step.

        ``data`` maps each model input to ``(cond_value, uncond_value)`` or to one value
        shared by both, as diffusers' loops pass it.
        """
        return self._prepare(lambda key, i: batches_.pick(data[key], i), list(data))

    def prepare_inputs_from_block_state(
        self, data: Any, input_fields: Mapping[str, Any]
    ) -> list[Any]:
        """The older form of :meth:`prepare_inputs`: values are looked up on ``data``."""

        def get(key: str, i: int) -> Any:
            spec = input_fields[key]
            name = spec if isinstance(spec, str) else spec[i]
            return getattr(data, name, None) if name is not None else None

        return self._prepare(get, list(input_fields))

    def _prepare(self, get: batches_.Getter, keys: list[str]) -> list[Any]:
        groups = self._groups()
        latent_key = self._latent_key or next((k for k in LATENT_KEYS if k in keys), None)
        self._x = get(latent_key, 0) if latent_key is not None else None
        self._conds = batches_.read_conds(
            repr(self._expr), groups, get, keys, latent_key, self._named, plan_pools(self._plan)
        )
        self._batches = batches_.units(groups, self._batched)
        self._forward_state = None
        # EMAG: observed in the batches' calls; TPG: its permutations read the run's seed
        needs_state = any(getattr(b.perturbation, "needs_state", False)
                          for b in self._plan.branches)
        if (self._plan.stateful or needs_state) and self._active():
            self._forward_state = self._run.forward_state(self._batch_size(), self._current_sigma())
        return batches_.make_batches(
            self._batches, keys, latent_key, self._x, self._modified(self._conds),
            self._identifier_key,
        )

    def _modified(self, conds: dict[str, dict[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
        """The conditionings with ICG's pools drawn and the plan's input modifiers (CADS)
        applied, as ``Plan.step`` does."""
        pools = plan_pools(self._plan)
        if not (self._plan.modifiers or pools) or not self._active():
            return conds
        # CADS() anneals the token embeddings, not pooled ones (as with guided(...))
        plan = cads_for_guider(self._plan, {k for d in conds.values() for k in d})
        return batches_.model_conds(
            plan, self._run.state, self._x, self._current_sigma(), conds, pools
        )

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)
        i = self._count_prepared - 1
        if not 0 <= i < len(self._batches):
            return
        model, branches = self._batches[i]
        if model != MAIN:
            other = self._models.get(model)
            if other is None:
                raise GuidanceValueError(
                    f"{self._expr!r} needs the model {model!r}: call guider.attach({model}=...)"
                )
            self._undo.append(_redirect(denoiser, other))
        batch = self._batch_size()
        if len(branches) > 1 and self._x is None:  # the loop's latents have B rows: tile them
            self._undo.append(tile_inputs(denoiser, batch, len(branches)))
        blocks = tuple((b, j * batch, (j + 1) * batch) for j, b in enumerate(branches))
        layout = RowLayout(model, batch * len(branches), blocks, 0, batch, self._forward_state)
        if self._around_call is not None:
            self._entered = self._around_call(layout)
            self._entered.__enter__()
        elif model in attention_models(self._plan):
            target = denoiser if model == MAIN else self._models[model]
            self._undo.append(enter_engine(self._engine(model, target), layout))

    def _engine(self, model: str, target: Any) -> Any:
        """The attention engine of ``model`` on ``target`` for the current plan (built once)."""
        key = (model, id(target), id(self._plan))
        if key not in self._engines:
            self._engines[key] = engine_for(self._plan, model, target)
        return self._engines[key]

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        entered, self._entered = self._entered, None
        if entered is not None:
            entered.__exit__(None, None, None)
        while self._undo:
            self._undo.pop()()

    def _batch_size(self) -> int:
        return batches_.batch_size(self._conds, self._x, plan_pools(self._plan))

    def __call__(self, data: list[Any]) -> GuiderOutput:
        preds = batches_.predictions(self._batches, data)
        self._ended = self._step is not None and self._step + 1 >= (self._num_inference_steps or 0)
        cond = preds.get(Branch(MAIN, COND))
        uncond = preds.get(Branch(MAIN, UNCOND))
        if not self._active():
            return GuiderOutput(pred=cond, pred_cond=cond, pred_uncond=None)
        any_pred = next(iter(preds.values()))
        x = self._x
        if x is None or x.shape != any_pred.shape:
            if needs_x(self._plan):
                raise GuidanceValueError(
                    f"{self._expr!r} converts between prediction spaces, which needs the "
                    f"latents: pass them through the guider inputs (e.g. hidden_states=(latents, "
                    f"latents)) or name them with latent_key="
                )
            x = torch.zeros_like(any_pred)
        out = combine(
            self._run, x, self._current_sigma(), preds, self._forward_state, self._renoise
        )
        return GuiderOutput(pred=out, pred_cond=cond, pred_uncond=uncond)


def _redirect(module: torch.nn.Module, other: Callable[..., Any]) -> Callable[[], None]:
    """Route ``module``'s calls to ``other`` (an instance ``forward``, or the compiled call
    of a module compiled in place, so Dynamo never traces the redirect); return the undo."""
    return swap(module, call_slot(module), lambda *a, **k: other(*a, **k))
