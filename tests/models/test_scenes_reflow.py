"""The few-step sibling's reflow (issue 13): teacher pairs are the teacher's guided ODE from
their own noise, a share of them unconditional, and fine-tuning fits the straight line between
noise and sample (Liu et al., https://arxiv.org/abs/2209.03003, section 2.2)."""

from __future__ import annotations

import torch

from guidekit.models.scenes.model import SceneModel
from guidekit.models.scenes.reflow import ReflowRecipe, teacher_pairs, train_reflow
from guidekit.models.scenes.sample import sample_scenes
from guidekit.models.scenes.tokenizer import Tokenizer

CAPTIONS = ["a small red circle on the left on a black background",
            "a large blue square left of a small green triangle on a grey background"] * 4


def _teacher() -> SceneModel:
    m = SceneModel.fresh(seed=0, layers=1, head_dim=16, text_width=32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # wake the zero-initialised outputs: a fresh model predicts 0
        for p in m.networks.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return m


def test_pairs_are_the_teachers_guided_ode_from_their_noise() -> None:
    teacher = _teacher()
    recipe = ReflowRecipe(teacher_steps=3, uncond=0.5, chunk=3)
    pairs = teacher_pairs(teacher, CAPTIONS, recipe, seed=2, log=None)
    empty_ids, _ = Tokenizer().encode("")
    dropped = [bool((row[:2] == empty_ids[0, :2]).all() and row[2:].eq(0).all())
               for row in pairs.ids]
    assert 0 < sum(dropped) < len(CAPTIONS)  # p = 0.5 of 8: some of each
    assert pairs.noise.shape == pairs.samples.shape == (len(CAPTIONS), 3, 32, 32)
    # re-solve the first chunk's ODE by hand: the same noise, the same guidance, unclamped
    first = ["" if d else c for c, d in zip(CAPTIONS[:3], dropped[:3])]
    again = sample_scenes(teacher, recipe.teacher_guidance, first, steps=3, seed=2 * 100_003,
                          clamp=False)
    torch.testing.assert_close(pairs.noise[:3], again.noise)
    torch.testing.assert_close(pairs.samples[:3], again.images)
    # chunks draw different noise
    assert not torch.equal(pairs.noise[:3], pairs.noise[3:6])


def test_reflow_fits_straight_lines_and_keeps_the_teacher() -> None:
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.networks.state_dict().items()}
    recipe = ReflowRecipe(teacher_steps=2, chunk=8, batch=8, lr=1e-3)
    pairs = teacher_pairs(teacher, CAPTIONS, recipe, seed=0, log=None)
    conv = teacher.convention

    def line_loss(nets: torch.nn.Module) -> float:
        # the straight-line objective written out: x_s = (1 - s) x + s z, target z - x
        losses = []
        for s in (0.1, 0.5, 0.9):
            sigma = torch.full((len(CAPTIONS),), s)
            x_s = (1 - s) * pairs.samples + s * pairs.noise
            with torch.no_grad():
                out = nets(conv, x_s, sigma, pairs.ids, pairs.mask)
            losses.append(float(((out - (pairs.noise - pairs.samples)) ** 2).mean()))
        return sum(losses) / len(losses)

    result = train_reflow(teacher, pairs, recipe, seed=0, steps=60, log=None)
    assert line_loss(result.model) < 0.8 * line_loss(teacher.networks)
    # the teacher is copied, not trained
    assert all(torch.equal(v, teacher.networks.state_dict()[k]) for k, v in before.items())
    again = train_reflow(teacher, pairs, recipe, seed=0, steps=60, log=None)
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(),
                                                 again.model.state_dict().values()))
