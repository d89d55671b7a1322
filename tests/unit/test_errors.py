"""Bad input: every mistake raises a guidekit error that names the culprit and the fix.

Each test checks the exception type (``GuidanceTypeError`` for the wrong kind of thing,
``GuidanceValueError`` for a wrong value or inputs that do not fit) and that the message
names the offending term, conditioning, key or model, and says what to write instead.
Parse errors are tested elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import guidekit
from guidekit import APG, CFG, Autoguidance, Cond
from guidekit.errors import GuidanceTypeError, GuidanceValueError

B = 2


def zeros_model(x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
    return torch.zeros_like(x)


def emb(batch: int = B, width: int = 4) -> dict[str, torch.Tensor]:
    return {"emb": torch.zeros(batch, width)}


def x() -> torch.Tensor:
    return torch.zeros(B, 3)


def raises(kind: type[Exception], fn: Callable[[], Any], *fragments: str) -> str:
    """Run ``fn``, expect ``kind``, and check every fragment is in the message."""
    with pytest.raises(kind) as err:
        fn()
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- scales and term arguments -----------------------------------------------------------------


def test_nan_scale() -> None:
    raises(GuidanceValueError, lambda: CFG(float("nan")), "CFG(scale=", "finite")


def test_inf_scale() -> None:
    raises(GuidanceValueError, lambda: CFG(float("inf")), "CFG(scale=", "finite", "inf")


def test_tensor_scale_in_constructor() -> None:
    raises(GuidanceTypeError, lambda: CFG(torch.tensor(7.0)), "CFG(scale=", "Python number",
           "float(t)")


def test_tensor_times_direction() -> None:
    """``tensor * Autoguidance(1)``: say which term and how to get a number."""
    raises(GuidanceTypeError, lambda: torch.tensor(2.0) * Autoguidance(1), "tensor",
           "Autoguidance(1)", "float(")


@pytest.mark.parametrize("threshold", [0, -1.5])
def test_apg_norm_threshold_must_be_positive(threshold: float) -> None:
    raises(GuidanceValueError, lambda: APG(norm_threshold=threshold), "APG(norm_threshold=",
           "> 0", "None to turn it off")


def test_interval_lo_above_hi() -> None:
    raises(GuidanceValueError, lambda: CFG(7).between(5, 1), "CFG(7).between(5, 1)",
           "probably meant .between(1, 5)")


def test_interval_lo_equals_hi() -> None:
    raises(GuidanceValueError, lambda: CFG(7).between(1, 1), "CFG(7).between(1, 1)",
           "lo == hi", "empty")


# -- classes where an instance belongs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "name", "example"),
    [
        (lambda: CFG | APG, "CFG", "CFG(7)"),
        (lambda: CFG(7) + Autoguidance, "Autoguidance", "Autoguidance(2, model='weak')"),
        (lambda: CFG(7) | APG, "APG", "APG(eta=0)"),
        (lambda: guidekit.compile(CFG), "CFG", "CFG(7)"),
    ],
    ids=["CFG|APG", "CFG(7)+Autoguidance", "CFG(7)|APG", "compile(CFG)"],
)
def test_class_instead_of_instance(build: Callable[[], Any], name: str, example: str) -> None:
    raises(GuidanceTypeError, build, f"{name} is a term class", "call it", example)


# -- kinds: predictions, directions, pipes ------------------------------------------------------


def test_prediction_plus_prediction() -> None:
    raises(GuidanceTypeError, lambda: CFG(7) + Cond(), "CFG(7) + Cond()", "two predictions",
           "Probably meant")


def test_scalar_times_prediction() -> None:
    raises(GuidanceTypeError, lambda: 2 * CFG(7), "2 * CFG(7)", "scales a prediction",
           "Probably meant", "CFG(2)")


def test_direction_minus_prediction() -> None:
    raises(GuidanceTypeError, lambda: Autoguidance(1) - CFG(7), "Autoguidance(1) - CFG(7)",
           "Probably meant", "CFG(7) - Autoguidance(1) (the prediction")


@pytest.mark.parametrize("build", [
    lambda: Autoguidance(1) - CFG(7), lambda: (CFG(3) - Cond()) - CFG(7),
    lambda: Autoguidance(1) | APG(), lambda: (CFG(7) - Cond()) | APG(),
])
def test_the_suggested_fix_is_a_valid_expression(build: Callable[[], Any]) -> None:
    # before: "CFG(7) + CFG(7) - Cond() | APG()" (two predictions) and "... reversed"
    message = raises(GuidanceTypeError, build)
    fix = message.split("Probably meant: ")[-1].split(" (the prediction")[0]
    fix = fix.split("e.g. ")[-1] if "e.g. " in message else fix
    guidekit.parse(fix)  # parses, and builds


def test_nan_times_a_direction_names_the_term() -> None:
    # before: a bare ValueError from printing the message (int(nan))
    raises(GuidanceValueError, lambda: float("nan") * (CFG(7) - Cond()),
           "nan * (CFG(7) - Cond())", "must be finite")


def test_pipe_on_the_left_of_plus() -> None:
    raises(GuidanceTypeError, lambda: (CFG(7) | APG()) + Autoguidance(1), "(CFG(7) | APG())",
           "a pipe applies last", "Write the sum first")


def test_pipe_of_a_direction() -> None:
    raises(GuidanceTypeError, lambda: Autoguidance(1) | APG(), "Autoguidance(1) is a direction",
           "CFG(7) + Autoguidance(1) | APG()")


def test_apg_without_unconditional_branch() -> None:
    raises(GuidanceTypeError, lambda: Cond() + Autoguidance(1) | APG(),
           "Cond() + Autoguidance(1) | APG()", "no unconditional branch", "CFG(w) + ... | APG()")


def test_compile_a_direction() -> None:
    raises(GuidanceTypeError, lambda: guidekit.compile(Autoguidance(1)),
           "compile(Autoguidance(1))", "direction", "CFG(7) + Autoguidance(1)")


def test_truth_value_of_an_expression() -> None:
    raises(GuidanceTypeError, lambda: bool(CFG(7)), "CFG(7) has no truth value", "==", "is None")


# -- compile options ----------------------------------------------------------------------------


def test_unknown_prediction_space() -> None:
    raises(GuidanceValueError, lambda: guidekit.compile(CFG(7), prediction="epsilon"),
           "'epsilon'", "'eps'", "'flow'")


def test_unknown_output_space() -> None:
    plan = guidekit.compile(CFG(7))
    guided = guidekit.guide(plan, zeros_model, cond=emb(), uncond=emb(), output="denoised")
    raises(GuidanceValueError, lambda: guided(x(), 1.0), "output", "'denoised'", "'x0'")


def test_unknown_noise_convention() -> None:
    raises(GuidanceValueError, lambda: guidekit.compile(CFG(7), noise="subvp"), "'subvp'", "'ve'")


def test_max_rows_zero() -> None:
    raises(GuidanceValueError, lambda: guidekit.compile(CFG(7), max_rows=0), "max_rows",
           ">= 1", "got 0")


# -- conditionings and models -------------------------------------------------------------------


def test_uncond_batch_mismatch() -> None:
    guided = guidekit.guide(guidekit.compile(CFG(7)), zeros_model, cond=emb(), uncond=emb(B + 1))
    raises(GuidanceValueError, lambda: guided(x(), 1.0), "conditioning 'uncond' key 'emb'",
           "[3, 4]", "B = x.shape[0] = 2")


def test_cond_uncond_shape_mismatch() -> None:
    guided = guidekit.guide(guidekit.compile(CFG(7)), zeros_model, cond=emb(), uncond=emb(width=5))
    raises(GuidanceValueError, lambda: guided(x(), 1.0), "'cond' and 'uncond'", "key 'emb'",
           "[2, 4] vs [2, 5]", "pad or mask")


def test_cond_uncond_key_mismatch() -> None:
    guided = guidekit.guide(guidekit.compile(CFG(7)), zeros_model, cond=emb(),
                            uncond={"other": torch.zeros(B, 4)})
    raises(GuidanceValueError, lambda: guided(x(), 1.0), "'cond' and 'uncond'",
           "['emb'] vs ['other']", "must match")


def test_missing_conditioning_in_guide() -> None:
    raises(GuidanceValueError,
           lambda: guidekit.guide(guidekit.compile(CFG(7)), zeros_model, cond=emb()),
           "CFG(7)", "'uncond'", "pass uncond=")


def test_missing_conditioning_in_plan_step() -> None:
    plan = guidekit.compile(CFG(7))
    raises(GuidanceValueError,
           lambda: plan.step(plan.init(), x(), 1.0, {"cond": emb()}, {"main": zeros_model}),
           "'uncond'", "pass uncond=")


def test_missing_weak_model_in_guide() -> None:
    plan = guidekit.compile(CFG(7) + Autoguidance(1))
    raises(GuidanceValueError,
           lambda: guidekit.guide(plan, zeros_model, cond=emb(), uncond=emb()),
           "CFG(7) + Autoguidance(1)", "'weak'", "c@weak", "models={'weak'")


def test_missing_weak_model_in_plan_step() -> None:
    plan = guidekit.compile(CFG(7) + Autoguidance(1))
    raises(GuidanceValueError,
           lambda: plan.step(plan.init(), x(), 1.0, {"cond": emb(), "uncond": emb()},
                             {"main": zeros_model}),
           "'weak'", "c@weak", "models={'weak'")


# -- sigma and model outputs --------------------------------------------------------------------


def _guided(model: Callable[..., Any] = zeros_model, **kw: Any) -> guidekit.Guided:
    plan = guidekit.compile(CFG(7), **kw)
    return guidekit.guide(plan, model, cond=emb(), uncond=emb())


@pytest.mark.parametrize("shape", [(3,), (B, 1)])
def test_sigma_tensor_of_wrong_shape(shape: tuple[int, ...]) -> None:
    raises(GuidanceValueError, lambda: _guided()(x(), torch.ones(shape)),
           f"sigma has shape {list(shape)}", "0-d tensor", "[B] tensor", "B = x.shape[0] = 2")


def test_sigma_tensor_with_mixed_values() -> None:
    raises(GuidanceValueError, lambda: _guided()(x(), torch.tensor([1.0, 2.0])),
           "different noise levels", "call once per level")


def test_model_returns_wrong_shape() -> None:
    guided = _guided(lambda x, s, **k: torch.zeros(1, 3))
    raises(GuidanceValueError, lambda: guided(x(), 1.0), "model 'main'", "shape [1, 3]",
           "expected [4, 3]")


def test_model_returns_non_tensor() -> None:
    guided = _guided(lambda x, s, **k: {"sample": x})
    raises(GuidanceTypeError, lambda: guided(x(), 1.0), "model 'main' returned dict",
           "needs a tensor", "wrap the model")


def test_flow_sigma_above_one() -> None:
    guided = _guided(prediction="flow", noise="flow")
    raises(GuidanceValueError, lambda: guided(x(), 1.5), "sigma=1.5", "[0, 1]", "1 - t")


def test_noise_level_rising_mid_run() -> None:
    guided = _guided()
    guided(x(), 2.0)
    guided(x(), 1.0)
    raises(GuidanceValueError, lambda: guided(x(), 3.0), "rose from sigma=1 to 3",
           "plan.init(...)", "reset()")
    guided.reset()  # the documented fix works
    guided(x(), 3.0)


def test_noise_level_rising_in_plan_step() -> None:
    plan = guidekit.compile(CFG(7))
    conds, models = {"cond": emb(), "uncond": emb()}, {"main": zeros_model}
    _, state = plan.step(plan.init(), x(), 1.0, conds, models)
    raises(GuidanceValueError, lambda: plan.step(state, x(), 5.0, conds, models),
           "new sampling run", "plan.init(...)")
