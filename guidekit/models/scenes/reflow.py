"""The few-step scenes sibling: one reflow of the guided teacher (``scenes-fast``).

Rectified flow (Liu et al., https://arxiv.org/abs/2209.03003, section 2.2 "reflow"): draw
noise ``z``, solve the teacher's ODE from ``z`` to a sample ``x = ODE_teacher(z)``, then
train the student on the straight line between the two::

    x_sigma = (1 - sigma) x + sigma z,   target v = z - x,   sigma ~ U[0, 1]

Straightened paths are what make 1-4 Euler steps usable (one step: ``x = z - v(z, 1)``).
The teacher's ODE is guided, ``CFG(1.5)`` with 90 % of the captions and the empty caption
(the unconditional flow) for the other 10 %, so the student learns a guided flow for a
caption and keeps an unconditional one for ``""``: guidance is distilled into it, which
is why CFG on top of it is a poor fit (it guides twice) and the setting where attention-
space methods (GAG, PLADIS, NAG) are meant to help. 1.5 is about the teacher's best trade:
measured on 200 held-out captions at 20 steps, CFG 1.25 / 1.5 / 2 / 3 give attribute
accuracy 0.852 / 0.849 / 0.845 / 0.824 and FD 3461 / 7493 / 18427 / 36672 (unguided: 0.837,
2840); a first student distilled under CFG(3) inherited that FD (29000-35000). The student starts from the
teacher's weights (encoder and denoiser), trained jointly as the teacher was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import attrs
import torch

from guidekit.models.scenes.model import SceneModel
from guidekit.models.scenes.sample import sample_scenes
from guidekit.models.scenes.tokenizer import Tokenizer
from guidekit.models.train import TrainResult, _say, fit_with_ema


@attrs.frozen
class ReflowRecipe:
    """How the few-step sibling is distilled from its teacher."""

    steps: int = 1200
    pairs: int = 4000
    teacher_guidance: str = "CFG(1.5)"
    teacher_steps: int = 16
    uncond: float = 0.1
    batch: int = 64
    lr: float = 2e-4
    ema: float = 0.995
    chunk: int = 250


@attrs.frozen(eq=False)
class Pairs:
    """Teacher ODE pairs: ``noise`` and the teacher's ``samples`` from it ``[N, 3, 32, 32]``,
    and the captions (``""``: an unconditional pair) tokenised as ``ids`` / ``mask``."""

    noise: torch.Tensor
    samples: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor


def teacher_pairs(teacher: SceneModel, captions: Sequence[str], recipe: ReflowRecipe, *,
                  seed: int = 0, log: Callable[..., None] | None = _say) -> Pairs:
    """Solve the teacher's guided ODE from seeded noise for each caption (a share
    ``recipe.uncond`` of them replaced by ``""``), ``recipe.chunk`` captions per batch."""
    gen = torch.Generator().manual_seed(seed)
    drop = torch.rand(len(captions), generator=gen) < recipe.uncond
    caps = ["" if d else c for c, d in zip(captions, drop.tolist())]
    noise, samples = [], []
    for i, start in enumerate(range(0, len(caps), recipe.chunk)):
        part = caps[start:start + recipe.chunk]
        # sample_scenes draws its noise from the seed: one seed per chunk, kept with the pair
        r = sample_scenes(teacher, recipe.teacher_guidance, part, steps=recipe.teacher_steps,
                          seed=seed * 100_003 + i, clamp=False)
        noise.append(r.noise)
        samples.append(r.images)
        if log is not None:
            log(f"  teacher pairs {start + len(part):5d}/{len(caps)}  {r.seconds:.1f} s")
    ids, mask = Tokenizer().encode(caps)
    return Pairs(torch.cat(noise), torch.cat(samples), ids, mask)


def train_reflow(teacher: SceneModel, pairs: Pairs, recipe: ReflowRecipe, *, seed: int = 0,
                 steps: int | None = None, checkpoints: Sequence[int] = (),
                 on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
                 log: Callable[..., None] | None = _say) -> TrainResult:
    """Fine-tune a copy of the teacher's networks on straight lines between the pairs."""
    gen = torch.Generator().manual_seed(seed + 1)
    nets = copy.deepcopy(teacher.networks).requires_grad_(True)
    conv = teacher.convention

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, pairs.noise.shape[0], (recipe.batch,), generator=gen)
        z, x = pairs.noise[idx], pairs.samples[idx]
        sigma = torch.rand((recipe.batch,), generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        out = nets(conv, (1 - s) * x + s * z, sigma, pairs.ids[idx], pairs.mask[idx])
        return torch.nn.functional.mse_loss(out, z - x)

    return fit_with_ema(nets, batch_loss, steps=steps or recipe.steps, lr=recipe.lr,
                        ema=recipe.ema, log=log, log_every=50, checkpoints=checkpoints,
                        on_checkpoint=on_checkpoint)
