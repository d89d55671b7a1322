"""KDiffusionGuided's first-call message (issue 11): when the sampler's churn lifts the first
level above the schedule that was passed, the message says so instead of asking for the
sigmas that were already given."""

from __future__ import annotations

import pytest
import torch

from guidekit import CFG, GuidanceValueError
from guidekit.adapters.kdiffusion import KDiffusionGuided

B = 2


def den(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * 0.1 + y.view(-1, 1)


def adapter(sigmas) -> KDiffusionGuided:
    return KDiffusionGuided(CFG(3), den, sigmas=sigmas, cond={"y": torch.ones(B)},
                            uncond={"y": torch.zeros(B)})


@pytest.mark.outcome("error")
@pytest.mark.parametrize("sampler", ["sample_euler", "sample_heun", "sample_dpm_2"])
def test_churn_above_the_schedule_is_named(sampler):
    import k_diffusion.sampling as ks

    sig = ks.get_sigmas_karras(8, 0.1, 10.0).double()
    g = adapter(sig)
    with pytest.raises(GuidanceValueError) as info:
        getattr(ks, sampler)(g, torch.zeros(B, 3, dtype=torch.float64), sig, disable=True,
                             s_churn=1.0)
    text = str(info.value)
    assert "above the first level 10 of the sigmas given" in text and "s_churn=0" in text
    assert "pass the sampler's own sigmas" not in text and g.calls == []


@pytest.mark.outcome("error")
def test_another_schedule_below_the_first_level_is_named():
    import k_diffusion.sampling as ks

    sig = ks.get_sigmas_karras(8, 0.1, 10.0).double()
    g = adapter(ks.get_sigmas_karras(8, 0.1, 12.0).double())
    with pytest.raises(GuidanceValueError, match="not a level of the sigmas given .* the "
                                                 "sampler runs another schedule"):
        ks.sample_euler(g, torch.zeros(B, 3, dtype=torch.float64), sig, disable=True)


@pytest.mark.outcome("correct")
def test_euler_with_churn_and_no_schedule_steps_once_per_call():
    import k_diffusion.sampling as ks

    sig = ks.get_sigmas_karras(8, 0.1, 10.0).double()
    g = adapter(None)
    ks.sample_euler(g, torch.zeros(B, 3, dtype=torch.float64), sig, disable=True, s_churn=1.0)
    assert g.steps == 8 and len(g.calls) == 8


@pytest.mark.outcome("error")
@pytest.mark.parametrize("sampler", ["sample_euler", "sample_heun", "sample_dpmpp_2m"])
def test_a_refined_schedule_is_refused_at_the_first_call(sampler):
    # karras(7) holds every level of karras(4) (its ramp points include 1/3 and 2/3): the
    # extra levels would read as DPM-2 midpoints, the state advance on 4 of the 7 steps
    import k_diffusion.sampling as ks

    g = adapter(ks.get_sigmas_karras(4, 0.1, 10.0).double())
    fine = ks.get_sigmas_karras(7, 0.1, 10.0).double()
    with pytest.raises(GuidanceValueError) as info:
        getattr(ks, sampler)(g, torch.zeros(B, 3, dtype=torch.float64), fine, disable=True)
    text = str(info.value)
    assert f"{sampler} steps on 8 sigmas, but 3 of its levels" in text
    assert "sigmas=sigmas" in text and f"guided.sample({sampler}, x, sigmas)" in text
    assert g.calls == []


@pytest.mark.outcome("correct")
def test_a_sampler_on_the_tail_of_the_schedule_runs():
    # img2img-style: the sampler starts part-way down the schedule the adapter was given
    import k_diffusion.sampling as ks

    sig = ks.get_sigmas_karras(8, 0.1, 10.0).double()
    g = adapter(sig)
    ks.sample_euler(g, torch.zeros(B, 3, dtype=torch.float64), sig[3:], disable=True)
    assert g.steps == 5 and len(g.calls) == 5
