"""SAG's degraded input: blur what the model attends to, then ask the model again.

https://arxiv.org/abs/2210.00939 (self-attention guidance). From the UNCONDITIONAL pass
of the step: take the post-softmax self-attention map ``A`` of one layer, average it over
heads and sum it over queries (the attention each token RECEIVES), and mask the tokens
that receive more than ``threshold`` (1: more than average); upsample the mask ``M`` to the
latent grid (nearest). With ``x0`` and ``eps`` of the unconditional prediction::

    x0_blur = M * blur(x0) + (1 - M) * x0       (Gaussian, kernel 9, sigma 1)
    x_deg   = a(sigma) x0_blur + b(sigma) eps   (re-noised with the predicted noise)

and the negative ``d`` is the unconditional prediction at ``x_deg``. ``d`` needs the first
call's map and output, so it is a DEPENDENT branch: the plan runs it as a second call
after the first (``print(plan)`` shows both). The blur pads by reflection, as the SAG
authors' Stable Diffusion code does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F

from guidekit.attention.ops import (
    AttentionPerturbation,
    Layers,
    check_layers,
    fmt_layers,
    to_layers,
)
from guidekit.branch import UNCOND, Branch
from guidekit.errors import GuidanceValueError
from guidekit.spaces import Noise, convert
from guidekit.state import ForwardState


def gaussian_kernel(size: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``size`` taps (centred) and std ``sigma``."""
    half = (size - 1) / 2
    t = torch.arange(size, dtype=torch.float64) - half
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur_2d(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` over ``H, W``, reflection padding."""
    k = gaussian_kernel(size, sigma, x.dtype).to(x.device)
    c = x.shape[1]
    pad = size // 2
    if pad >= min(x.shape[-2:]):
        raise GuidanceValueError(
            f"a {size}-tap blur with reflection padding needs a latent of at least "
            f"{pad + 1}x{pad + 1}, got {x.shape[-2]}x{x.shape[-1]}: pass a smaller kernel"
        )
    h = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    h = F.conv2d(h, k.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    return F.conv2d(h, k.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``tokens`` attention tokens over an ``height x width`` latent
    (same aspect ratio, an integer down-sampling factor)."""
    f = math.sqrt(height * width / tokens) if tokens else 0.0
    fi = round(f)
    if fi < 1 or abs(f - fi) > 1e-6 or height % fi or width % fi:
        raise GuidanceValueError(
            f"cannot lay {tokens} attention tokens on a {height}x{width} latent as a grid of "
            f"the same aspect ratio; SAG needs an image self-attention layer"
        )
    return height // fi, width // fi


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise GuidanceValueError(
            f"SAG({attribute.name}=...) must be a positive number, got {value!r}"
        )


def _odd(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise GuidanceValueError(f"SAG(kernel=...) must be an odd whole number, got {value!r}")


@attrs.define(eq=False)
class SAGMemo:
    """The attention each sample's tokens received in the unconditional rows this step."""

    path: str | None = None
    received: torch.Tensor | None = None
    seen: int = 0


@attrs.frozen(repr=False)
class SAGDegrade(AttentionPerturbation):
    """The dependent branch of SAG: the unconditional pass on the degraded input."""

    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    blur_sigma: float = attrs.field(default=1.0, converter=float, validator=_positive)
    kernel: int = attrs.field(default=9, validator=_odd)
    threshold: float = attrs.field(default=1.0, converter=float, validator=_positive)
    #: watched in the first call (its map), computed in the second (its input)
    stateful: ClassVar[bool] = True
    dependent: ClassVar[bool] = True
    perturbs: ClassVar[bool] = False
    single_layer: ClassVar[bool] = True
    joint: ClassVar[bool] = True
    source: ClassVar[str] = UNCOND
    averages: ClassVar[str] = "map"

    # -- run state: nothing survives the step ----------------------------------------------
    def init_state(self) -> None:
        return None

    def selected(self, state: Any, candidates: tuple[str, ...]) -> None:
        return None

    def commit(self, state: Any, memo: Any) -> None:
        return None

    # -- first call: watch the unconditional rows ------------------------------------------
    def observe(
        self, scope: Any, probs: torch.Tensor | None, query: torch.Tensor,
        image: tuple[int, int] | None = None,
    ) -> None:
        assert probs is not None
        if image is not None:  # joint attention: image queries attending to image keys
            probs = probs[..., image[0] : image[1]]
        fs: ForwardState = scope.state
        memo: SAGMemo = fs.memo(self, SAGMemo)
        if memo.path is not None and memo.path != scope.path:
            raise GuidanceValueError(f"{self!r} watches one layer, not {memo.path!r} and {scope.path!r}")
        memo.path = scope.path
        received = probs.detach().float().mean(dim=1).sum(dim=1)  # [rows, K]
        if memo.received is None:
            memo.received = received.new_zeros((fs.batch, received.shape[-1]))
        memo.received[scope.sample : scope.sample + received.shape[0]] = received
        memo.seen += received.shape[0]

    def attend(self, query: Any, key: Any, value: Any, **kw: Any) -> torch.Tensor:
        raise AssertionError("SAG's branch is never perturbed inside a layer")

    # -- second call: its input ---------------------------------------------------------------
    def prepare(
        self,
        x: torch.Tensor,
        sigma: float,
        native: Mapping[Branch, torch.Tensor],
        fs: ForwardState | None,
        prediction: str,
        noise: Noise,
        branch: Branch,
    ) -> torch.Tensor:
        """The degraded input ``x_deg`` of this step (see the module docstring)."""
        memo = None if fs is None else fs.memos.get(self)
        if memo is None or memo.received is None or memo.seen < x.shape[0]:
            raise GuidanceValueError(
                f"{self!r} has no attention map from this step's unconditional rows: install "
                f"the attention engine (guidekit.attention.install) for the whole run"
            )
        if x.ndim != 4:
            raise GuidanceValueError(
                f"SAG blurs an image latent [B, C, H, W]; got x of shape {list(x.shape)}"
            )
        u = native[Branch(model=branch.model, cond=UNCOND)]
        x0 = convert(u, prediction, "x0", x, sigma, noise)
        eps = convert(u, prediction, "eps", x, sigma, noise)
        return self.degrade(x0, eps, memo.received, sigma, noise)

    def degrade(
        self, x0: torch.Tensor, eps: torch.Tensor, received: torch.Tensor, sigma: float,
        noise: Noise,
    ) -> torch.Tensor:
        height, width = x0.shape[-2:]
        h, w = token_grid(received.shape[-1], height, width)
        mask = (received > self.threshold).to(x0.dtype).view(-1, 1, h, w)
        mask = F.interpolate(mask, size=(height, width), mode="nearest")
        blurred = gaussian_blur_2d(x0, self.kernel, self.blur_sigma)
        x0_deg = mask * blurred + (1 - mask) * x0
        a, b = noise.coefficients(sigma)
        return a * x0_deg + b * eps

    def __repr__(self) -> str:
        parts = [] if self.layers is None else [fmt_layers(self.layers)]
        if self.blur_sigma != 1.0:
            parts.append(f"blur_sigma={self.blur_sigma:g}")
        if self.kernel != 9:
            parts.append(f"kernel={self.kernel}")
        if self.threshold != 1.0:
            parts.append(f"threshold={self.threshold:g}")
        return f"SAGDegrade({', '.join(parts)})"
