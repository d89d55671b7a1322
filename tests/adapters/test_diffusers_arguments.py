"""Nothing a pipeline call or ``guided(...)`` is given is silently ignored (issue 11).

Inside ``guided(pipe, expr)`` the expression guides. The pipeline call's ``guidance_rescale``
is honoured as ``| Rescale(phi)`` (equal to the pipeline's own rescale), a scale that is not
the expression's and every other guidance argument are refused by name, and every keyword of
``guided`` of the wrong kind or value is refused naming it and what it takes. Tiny real
pipelines, float64.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import guidekit as gk
from guidekit import CFG, PAG, GuidanceError, GuidanceTypeError, GuidanceValueError, Rescale
from guidekit.adapters.diffusers import Layout, guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers as tiny  # noqa: E402
from tiny_diffusers import one_thread, run_sd, sd_fixture  # noqa: E402,F401  (fixtures)

F64 = torch.float64
W = 4.0
PROMPTS = ["a cat", "a photo of a dog"]

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def test_guidance_rescale_is_honoured_as_the_pipelines_own_rescale(sd: Any) -> None:
    ref = run_sd(sd, guidance_scale=W, guidance_rescale=0.7)
    plain = run_sd(sd, guidance_scale=W)
    assert (ref - plain).abs().max() > 1e-4  # the rescale matters here
    with guided(sd, CFG(W)) as g:
        out = run_sd(sd, guidance_scale=W, guidance_rescale=0.7)
        assert repr(g.plan.expr) == "CFG(4) | Rescale(0.7)"
        # the next call without it runs the block's expression again
        again = run_sd(sd, guidance_scale=W)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, plain, rtol=0, atol=1e-5)
    assert g.runs == 2 and [c.rows for c in g.calls] == [4] * 6
    # written in the expression, the same rescale is the same run; twice is refused
    with guided(sd, CFG(W) | Rescale(0.7)):
        torch.testing.assert_close(run_sd(sd, guidance_rescale=0.7), ref, rtol=0, atol=1e-5)
    with guided(sd, CFG(W) | Rescale(0.5)), pytest.raises(
        GuidanceValueError, match=r"guidance_rescale=0.7 would rescale .* a second time"
    ):
        run_sd(sd, guidance_rescale=0.7)
    with guided(sd, CFG(W)), pytest.raises(GuidanceValueError, match=r"guidance_rescale=1.5.*0 <= phi <= 1"):
        run_sd(sd, guidance_rescale=1.5)


@torch.no_grad()
def test_guidance_rescale_rides_with_attention_terms(sd: Any) -> None:
    with guided(sd, CFG(W) + PAG(2.0)) as g:
        pag = run_sd(sd)
        rescaled = run_sd(sd, guidance_rescale=0.7)
    assert [c.rows for c in g.calls] == [6] * 6
    assert torch.isfinite(rescaled).all() and (rescaled - pag).abs().max() > 1e-5


@torch.no_grad()
def test_a_scale_for_an_expression_without_cfg_is_refused(sd: Any) -> None:
    with guided(sd, gk.Cond() + PAG(2.0)), pytest.raises(
        GuidanceValueError, match=r"guidance_scale=2 asks for CFG, which Cond\(\) \+ PAG\(2\) does "
        r"not contain.*write CFG\(2\)"
    ):
        run_sd(sd, guidance_scale=2.0)
    with guided(sd, gk.Cond() + PAG(2.0)) as g:  # scale 1: no CFG asked, none done
        run_sd(sd, guidance_scale=1.0)
    assert [c.rows for c in g.calls] == [4] * 3


@torch.no_grad()
def test_cfg_like_terms_accept_their_own_scale_and_cfgpp_none(sd: Any) -> None:
    """PerpNeg(w), ICG(w), CFG-Zero*(w) guide with a CFG scale: the pipeline's
    guidance_scale=w is theirs (a different one is refused); CFG++'s lam is not a CFG scale,
    so an explicit guidance_scale is refused, naming lam and the fix."""
    neg = {"neg": "blurry"}
    with guided(sd, gk.PerpNeg(W, negative="neg"), prompts=neg) as g:
        run_sd(sd, guidance_scale=W)
    assert [c.rows for c in g.calls] == [6] * 3  # c, u and neg in one call per step
    with guided(sd, gk.PerpNeg(W, negative="neg"), prompts=neg), pytest.raises(
        GuidanceValueError, match=r"guidance_scale=5 is not the CFG scale of PerpNeg\(4.*\(4\)"
    ):
        run_sd(sd, guidance_scale=5.0)
    with guided(sd, gk.ICG(3), prompts={"icg": ["a tree", "a car"]}) as g:
        run_sd(sd, guidance_scale=3.0)
    assert [c.rows for c in g.calls] == [4] * 3
    with guided(sd, gk.CFGZeroStar(W)) as g:
        run_sd(sd, guidance_scale=W)
    with guided(sd, gk.CFGpp(0.6)), pytest.raises(
        GuidanceValueError, match=r"guidance_scale=7 is a CFG scale, and CFGpp\(0.6\) guides by "
        r"its own lam.*leave guidance_scale out"
    ):
        run_sd(sd, guidance_scale=7.0)
    # the modular guider exposes the same scale (its SDXL blocks read guider.guidance_scale)
    from guidekit.adapters.diffusers import GuidekitGuidance

    assert GuidekitGuidance(gk.PerpNeg(W, negative="neg")).guidance_scale == W
    assert GuidekitGuidance(gk.ICG(3)).guidance_scale == 3


@torch.no_grad()
def test_a_gated_cfg_accepts_its_scale() -> None:
    pipe = tiny.dit_pipeline().to(F64)
    with guided(pipe, CFG(W).between(0, 1e9)) as g:
        pipe(class_labels=[0, 1], guidance_scale=W, num_inference_steps=2, output_type="pt")
    assert len(g.calls) == 2


@torch.no_grad()
def test_other_guidance_arguments_are_refused_by_name(sd: Any) -> None:
    from diffusers import StableDiffusionPAGPipeline

    pag_pipe = tiny._quiet(StableDiffusionPAGPipeline(**sd.components))
    with guided(pag_pipe, CFG(W)), pytest.raises(
        GuidanceValueError, match=r"pag_scale=3\.5 .* would ignore .*write PAG\(scale\)"
    ):
        run_sd(pag_pipe, guidance_scale=W, pag_scale=3.5)
    sd3 = tiny.sd3_pipeline().to(F64)
    with guided(sd3, CFG(W)), pytest.raises(
        GuidanceValueError, match=r"skip_guidance_layers=\[0\] .*write SLG\(scale, layers=\.\.\.\)"
    ):
        sd3(prompt=PROMPTS, height=16, width=16, num_inference_steps=2, guidance_scale=W,
            max_sequence_length=16, output_type="latent", skip_guidance_layers=[0])
    # off or left at the default, such an argument changes nothing and passes
    with guided(sd3, CFG(W)) as g:
        sd3(prompt=PROMPTS, height=16, width=16, num_inference_steps=2, guidance_scale=W,
            max_sequence_length=16, output_type="latent", skip_guidance_layers=None)
    assert len(g.calls) == 2


@torch.no_grad()
def test_fluxs_guidance_scale_is_a_model_input_and_true_cfg_scale_the_scale() -> None:
    pipe = tiny.flux_pipeline().to(F64)
    kwargs = {"prompt": PROMPTS, "negative_prompt": ["", ""], "height": 16, "width": 16,
              "num_inference_steps": 2, "max_sequence_length": 16, "output_type": "latent"}
    with guided(pipe, CFG(W)) as g:
        pipe(true_cfg_scale=W, guidance_scale=5.0, **kwargs)  # the distilled-guidance input
    assert [c.rows for c in g.calls] == [4, 4]
    with guided(pipe, CFG(W)), pytest.raises(GuidanceValueError, match="true_cfg_scale=2 is not"):
        pipe(true_cfg_scale=2.0, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layout": "sideways"}, GuidanceValueError, r"layout='sideways': use one of 'uncond_first'"),
        ({"layout": 3}, GuidanceTypeError, r"layout must be None, a Layout or one of"),
        ({"seed": "0"}, GuidanceTypeError, r"guided\(seed=\.\.\.\) must be an int"),
        ({"seed": True}, GuidanceTypeError, r"guided\(seed=\.\.\.\) must be an int"),
        ({"models": {"weak": "x"}}, GuidanceTypeError, r"guided\(models=\.\.\.\) must map model names"),
        ({"models": ["weak"]}, GuidanceTypeError, r"guided\(models=\.\.\.\) must map model names"),
        ({"prediction": "score"}, GuidanceValueError, r"guided\(prediction=\.\.\.\) space 'score'"),
        ({"noise": 3}, GuidanceValueError, r"noise must be 've', 'vp', 'flow' or a guidekit.Noise"),
        ({"noise": "subvp"}, GuidanceValueError, r"noise convention 'subvp'"),
        ({"max_rows": 0}, GuidanceValueError, r"max_rows must be None"),
        ({"sigma_fn": 1.0}, GuidanceTypeError, r"guided\(sigma_fn=\.\.\.\) must be callable"),
        ({"around_call": "engine"}, GuidanceTypeError, r"guided\(around_call=\.\.\.\) must be callable"),
        ({"denoiser": "unet"}, GuidanceTypeError, r"guided\(denoiser=\.\.\.\) must be the torch.nn.Module"),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, dict) else None,
)
def test_every_keyword_of_guided_is_checked_by_name(
    sd: Any, kwargs: dict[str, Any], error: type, match: str
) -> None:
    cls = type(sd)
    with pytest.raises(error, match=match), guided(sd, CFG(W), **kwargs):
        pass
    assert type(sd) is cls and "forward" not in vars(sd.unet)


def test_the_expression_argument_is_checked_and_text_is_read(sd: Any) -> None:
    with pytest.raises(GuidanceTypeError, match=r"guided\(pipe, expr\): expr must be a guidance"):
        with guided(sd, 4.0):  # type: ignore[arg-type]
            pass
    with guided(sd, "CFG(4) + PAG(2)") as g:
        assert repr(g.plan.expr) == "CFG(4) + PAG(2)"
    plan = gk.compile(CFG(W), prediction="eps", noise="vp")
    with pytest.raises(GuidanceValueError, match=r"guided\(max_rows=2\) is a compile option"):
        with guided(sd, plan, max_rows=2):
            pass


def test_layout_values_are_checked_by_name() -> None:
    with pytest.raises(GuidanceValueError, match="layout='sideways'"):
        Layout("sideways")
    with pytest.raises(GuidanceValueError, match=r"timestep_scale=0"):
        Layout("sequential", timestep_scale=0)
    assert issubclass(GuidanceValueError, GuidanceError)
