"""The shipped models through ``guidekit.models.sample``: determinism, calls, oracles, quality.

Oracles are hand-written Euler loops over the models' own ``model_fn`` (separate calls per
branch, combined with the published formulas), compared to what ``sample`` computes in
batched calls through guidekit.
"""

from __future__ import annotations

import pytest
import torch

import guidekit
from guidekit import CFG, PAG, Autoguidance, Cond, GuidanceValueError
from guidekit.models import MODEL_NAMES, Bundled, evaluate, load, sample
from guidekit.models.bundled import network_prediction

B = 4
# Batched and separate calls round differently (~1e-6 in eps); the first VE Euler step
# multiplies that by sigma_max ~ 157. A wrong combination differs by O(0.1).
ATOL = 2e-3
LABELS = torch.tensor([0, 3, 7, 9])


@pytest.fixture(scope="module")
def eps() -> Bundled:
    return load("eps")


@pytest.fixture(scope="module")
def eps_weak() -> Bundled:
    return load("eps-weak")


@pytest.fixture(scope="module")
def flow() -> Bundled:
    return load("flow")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shipped_models_load(name: str) -> None:
    m = load(name)
    assert m.name == name and m.prediction in ("eps", "flow")
    assert m.noise == {"eps": "ve", "flow": "flow"}[m.prediction]
    assert (m.classes, m.null_class, m.shape) == (10, 10, (1, 8, 8))
    assert not m.transformer.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in m.transformer.parameters())
    assert m.transformer.config.num_embeds_ada_norm == 10
    assert int(m.metadata["layers"]) == m.transformer.config.num_layers
    assert m.metadata["prediction"] == m.prediction
    sig = m.sigmas(10)
    assert sig.ndim == 1 and len(sig) == 11 and sig[-1] == 0
    assert bool((sig[:-1] > sig[1:]).all())
    plan = m.compile(CFG(2))
    assert plan.prediction == m.prediction and plan.noise.kind == m.noise
    out = m.model_fn(torch.zeros(2, 1, 8, 8), torch.full((2,), float(sig[3])), torch.tensor([1, 10]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="eps-weak"):
        load("epsilon")


def test_sampling_is_deterministic_under_a_seed(eps: Bundled) -> None:
    a = sample(eps, CFG(3), LABELS, steps=4, seed=5)
    b = sample(eps, "CFG(3)", LABELS, steps=4, seed=5)
    c = sample(eps, CFG(3), LABELS, steps=4, seed=6)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (B, 1, 8, 8)
    assert float(a.images.min()) >= -1 and float(a.images.max()) <= 1


@pytest.mark.parametrize("model", ["eps", "flow"])
def test_cfg_is_one_call_of_2b_rows_per_step_and_matches_a_hand_loop(
    model: str, eps: Bundled, flow: Bundled
) -> None:
    m = {"eps": eps, "flow": flow}[model]
    steps, w = 3, 3.0
    res = sample(m, CFG(w), LABELS, steps=steps, seed=1)
    assert [(c.model, c.rows, c.step) for c in res.calls] == [("main", 2 * B, i) for i in range(steps)]
    # oracle: separate cond / uncond calls, u + w (c - u), Euler on the model's schedule
    sig = m.sigmas(steps).tolist()
    x = torch.randn((B, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * sig[0]
    null = torch.full_like(LABELS, 10)
    with torch.no_grad():
        for i in range(steps):
            s = torch.full((B,), sig[i])
            c = network_prediction(m.transformer, m.convention, x, s, LABELS)
            u = network_prediction(m.transformer, m.convention, x, s, null)
            x = x + (sig[i + 1] - sig[i]) * (u + w * (c - u))
    torch.testing.assert_close(res.images, x.clamp(-1, 1), rtol=0, atol=ATOL)


def test_unguided_is_one_call_of_b_rows(eps: Bundled) -> None:
    res = sample(eps, Cond(), LABELS, steps=3)
    assert [c.rows for c in res.calls] == [B] * 3


def test_autoguidance_runs_the_weak_model_as_its_own_group(eps: Bundled, eps_weak: Bundled) -> None:
    s = 1.5
    res = sample(eps, Cond() + Autoguidance(s), LABELS, steps=2, seed=2, weak=eps_weak)
    assert [(c.model, c.rows) for c in res.calls] == [("main", B), ("weak", B)] * 2
    sig = eps.sigmas(2).tolist()
    x = torch.randn((B, 1, 8, 8), generator=torch.Generator().manual_seed(2)) * sig[0]
    with torch.no_grad():
        for i in range(2):
            sr = torch.full((B,), sig[i])
            c = eps.model_fn(x, sr, LABELS)
            cw = eps_weak.model_fn(x, sr, LABELS)
            x = x + (sig[i + 1] - sig[i]) * (c + s * (c - cw))
    torch.testing.assert_close(res.images, x.clamp(-1, 1), rtol=0, atol=ATOL)
    with pytest.raises(GuidanceValueError, match="weak"):
        sample(eps, Cond() + Autoguidance(s), LABELS, steps=2)


def test_pag_runs_through_the_attention_engine(eps: Bundled) -> None:
    blocks = eps.transformer.transformer_blocks
    before = [b.attn1.processor for b in blocks]
    res = sample(eps, CFG(3) + PAG(2), LABELS, steps=3, seed=3)
    assert [c.rows for c in res.calls] == [3 * B] * 3
    assert res.calls[0].branches[:2] == ("c", "u")
    assert res.calls[0].branches[2].startswith("c[")  # the perturbed conditional branch
    assert [b.attn1.processor for b in blocks] == before  # the engine put them back
    plain = sample(eps, CFG(3), LABELS, steps=3, seed=3)
    assert (res.images - plain.images).abs().amax() > 1e-3  # the perturbation did something
    # a vanishing PAG scale: the perturbed rows still run (3B rows) but must not leak into
    # the cond / uncond rows of the same call
    zero = sample(eps, CFG(3) + PAG(1e-9), LABELS, steps=3, seed=3)
    assert [c.rows for c in zero.calls] == [3 * B] * 3
    torch.testing.assert_close(zero.images, plain.images, rtol=0, atol=ATOL)


def _cads_reference(y: torch.Tensor, t: float, noise: torch.Tensor, tau1: float, tau2: float,
                    s: float) -> torch.Tensor:
    """CADS (arXiv 2310.17347) steps 1-3 with psi = 1, written from the paper."""
    gamma = 1.0 if t <= tau1 else 0.0 if t >= tau2 else (tau2 - t) / (tau2 - tau1)
    y_hat = gamma ** 0.5 * y + s * (1 - gamma) ** 0.5 * noise
    mean, std = y.mean(1, keepdim=True), y.std(1, keepdim=True)
    return (y_hat - y_hat.mean(1, keepdim=True)) / y_hat.std(1, keepdim=True) * std + mean


def test_cads_anneals_the_class_embedding_and_matches_a_hand_loop(eps: Bundled) -> None:
    """Integer labels: CADS reaches their embedding in every block, per branch, and the
    samples equal a hand loop (separate c / u calls) whose label embedders the test patches."""
    from guidekit import CADS
    from guidekit.context import StepContext

    steps, w, tau1, tau2, s = 3, 3.0, 0.2, 0.9, 0.5
    cads = CADS(tau1=tau1, tau2=tau2, noise_scale=s)
    embedders = [m for m in eps.transformer.modules() if type(m).__name__ == "LabelEmbedding"]
    assert len(embedders) == eps.transformer.config.num_layers
    res = sample(eps, CFG(w) | cads, LABELS, steps=steps, seed=4)
    assert [c.rows for c in res.calls] == [2 * B] * steps  # CADS adds no rows
    assert all(not m._forward_hooks for m in embedders)  # its hooks are gone
    again = sample(eps, CFG(w) | cads, LABELS, steps=steps, seed=4)
    assert torch.equal(res.images, again.images)
    plain = sample(eps, CFG(w), LABELS, steps=steps, seed=4)
    assert (res.images - plain.images).abs().amax() > 1e-3

    plan = eps.compile(CFG(w) | cads)
    sig = eps.sigmas(steps).tolist()
    now: dict[str, object] = {}

    def patch(module: torch.nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        i, cname = int(now["step"]), str(now["cond"])  # type: ignore[call-overload]
        ctx = StepContext(x=torch.zeros(1), sigma=sig[i], level=i, seed=4, prediction="eps",
                          noise=plan.noise, coefs={}, native={})
        n = cads.noise_for(ctx, cname, "class_embedding", out)
        return _cads_reference(out, plan.noise.t(sig[i]), n, tau1, tau2, s)

    handles = [m.register_forward_hook(patch) for m in embedders]
    try:
        x = torch.randn((B, 1, 8, 8), generator=torch.Generator().manual_seed(4)) * sig[0]
        null = torch.full_like(LABELS, 10)
        with torch.no_grad():
            for i in range(steps):
                r = torch.full((B,), sig[i])
                now.update(step=i, cond="cond")
                c = eps.model_fn(x, r, LABELS)
                now.update(cond="uncond")
                u = eps.model_fn(x, r, null)
                x = x + (sig[i + 1] - sig[i]) * (u + w * (c - u))
    finally:
        for h in handles:
            h.remove()
    assert plan.noise.t(sig[0]) > tau1  # the first step is annealed
    torch.testing.assert_close(res.images, x.clamp(-1, 1), rtol=0, atol=ATOL)


def test_diffusers_guiders_give_guidekits_samples(eps: Bundled) -> None:
    """The peer loop of the speed figures computes the same guidance as guidekit: diffusers'
    CFG guider = CFG(3); its PAG guider (last block, no perturbation at step 0) = CFG(3) +
    PAG(2) gated to sigma <= sigmas[1]."""
    from diffusers.guiders import ClassifierFreeGuidance, PerturbedAttentionGuidance

    from guidekit.models.guider_loop import pag_expression, sample_with_guider

    steps = 4
    ref = sample_with_guider(eps, ClassifierFreeGuidance(guidance_scale=3.0), LABELS,
                             steps=steps, seed=7)
    ours = sample(eps, CFG(3), LABELS, steps=steps, seed=7)
    torch.testing.assert_close(ours.images, ref.images, rtol=0, atol=ATOL)
    last = eps.transformer.config.num_layers - 1
    processors = [b.attn1.processor for b in eps.transformer.transformer_blocks]
    ref = sample_with_guider(eps, PerturbedAttentionGuidance(
        guidance_scale=3.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0,
        perturbed_guidance_stop=1.0, perturbed_guidance_layers=[last]), LABELS,
        steps=steps, seed=7)
    assert [b.attn1.processor for b in eps.transformer.transformer_blocks] == processors
    gated = sample(eps, pag_expression(3, 2, eps.sigmas(steps)), LABELS, steps=steps, seed=7)
    assert [c.rows for c in gated.calls] == [2 * B] + [3 * B] * (steps - 1)
    torch.testing.assert_close(gated.images, ref.images, rtol=0, atol=ATOL)
    plain = sample(eps, CFG(3), LABELS, steps=steps, seed=7)
    assert (plain.images - ref.images).abs().amax() > 1e-2  # PAG did change the samples


def test_labels_and_plans_are_checked_and_progress_is_printed(
    eps: Bundled, flow: Bundled, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="class indices"):
        sample(eps, CFG(3), [0, 11], steps=2)
    with pytest.raises(ValueError, match="bundled.compile"):
        sample(eps, flow.compile(CFG(3)), [0, 1], steps=2)
    plan = eps.compile(CFG(3))
    res = sample(eps, plan, [1, 2], steps=2, progress=True)
    assert res.plan is plan
    assert capsys.readouterr().err.count("step ") == 2


def test_attention_terms_run_in_the_main_call_and_modifiers_are_refused_clearly(
    eps: Bundled,
) -> None:
    res = sample(eps, "CFG(2) + SEG(2)", LABELS, steps=2)
    assert [c.rows for c in res.calls] == [3 * B] * 2
    # PLADIS / GAG / NAG change cross-attention, which a class-conditional DiT has none of
    for text in ("CFG(2) | PLADIS(2)", "CFG(2) | NAG(2)"):
        with pytest.raises(GuidanceValueError, match="no cross-attention"):
            sample(eps, text, LABELS, steps=2)


def test_max_rows_splits_the_cfg_call(eps: Bundled) -> None:
    res = sample(eps, CFG(3), LABELS, steps=2, max_rows=B)
    assert [c.rows for c in res.calls] == [B, B, B, B]
    full = sample(eps, CFG(3), LABELS, steps=2)
    torch.testing.assert_close(res.images, full.images, rtol=0, atol=ATOL)


def test_guidekit_compile_of_a_bundled_model(eps: Bundled) -> None:
    with pytest.raises(TypeError, match="prediction"):
        eps.compile(CFG(3), prediction="x0")
    plan = eps.compile("CFG(3) | APG(eta=0)")
    assert isinstance(plan, guidekit.Plan)


# Measured on the shipped weights (100 samples, 10 per class, 20 steps, seeds 0/1/2):
#   eps  unguided accuracy 0.85/0.90/0.85, FD 184/127/150; CFG(1.5) 0.97/0.94/0.96, FD 83/56/74
#   flow unguided accuracy 0.83/0.90/0.85, FD 186/123/139
# The bands leave room for other CPUs' rounding but catch a broken model (accuracy ~0.1, FD
# ~800), a wrong convention, or a too-good one (the main models are meant to be imperfect).
QUALITY_LABELS = torch.arange(10).repeat_interleave(10)


@pytest.mark.slow
def test_shipped_eps_reproduces_its_documented_quality(eps: Bundled) -> None:
    plain = evaluate(sample(eps, Cond(), QUALITY_LABELS, steps=20).images, QUALITY_LABELS)
    cfg = evaluate(sample(eps, CFG(1.5), QUALITY_LABELS, steps=20).images, QUALITY_LABELS)
    assert 0.78 <= plain.accuracy <= 0.95, plain
    assert 50 < plain.fd < 260, plain
    # CFG 1.5 improves both accuracy and FD here, at the cost of diversity
    assert cfg.accuracy >= 0.95 and cfg.accuracy > plain.accuracy, (plain, cfg)
    assert cfg.fd < plain.fd and cfg.diversity < plain.diversity, (plain, cfg)


@pytest.mark.slow
def test_shipped_flow_reproduces_its_documented_quality(flow: Bundled) -> None:
    plain = evaluate(sample(flow, Cond(), QUALITY_LABELS, steps=20).images, QUALITY_LABELS)
    assert 0.8 <= plain.accuracy <= 0.96, plain
    assert 50 < plain.fd < 260, plain
