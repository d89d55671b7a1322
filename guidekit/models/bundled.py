"""A bundled model ready for guidekit: the network, its noise convention and schedule.

``load("eps")`` returns a :class:`Bundled` whose ``model_fn(x, sigma_rows, class_labels)``
follows guidekit's model convention and whose ``compile`` passes the matching
``prediction`` and ``noise``, so an expression compiles and samples without further set-up::

    from guidekit import CFG
    from guidekit.models import load, sample

    eps = load("eps")
    plan = eps.compile(CFG(3))
    result = sample(eps, CFG(3), labels=torch.arange(10))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from guidekit.models.dit import CLASSES, NULL_CLASS, SHAPE, disable_label_dropout, dit_config
from guidekit.models.schedules import Convention, convention
from guidekit.models.store import read, weight_path

#: The shipped diffusion models.
MODEL_NAMES = ("eps", "flow", "eps-weak", "flow-weak")


def network_prediction(
    transformer: Any,
    conv: Convention,
    x: torch.Tensor,
    sigma: torch.Tensor,
    class_labels: torch.Tensor,
) -> torch.Tensor:
    """The network's raw prediction at sampler state ``x`` and noise levels ``sigma`` [rows].

    Shared by training and sampling, so both see the same input scaling and timesteps.
    """
    x_in, timestep = conv.model_input(x, sigma)
    labels = class_labels.to(device=x.device, dtype=torch.long)
    return transformer(x_in, timestep=timestep.to(x.device), class_labels=labels).sample


def compile_for(expr: Any, conv: Convention, owner: str, **kwargs: Any) -> Any:
    """``guidekit.compile`` of ``expr`` (text is parsed) with the prediction and noise of
    ``conv``; ``owner`` names the caller in the refusal of a ``prediction=`` / ``noise=``."""
    import guidekit

    if isinstance(expr, str):
        expr = guidekit.parse(expr)
    for key in ("prediction", "noise"):
        if key in kwargs:
            raise TypeError(f"{owner} sets {key}= itself")
    return guidekit.compile(expr, prediction=conv.prediction, noise=conv.guidekit_noise(),
                            **kwargs)


@attrs.define(eq=False)
class Bundled:
    """One shipped DiT with everything guidekit needs to sample it.

    ``prediction`` is "eps" or "flow" and ``noise`` the guidekit noise convention that
    ``model_fn``'s ``sigma`` follows ("ve" for eps, "flow" for flow; see
    :mod:`guidekit.models.schedules`). ``metadata`` is the training record of the file.
    """

    name: str
    transformer: Any
    prediction: str
    noise: str
    classes: int = CLASSES
    null_class: int = NULL_CLASS
    shape: tuple[int, int, int] = SHAPE
    metadata: dict[str, str] = attrs.field(factory=dict)

    @property
    def convention(self) -> Convention:
        return convention(self.prediction)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def model_fn(
        self, x: torch.Tensor, sigma_rows: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        """``prediction`` for ``x`` [rows, 1, 8, 8] at ``sigma_rows`` [rows], labels [rows]
        (``null_class`` for unconditional rows): guidekit's model convention."""
        return network_prediction(self.transformer, self.convention, x, sigma_rows, class_labels)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The sampling schedule: ``steps + 1`` descending noise levels ending in 0."""
        return self.convention.sigmas(steps)

    def compile(self, expr: Any, **kwargs: Any) -> Any:
        """``guidekit.compile`` with this model's prediction and noise (text is parsed)."""
        return compile_for(expr, self.convention, f"Bundled.compile ({self.name!r} model)",
                           **kwargs)

    def __repr__(self) -> str:
        layers = self.transformer.config.num_layers
        return f"<Bundled {self.name!r}: DiT {layers} layers, {self.prediction} / {self.noise}>"


def from_state(
    name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], device: Any = "cpu"
) -> Bundled:
    """A :class:`Bundled` from a state dict and its metadata (as written by training)."""
    from diffusers import DiTTransformer2DModel

    config = dit_config(
        int(metadata["layers"]), heads=int(metadata["heads"]), head_dim=int(metadata["head_dim"])
    )
    transformer: Any = DiTTransformer2DModel(**config)
    disable_label_dropout(transformer)
    transformer.load_state_dict({k: v.float() for k, v in tensors.items()})
    transformer.eval().requires_grad_(False).to(device)
    prediction = metadata["prediction"]
    return Bundled(
        name=name, transformer=transformer, prediction=prediction,
        noise=convention(prediction).noise, metadata=dict(metadata),
    )


def load(name: str, *, device: Any = "cpu", path: str | Path | None = None) -> Bundled:
    """Load a shipped model: "eps", "flow", "eps-weak" or "flow-weak" (float32, eval mode).

    ``path`` reads another file written by ``python -m guidekit.models.train``.
    """
    if name not in MODEL_NAMES and path is None:
        raise ValueError(f"unknown bundled model {name!r}: use one of {', '.join(map(repr, MODEL_NAMES))}")
    tensors, meta = read(path or weight_path(name))
    return from_state(name, tensors, meta, device)
