"""The bundled DiT's fixes, the noise conventions and a tiny training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guidekit.models.data import stratified_split, to_pixels
from guidekit.models.dit import CLASSES, NULL_CLASS, build_dit, drop_labels, label_embedders
from guidekit.models.schedules import (
    EpsConvention,
    FlowConvention,
    ddpm_alphas_cumprod,
    karras_sigmas,
)
from guidekit.models.train import train_diffusion


def _tiny(layers: int = 1, seed: int = 0) -> torch.nn.Module:
    return build_dit(layers, heads=2, head_dim=16, generator=torch.Generator().manual_seed(seed))


def _inputs(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, 8, 8, generator=gen)
    t = torch.rand(rows, generator=gen) * 999
    y = torch.randint(0, CLASSES, (rows,), generator=gen)
    return x, t, y


def test_adaln_modulation_and_output_start_at_zero() -> None:
    model = _tiny(layers=2)
    for block in model.transformer_blocks:
        assert not block.norm1.linear.weight.any() and not block.norm1.linear.bias.any()
    for lin in (model.proj_out_1, model.proj_out_2):
        assert not lin.weight.any() and not lin.bias.any()
    # everything else is initialised (not left at zero)
    assert model.pos_embed.proj.weight.std() > 0
    assert model.transformer_blocks[0].attn1.to_q.weight.std() > 0
    x, t, y = _inputs(4)
    assert not model(x, timestep=t, class_labels=y).sample.any()


def test_label_dropout_happens_once_not_per_block() -> None:
    model = _tiny(layers=3).train()
    for emb in label_embedders(model):
        assert emb.dropout_prob == 0.0
        assert emb.embedding_table.num_embeddings == CLASSES + 1  # the null row exists
    with torch.no_grad():  # make the output depend on the labels
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    x, t, y = _inputs(256)
    torch.manual_seed(0)
    a = model(x, timestep=t, class_labels=y).sample
    b = model(x, timestep=t, class_labels=y).sample
    # in train mode diffusers' default would drop ~10 % of labels per block at random
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    null = model(x, timestep=t, class_labels=torch.full_like(y, NULL_CLASS)).sample
    assert (null - a).abs().amax() > 1e-3


def test_drop_labels_uses_the_null_class_at_rate_p() -> None:
    labels = torch.arange(10).repeat(2000)
    out = drop_labels(labels, 0.1, torch.Generator().manual_seed(0))
    dropped = out == NULL_CLASS
    assert 0.09 < float(dropped.float().mean()) < 0.11
    assert torch.equal(out[~dropped], labels[~dropped])
    assert torch.equal(drop_labels(labels, 0.0), labels)


def test_eps_convention_matches_ddpm() -> None:
    conv = EpsConvention()
    abar = ddpm_alphas_cumprod()
    sigma = ((1 - abar) / abar).sqrt()
    t = torch.tensor([0, 1, 250, 998, 999])
    np.testing.assert_allclose(conv.timestep(sigma[t]).numpy(), t.numpy(), atol=1e-3)
    # between two steps the timestep interpolates in log sigma
    mid = (sigma[10].log() * 0.25 + sigma[11].log() * 0.75).exp()
    assert float(conv.timestep(mid.view(1))) == pytest.approx(10.75, abs=1e-4)
    x0, n = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    s = sigma[t[1:4]]
    x_in, _ = conv.model_input(x0 + s.view(-1, 1, 1, 1) * n, s)
    ab = abar[t[1:4]].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_in, ab.sqrt() * x0 + (1 - ab).sqrt() * n)
    sig = conv.sigmas(20)
    assert len(sig) == 21 and sig[-1] == 0 and bool((sig[:-1] > sig[1:]).all())
    assert float(sig[0]) == pytest.approx(conv.sigma_max, rel=1e-5)
    assert float(sig[-2]) == pytest.approx(conv.sigma_min, rel=1e-5)
    assert conv.sigma_min == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-6)


def test_karras_and_flow_schedules() -> None:
    k = karras_sigmas(3, 1.0, 8.0, rho=1.0)
    torch.testing.assert_close(k, torch.tensor([8.0, 4.5, 1.0, 0.0]))
    conv = FlowConvention()
    torch.testing.assert_close(conv.sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    x0 = torch.randn(2, 1, 8, 8)
    x, sigma, target = conv.training_batch(x0, torch.Generator().manual_seed(0))
    n = target + x0
    torch.testing.assert_close(x, (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * n)


def _blobs(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy set: class k is a bright square at a class-dependent place."""
    labels = torch.arange(n) % CLASSES
    images = -torch.ones(n, 1, 8, 8)
    for i, k in enumerate(labels.tolist()):
        r, c = divmod(k, 4)
        images[i, 0, 2 * r : 2 * r + 3, 2 * c : 2 * c + 3] = 1.0
    return images, labels


@pytest.mark.slow
@pytest.mark.parametrize("conv", [EpsConvention(), FlowConvention()], ids=["eps", "flow"])
def test_tiny_training_run_lowers_the_loss(conv: EpsConvention | FlowConvention) -> None:
    images, labels = _blobs()
    result = train_diffusion(
        _tiny(), conv, images, labels, steps=60, batch=32, lr=3e-3, log=None, seed=0
    )
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < 0.7 * first, (first, last)
    assert not result.model.training
    # the EMA copy, not the raw weights, is returned; it moved away from the zero init
    assert result.model.proj_out_2.weight.abs().sum() > 0
    again = train_diffusion(
        _tiny(), conv, images, labels, steps=5, batch=32, lr=3e-3, log=None, seed=0
    )
    assert again.losses == result.losses[:5]  # seeded


def test_stratified_split_and_pixels() -> None:
    labels = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    train, test = stratified_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == len(labels)
    for c in range(10):
        n_c = (labels == c).sum()
        assert (labels[test] == c).sum() == round(0.2 * n_c)
    again = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], test)
    px = to_pixels(np.array([[0.0] * 63 + [16.0]]))
    assert px.shape == (1, 1, 8, 8) and float(px.min()) == -1 and float(px.max()) == 1
