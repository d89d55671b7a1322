"""SEG's perturbation: self-attention with Gaussian-blurred queries.

https://arxiv.org/abs/2408.00760 (smoothed energy guidance). The perturbed branch ``g`` is
the conditional pass in which the chosen self-attention layers attend with their QUERIES
blurred over the image token grid by a Gaussian of standard deviation ``blur_sigma``
(blurring the queries blurs the attention logits, which smooths the energy whose gradient
the attention step is). As in the authors' SDXL code:

* the queries are taken as they enter the attention (after the module's q-norm, if any),
  laid out on the token grid ``(h, w)`` (row-major, as diffusers' patch embeddings and
  UNet attention flatten images), one channel per head and head dimension;
* the kernel has ``ceil(6 sigma) + 1`` taps, made odd (``ceil(6 sigma)`` when that is odd),
  is the normalised sampled Gaussian, and is applied separably with reflection padding;
  along an axis of ``n`` tokens it is shortened to at most ``n`` taps (``n + 1`` when ``n``
  is even), the largest odd size reflection padding allows (the authors clip the same
  way, using the height for both axes of their square grids; here each axis is clipped on
  its own, which is the same on a square grid);
* ``blur_sigma > 9999`` (``inf`` included) is the infinite blur: every query is replaced
  by the mean query over the grid, and no grid is needed.

Larger ``blur_sigma`` means more blur, as in the paper (diffusers' guider has this inverted,
see ``shared/reference/peers.md``). The grid ``(h, w)`` of a layer comes from the model:
the attention engine records the spatial size ``(H, W)`` of the model's input (a forward
pre-hook on the root module, see :class:`InputSize`) and each layer's grid is the one of
the same aspect ratio with its token count (:func:`token_grid`), so UNet layers at several
resolutions and non-square latents work. A model whose input is not an image latent (Flux's
packed tokens, a plain module fed tokens) needs ``install(..., grid=(H, W))``.
"""

from __future__ import annotations

import math
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
from guidekit.errors import GuidanceValueError
from guidekit.expr import fmt_number

#: ``blur_sigma`` above this is the infinite blur (the SEG authors' threshold).
INFINITE_BLUR = 9999.0


def is_infinite(blur_sigma: float) -> bool:
    """Whether ``blur_sigma`` means the infinite blur (every query -> the mean query)."""
    return blur_sigma > INFINITE_BLUR


def kernel_size(blur_sigma: float) -> int:
    """Taps of SEG's Gaussian: ``ceil(6 sigma) + 1``, made odd (before clipping to a grid)."""
    c = math.ceil(6 * blur_sigma)
    return c + 1 - c % 2


def axis_kernel_size(size: int, tokens: int) -> int:
    """``size`` clipped to an axis of ``tokens`` tokens: at most ``tokens`` taps (``tokens +
    1`` when even), so the reflection padding (``size // 2``) stays inside the axis."""
    return min(size, tokens if tokens % 2 else tokens + 1)


