"""Issue 11's table of bad inputs and misuse through the public API: each row is one case
whose expected outcome is a clear error (type and the fragments that name the argument or
term and the fix). Rows are parametrized so pytest counts each (see reliability_counts.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import guidekit
from guidekit import (
    APG,
    CADS,
    CFG,
    EMAG,
    NAG,
    PAG,
    PLADIS,
    SAG,
    SLG,
    Autoguidance,
    Cond,
    GuidanceTypeError,
    GuidanceValueError,
    ParseError,
    Rescale,
    guide,
    parse,
)

pytestmark = pytest.mark.outcome("error")
TE, VE = GuidanceTypeError, GuidanceValueError
C = {"y": torch.ones(2)}
U = {"y": torch.zeros(2)}
X = torch.ones(2, 3)


def model(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * 0 + y.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def run(expr: Any = None, cond: Any = C, uncond: Any = U, x: Any = X, sigma: Any = 1.0,
        fn: Callable[..., Any] = model, **kwargs: Any) -> Any:
    plan = guidekit.compile(CFG(3) if expr is None else expr)
    return guide(plan, fn, cond=cond, uncond=uncond, **kwargs)(x, sigma)


def _rise() -> None:
    g = guide(guidekit.compile(CFG(3)), model, cond=C, uncond=U)
    g(X, 1.0)
    g(X, 2.0)


def _toy(text: str) -> None:
    from guidekit.models.toy import run_demo

    run_demo(text, steps=2, batch=1, echo=None)


def _kd(**kwargs: Any) -> Any:
    from guidekit.adapters.kdiffusion import KDiffusionGuided

    return KDiffusionGuided(kwargs.pop("guidance", CFG(3)), kwargs.pop("model", model),
                            cond=C, uncond=U, **kwargs)


def _flow(**kwargs: Any) -> Any:
    from guidekit.adapters.flow import FlowGuided

    return FlowGuided(kwargs.pop("guidance", CFG(3)), kwargs.pop("model", model),
                      cond=C, uncond=U, **kwargs)


CASES: list[tuple[str, Callable[[], Any], type, list[str]]] = [
    # -- term values --------------------------------------------------------------------------
    ("CFG('3')", lambda: CFG("3"), TE, ["CFG(scale=...)", "Python number", "str"]),
    ("CFG(nan)", lambda: CFG(math.nan), VE, ["CFG(scale=...)", "NaN", "finite"]),
    ("CFG(inf)", lambda: CFG(math.inf), VE, ["CFG(scale=...)", "finite"]),
    ("CFG(True)", lambda: CFG(True), TE, ["CFG(scale=...)", "bool"]),
    ("CFG(tensor)", lambda: CFG(torch.tensor(3.0)), TE, ["CFG(scale=...)", "Python number"]),
    ("EMAG(nan)", lambda: EMAG(math.nan), VE, ["EMAG(scale=...)", "NaN"]),
    ("PLADIS('x')", lambda: PLADIS("x"), TE, ["PLADIS(scale=...)", "str"]),
    ("CADS(tau1=2)", lambda: CADS(tau1=2), VE, ["CADS(tau1=...)", "[0, 1]"]),
    ("CADS(tau1>tau2)", lambda: CADS(tau1=0.9, tau2=0.5), VE, ["tau1 must be below tau2"]),
    ("Rescale(2)", lambda: Rescale(2), VE, ["Rescale(phi=...)", "[0, 1]"]),
    ("Rescale(-1)", lambda: Rescale(-1), VE, ["Rescale(phi=...)", "[0, 1]"]),
    ("SAG(blur_sigma=-1)", lambda: SAG(2, blur_sigma=-1), VE, ["SAG(blur_sigma=...)", "positive"]),
    ("SLG(skip='x')", lambda: SLG(1, skip="x"), VE, ["SLG(skip=...)", "'block'", "'attention'"]),
    ("Autoguidance(model=3)", lambda: Autoguidance(1, model=3), TE,
     ["Autoguidance(model=...)", "'weak'"]),
    # -- operators ----------------------------------------------------------------------------
    ("CFG(3) + 1", lambda: CFG(3) + 1, TE, ["number 1", "numbers only scale directions"]),
    ("1 + CFG(3)", lambda: 1 + CFG(3), TE, ["number 1", "2 * Autoguidance(1)"]),
    ("CFG(3) * CFG(2)", lambda: CFG(3) * CFG(2), TE, ["only a number may scale"]),
    ("CFG(3) | CFG(2)", lambda: CFG(3) | CFG(2), TE, ["right side of |", "combine terms with +"]),
    ("APG() + CFG(3)", lambda: APG() + CFG(3), TE, ["APG() is a post-processor", "|"]),
    ("tensor * CFG(3)", lambda: torch.tensor(2.0) * CFG(3), TE, ["tensor", "float(t)"]),
    ("'CFG' + CFG(3)", lambda: "CFG" + CFG(3), TE, ["'CFG' (str)"]),
    ("CFG(3) / 0", lambda: CFG(3) / 0, TE, ["nonzero number"]),
    ("CFG(3) | APG", lambda: CFG(3) | APG, TE, ["APG is a term class", "APG(eta=0)"]),
    ("CFG(3) + PAG", lambda: CFG(3) + PAG, TE, ["PAG is a term class", "PAG(3"]),
    ("(CFG | APG) + PAG", lambda: (CFG(3) | APG()) + PAG(1), TE, ["a pipe applies last"]),
    ("2 * (CFG | APG)", lambda: 2 * (CFG(3) | APG()), TE, ["a pipe applies last"]),
    ("2 * CFG(3)", lambda: 2 * CFG(3), TE, ["scales a prediction", "2 * (CFG(3) - Cond())"]),
    ("Cond() + Cond()", lambda: Cond() + Cond(), TE, ["adds two predictions"]),
    ("CFG(3) + CFG(2)", lambda: CFG(3) + CFG(2), TE, ["adds two predictions", "Probably meant"]),
    ("between(-1, 2)", lambda: CFG(3).between(-1, 2), VE, ["lo must be a finite noise level"]),
    ("between(2, 1)", lambda: CFG(3).between(2, 1), VE, ["lo > hi", ".between(1, 2)"]),
    ("between(nan, 1)", lambda: CFG(3).between(math.nan, 1), TE, ["bounds must be numbers"]),
    # -- compile ------------------------------------------------------------------------------
    ("compile(prediction='foo')", lambda: guidekit.compile(CFG(3), prediction="foo"), VE,
     ["prediction space 'foo'", "'eps'"]),
    ("compile(noise='bar')", lambda: guidekit.compile(CFG(3), noise="bar"), VE,
     ["noise convention 'bar'", "'ve'"]),
    ("compile(max_rows=0)", lambda: guidekit.compile(CFG(3), max_rows=0), VE,
     ["max_rows", "whole number >= 1"]),
    ("compile(max_rows='x')", lambda: guidekit.compile(CFG(3), max_rows="x"), VE, ["max_rows"]),
    ("compile(APG())", lambda: guidekit.compile(APG()), TE, ["needs a prediction on its left"]),
    ("compile(PAG(2))", lambda: guidekit.compile(PAG(2)), TE, ["is a direction", "Cond() + PAG(2)"]),
    ("compile(1)", lambda: guidekit.compile(1), TE, ["guidance expression"]),
    ("compile('CFG(3)')", lambda: guidekit.compile("CFG(3)"), TE, ["guidekit.parse"]),
    # -- guide(): models and conditionings -----------------------------------------------------
    ("guide without uncond", lambda: run(uncond=None), VE, ["'uncond'", "uncond={...}"]),
    ("guide without weak", lambda: run(CFG(3) + Autoguidance(1)), VE,
     ["model(s) 'weak'", "models={'weak'"]),
    ("models={'weak': 'x'}", lambda: run(CFG(3) + Autoguidance(1), models={"weak": "x"}), TE,
     ["models['weak'] is a str", "models={'weak'"]),
    ("models={'weak': None}", lambda: run(CFG(3) + Autoguidance(1), models={"weak": None}), TE,
     ["models['weak'] is a NoneType"]),
    ("models={'weak': main}", lambda: run(CFG(3) + Autoguidance(1), models={"weak": model}), VE,
     ["models['weak'] is the main model itself", "Autoguidance(1)", "weaker model"]),
    ("cond=[t]", lambda: run(cond=[torch.ones(2)]), TE, ["guide(cond=...) is a list", "cond={"]),
    ("cond=t", lambda: run(cond=torch.ones(2)), TE, ["guide(cond=...) is a Tensor"]),
    ("uncond=(t,)", lambda: run(uncond=(torch.ones(2),)), TE, ["guide(uncond=...) is a tuple"]),
    ("conds={'neg': [t]}", lambda: run(conds={"neg": [1]}), TE, ["conds['neg']", "a list"]),
    ("cond f32 / uncond f64", lambda: run(uncond={"y": torch.zeros(2, dtype=torch.float64)}),
     VE, ["cond['y'] is torch.float32 but uncond['y'] is torch.float64", "share a dtype"]),
    ("cond f16 / uncond f32", lambda: run(cond={"y": torch.ones(2, dtype=torch.float16)}), VE,
     ["cond['y'] is torch.float16", "uncond['y'] is torch.float32"]),
    ("int / float labels", lambda: run(cond={"y": torch.ones(2, dtype=torch.long)}), VE,
     ["torch.int64", "torch.float32", "torch.long"]),
    ("cond on meta", lambda: run(cond={"y": torch.ones(2, device="meta")},
                                 uncond={"y": torch.zeros(2, device="meta")}), VE,
     ["cond['y'] is on meta but x is on cpu", ".to('cpu')"]),
    ("uncond on meta", lambda: run(uncond={"y": torch.zeros(2, device="meta")}), VE,
     ["uncond['y'] is on meta"]),
    ("batch mismatch", lambda: run(cond={"y": torch.ones(3)}, uncond={"y": torch.zeros(3)}), VE,
     ["key 'y' has shape [3]", "B = x.shape[0] = 2"]),
    ("keys mismatch", lambda: run(uncond={"z": torch.zeros(2)}), VE, ["different keys"]),
    ("shape mismatch", lambda: run(cond={"y": torch.ones(2, 4)}, uncond={"y": torch.zeros(2, 5)}),
     VE, ["differ at key 'y'", "pad or mask"]),
    # -- guide(): the call --------------------------------------------------------------------
    ("x not a tensor", lambda: run(x=[1, 2]), TE, ["x must be a tensor"]),
    ("sigma as text", lambda: run(sigma="1"), TE, ["sigma must be a number or a tensor"]),
    ("sigma of two levels", lambda: run(sigma=torch.tensor([1.0, 0.5])), VE,
     ["different values", "one noise level per call"]),
    ("sigma of the wrong shape", lambda: run(sigma=torch.ones(3)), VE, ["sigma has shape [3]"]),
    ("negative sigma", lambda: run(sigma=-1.0), VE, ["sigma = -1.0", ">= 0"]),
    ("flow sigma above 1", lambda: guide(guidekit.compile(CFG(3), prediction="flow",
                                                          noise="flow"), model, cond=C,
                                         uncond=U)(X, 2.0), VE, ["[0, 1]", "sigma = 1 - t"]),
    ("model returns a tuple", lambda: run(fn=lambda x, s, y: (x,)), TE,
     ["returned tuple", ".sample"]),
    ("model returns another shape", lambda: run(fn=lambda x, s, y: x[:, :1]), VE,
     ["returned shape [4, 1]", "expected [4, 3]"]),
    ("output='foo'", lambda: run(output="foo"), VE, ["output space 'foo'"]),
    ("seed='x'", lambda: run(CFG(3) | CADS(), seed="x"), VE, ["seed must be an int"]),
    ("nonfinite='off'", lambda: run(nonfinite="off"), VE, ["nonfinite='off'", "'raise'"]),
    ("sigmas='karras'", lambda: run(sigmas="karras"), TE, ["sigmas must be", "1-d"]),
    ("sigmas 2-d tensor", lambda: run(sigmas=torch.ones(2, 2)), TE, ["a 2-d tensor"]),
    ("sigmas of text items", lambda: run(sigmas=["1", "x"]), TE, ["sigmas must hold numbers"]),
    ("PAG without around_call", lambda: run(CFG(3) + PAG(2)), VE,
     ["perturbed inside the forward", "guidekit.attention.install"]),
    ("EMAG without around_call", lambda: run(CFG(3) + EMAG(2)), VE,
     ["keeps state inside the model's forward", "install"]),
    ("NAG without around_call", lambda: run(CFG(3) | NAG(2)), VE,
     ["changes the attention", "install"]),
    # -- state misuse -------------------------------------------------------------------------
    ("a rising level without reset()", _rise, VE, ["rose from sigma=1 to 2", "reset()"]),
    ("first call off the schedule", lambda: run(sigmas=[2.0, 1.0, 0.0], sigma=3.0), VE,
     ["guide: the first call is at sigma=3", "another schedule", "sigmas="]),
    # -- text ---------------------------------------------------------------------------------
    ("parse('CFG(3) + 2')", lambda: parse("CFG(3) + 2"), ParseError, ["number 2", "position 9"]),
    ("parse('FOO(3)')", lambda: parse("FOO(3)"), ParseError, ["unknown name 'FOO'", "CFG"]),
    ("parse(bogus keyword)", lambda: parse("CFG(scale=3, bogus=1)"), ParseError,
     ["unexpected keyword argument 'bogus'"]),
    # -- the toy demo (the CLI prints these) ----------------------------------------------------
    ("toy demo with PAG", lambda: _toy("CFG(3) + PAG(2)"), VE,
     ["no attention layers", "PAG(2)", "guidekit demo --guidance"]),
    ("toy demo with NAG", lambda: _toy("CFG(3) | NAG(2)"), VE, ["no attention layers", "NAG(2)"]),
    ("toy demo with SEG", lambda: _toy("CFG(3) + SEG(2)"), VE, ["no attention layers", "SEG(2)"]),
    # -- adapters -----------------------------------------------------------------------------
    ("KDiffusionGuided(prediction='foo')", lambda: _kd(prediction="foo"), VE,
     ["prediction='foo'", "'x0'"]),
    ("KDiffusionGuided timestep with x0", lambda: _kd(timestep=lambda s: s), VE,
     ["describe a raw network", "prediction='eps'"]),
    ("KDiffusionGuided timestep and alphas", lambda: _kd(prediction="eps", timestep=lambda s: s,
                                                          alphas_cumprod=torch.ones(3)), VE,
     ["timestep= or alphas_cumprod="]),
    ("KDiffusionGuided weak 'x'", lambda: _kd(guidance=CFG(3) + Autoguidance(1),
                                              models={"weak": "x"}), TE,
     ["KDiffusionGuided: models['weak'] is a str"]),
    ("KDiffusionGuided weak = main", lambda: _kd(guidance=CFG(3) + Autoguidance(1),
                                                 models={"weak": model}), VE,
     ["KDiffusionGuided: models['weak'] is the main model itself"]),
    ("KDiffusionGuided nonfinite", lambda: _kd(nonfinite=1), VE, ["KDiffusionGuided(nonfinite=1)"]),
    ("KDiffusionGuided unknown extra", lambda: _kd()(X, torch.ones(2), bogus=1), VE,
     ["extra argument 'bogus'", "conditioning"]),
    ("KDiffusionGuided cond=[t]", lambda: _kd(conds={"neg": [1]}), TE,
     ["conditioning 'neg' must be a dict"]),
    ("KDiffusionGuided plan for flow", lambda: _kd(guidance=guidekit.compile(
        CFG(3), prediction="flow", noise="flow")), VE, ["compiled with prediction='flow'"]),
    ("KDiffusionGuided max_rows with a plan", lambda: _kd(guidance=guidekit.compile(
        CFG(3), prediction="x0", noise="ve"), max_rows=2), VE, ["max_rows is a compile option"]),
    ("FlowGuided(model_time='x')", lambda: _flow(model_time="x"), VE, ["model_time='x'", "'t'"]),
    ("FlowGuided grid twice", lambda: _flow(time_grid=[0, 1], sigmas=[1, 0]), VE,
     ["give the solver's grid once"]),
    ("FlowGuided.odeint_func('x')", lambda: _flow().odeint_func("x"), VE,
     ["odeint_func(time='x')"]),
    ("FlowGuided weak = main", lambda: _flow(guidance=CFG(3) + Autoguidance(1),
                                             models={"weak": model}), VE,
     ["FlowGuided: models['weak'] is the main model itself"]),
    ("FlowGuided nonfinite", lambda: _flow(nonfinite="loud"), VE, ["FlowGuided(nonfinite='loud')"]),
]


@pytest.mark.parametrize(("build", "kind", "fragments"),
                         [pytest.param(b, k, f, id=i) for i, b, k, f in CASES])
def test_clear_error(build, kind, fragments):
    with pytest.raises(kind) as info:
        build()
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, (fragment, text)
