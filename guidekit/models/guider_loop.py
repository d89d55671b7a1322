"""Euler sampling of a bundled model driven by one of diffusers' own guiders (the peer).

https://huggingface.co/docs/diffusers/main/en/api/guiders

This is the loop of diffusers' modular denoise blocks written out for the bundled DiT: at
every step the guider decides the batches (``set_state``, ``prepare_inputs``), the loop runs
one forward per batch (``prepare_models`` / forward / ``cleanup_models``: PAG's attention
hooks go in and out around each batch), and the guider combines the predictions. The Euler
update and the initial noise are those of :func:`guidekit.models.sample`, so with the same
guidance the two give the same samples; the speed figures of ``guidekit sweep`` time one
against the other.

diffusers' perturbation guiders enable their perturbed batch only strictly inside a step
window (``start_step < step < stop_step``), so with ``perturbed_guidance_start = 0`` step 0
is never perturbed: :func:`pag_expression` writes the guidekit expression that does the same.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from guidekit.models.sampling import SampleResult, initial_state


def pag_expression(w: float, s: float, sigmas: torch.Tensor) -> str:
    """guidekit's text for diffusers' ``PerturbedAttentionGuidance(w, s)`` with its window
    open from step 1 on: PAG gated to ``sigma <= sigmas[1]`` (``sigmas`` descending)."""
    return f"CFG({w:g}) + PAG({s:g}).between(0, {float(sigmas[1]) * (1 + 1e-9)!r})"


@torch.no_grad()
def sample_with_guider(
    bundled: Any,
    guider: Any,
    labels: Sequence[int] | torch.Tensor,
    *,
    steps: int = 20,
    seed: int = 0,
) -> SampleResult:
    """Sample one digit per label, each step's prediction combined by ``guider``.

    ``guider`` is a diffusers guider (``ClassifierFreeGuidance``,
    ``PerturbedAttentionGuidance``, ...); ``calls`` of the result stay empty (the guider
    decides the batches), ``seconds`` is the wall time of the loop.
    """
    y, sigmas, x = initial_state(bundled, labels, steps, seed)
    null = torch.full_like(y, bundled.null_class)
    net = bundled.transformer
    values = sigmas.tolist()
    start = time.perf_counter()
    for i in range(steps):
        s, s_next = values[i], values[i + 1]
        guider.set_state(step=i, num_inference_steps=steps, timestep=torch.tensor(s))
        batches = guider.prepare_inputs({"x": (x, x), "class_labels": (y, null)})
        rows = torch.full((y.shape[0],), s, device=x.device)
        for batch in batches:
            guider.prepare_models(net)
            try:
                batch.noise_pred = bundled.model_fn(batch.x, rows, batch.class_labels)
            finally:
                guider.cleanup_models(net)
        d = guider(batches).pred
        x = x + (s_next - s) * d
    seconds = time.perf_counter() - start
    return SampleResult(images=x.clamp(-1, 1).cpu(), calls=[], seconds=seconds, labels=y.cpu())