def gaussian_taps(size: int, blur_sigma: float, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """The normalised sampled Gaussian with ``size`` taps centred on the middle one."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-0.5 * (t / blur_sigma) ** 2)
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def _blur_axis(x: torch.Tensor, taps: torch.Tensor, axis: int) -> torch.Tensor:
    """Correlate ``x [N, C, h, w]`` with ``taps`` along ``axis`` (2 or 3), reflect padding."""
    k = taps.numel()
    if k == 1:
        return x
    c = x.shape[1]
    pad = k // 2
    if axis == 3:
        x = F.pad(x, (pad, pad, 0, 0), mode="reflect")
        weight = taps.view(1, 1, 1, k).expand(c, 1, 1, k)
    else:
        x = F.pad(x, (0, 0, pad, pad), mode="reflect")
        weight = taps.view(1, 1, k, 1).expand(c, 1, k, 1)
    return F.conv2d(x, weight, groups=c)


def gaussian_blur(x: torch.Tensor, blur_sigma: float) -> torch.Tensor:
    """SEG's separable Gaussian blur of ``x [N, C, h, w]`` over ``h, w`` (see the module
    docstring for the kernel size and its clipping); float16 / bfloat16 run in float32."""
    h, w = x.shape[-2:]
    size = kernel_size(blur_sigma)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    kh, kw = axis_kernel_size(size, h), axis_kernel_size(size, w)
    out = _blur_axis(work, gaussian_taps(kw, blur_sigma, work.dtype, work.device), 3)
    out = _blur_axis(out, gaussian_taps(kh, blur_sigma, work.dtype, work.device), 2)
    return out.to(x.dtype)


def token_grid(tokens: int, size: tuple[int, int]) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``tokens`` attention tokens over an input of spatial ``size``.

    ``(h, w)`` is ``size`` down-sampled by an integer factor ``f``, rounding down or up (a
    stride-2 convolution rounds up odd sizes): the one such grid with ``h * w == tokens``.
    Raises :class:`GuidanceValueError` when there is none or more than one.
    """
    height, width = size
    found: set[tuple[int, int]] = set()
    for f in range(1, max(height, width) + 1):
        for h, w in ((height // f, width // f), (-(-height // f), -(-width // f))):
            if h > 0 and w > 0 and h * w == tokens:
                found.add((h, w))
        if -(-height // f) * -(-width // f) < tokens:
            break
    if len(found) != 1:
        why = "no grid" if not found else f"several grids ({sorted(found)})"
        raise GuidanceValueError(
            f"cannot lay {tokens} attention tokens on a grid of the model input's aspect ratio "
            f"{height}x{width}: {why} fits; pass the input's spatial size explicitly with "
            f"guidekit.attention.install(..., grid=(H, W))"
        )
    return found.pop()


def blur_queries(query: torch.Tensor, blur_sigma: float, size: tuple[int, int] | None) -> torch.Tensor:
    """SEG's queries: ``query`` (``[rows, heads, tokens, dim]`` or ``[rows, tokens, dim]``)
    blurred over the token grid, or replaced by their mean for the infinite blur."""
    if is_infinite(blur_sigma):
        return query.mean(dim=-2, keepdim=True).expand_as(query)
    tokens = query.shape[-2]
    if size is None:
        raise GuidanceValueError(
            f"SEG(blur_sigma={fmt_number(blur_sigma)}) blurs the queries over the token grid, "
            f"but the grid of this layer's {tokens} tokens is unknown: the model's input is "
            f"not an image latent [B, C, H, W]; pass its spatial size with "
            f"guidekit.attention.install(..., grid=(H, W)) (or use the infinite blur, "
            f"blur_sigma=inf, which needs no grid)"
        )
    h, w = token_grid(tokens, size)
    rows, dim = query.shape[0], query.shape[-1]
    # [rows, *heads, tokens, dim] -> [rows, heads * dim, h, w]: one image per channel
    grid = query.movedim(-2, -1).reshape(rows, -1, h, w)
    blurred = gaussian_blur(grid, blur_sigma)
    return blurred.reshape(*query.shape[:-2], dim, tokens).movedim(-1, -2)


def _blur_sigma(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, float) or not value > 0:
        raise GuidanceValueError(
            f"SEG(blur_sigma=...) must be a number > 0 (the Gaussian's standard deviation in "
            f"tokens; above 9999 or inf: the infinite blur), got {value!r}"
        )


def _float(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


@attrs.frozen(repr=False)
class BlurredQueryAttention(AttentionPerturbation):
    """SEG's perturbation, https://arxiv.org/abs/2408.00760: self-attention of the targeted
    layers with Gaussian-blurred queries (see the module docstring).

    ``attend`` takes ``size``, the model input's spatial size the engine recorded, to find
    the layer's token grid, and the attention ``scale`` if the layer uses a custom one.
    """

    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    blur_sigma: float = attrs.field(default=math.inf, converter=_float, validator=_blur_sigma)
    #: the engine replaces only the queries of the layer's own attention call
    rewrites_query: ClassVar[bool] = True
    #: joint text-image attention (SD3): only the image queries are blurred, over the image
    #: grid; they still attend to the joint (image and text) keys
    joint: ClassVar[bool] = True

    @property
    def needs_grid(self) -> bool:
        """Whether the blur needs the token grid (every finite ``blur_sigma``)."""
        return not is_infinite(self.blur_sigma)

    def rewrite_query(self, query: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The blurred queries (see :func:`blur_queries`)."""
        return blur_queries(query, self.blur_sigma, size)

    def attend(
        self,
        query: torch.Tensor | None,
        key: torch.Tensor | None,
        value: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
        scale: float | None = None,
        image: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        assert query is not None and key is not None
        if image is None and query.shape[-2] != key.shape[-2]:
            raise GuidanceValueError(
                f"SEG blurs self-attention queries; got {query.shape[-2]} queries and "
                f"{key.shape[-2]} keys"
            )
        q = self.rewrite_query(query, size)
        return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale)

    def __repr__(self) -> str:
        parts = [] if self.layers is None else [fmt_layers(self.layers)]
        if self.blur_sigma != math.inf:
            parts.append(f"blur_sigma={fmt_number(self.blur_sigma)}")
        return f"BlurredQueryAttention({', '.join(parts)})"


@attrs.define(eq=False)
class InputSize:
    """Records the spatial size ``(H, W)`` of the model's input at every call, for SEG.

    A forward pre-hook on the root module reads the first positional argument (or the
    ``hidden_states`` / ``sample`` / ``x`` keyword): its last two axes when it has at least
    four (``[B, C, H, W]``, ``[B, C, F, H, W]``), else nothing. ``grid``, when given, is used
    instead and nothing is hooked.
    """

    model: torch.nn.Module
    grid: tuple[int, int] | None = None
    size: tuple[int, int] | None = None
    _handle: Any = None

    def __attrs_post_init__(self) -> None:
        if self.grid is not None:
            ok = (
                isinstance(self.grid, tuple) and len(self.grid) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.grid)
            )
            if not ok:
                raise GuidanceValueError(
                    f"grid must be the model input's spatial size as a tuple of two positive "
                    f"ints (H, W), got {self.grid!r}"
                )
            self.size = self.grid

    def _record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(
            (kwargs[k] for k in ("hidden_states", "sample", "x") if k in kwargs), None
        )
        if isinstance(x, torch.Tensor) and x.ndim >= 4:
            self.size = (int(x.shape[-2]), int(x.shape[-1]))
        else:
            self.size = None

    def install(self) -> None:
        if self.grid is None and self._handle is None:
            self._handle = self.model.register_forward_pre_hook(self._record, with_kwargs=True)

    def restore(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.remove()
        self.size = self.grid
