"""Flux's joint attention: which tokens of a block's attention are the image's.

``FluxTransformer2DModel`` joins the streams TEXT FIRST: double-stream blocks concatenate
the text and image queries inside their attention module, single-stream blocks
concatenate the two streams before it, so a single-stream attention module cannot tell
them apart by itself. The text length is the length of the ``encoder_hidden_states`` the
model was called with; :class:`TextLength` records it with a forward pre-hook on the root
module, installed for the run and removed on exit. The attention engine then perturbs
the queries at positions ``text_length ..`` only (the image tokens), through the
``scaled_dot_product_attention`` call the Flux processor makes (diffusers' native
attention backend).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from guidekit.errors import GuidanceValueError

FLUX_MODELS = ("FluxTransformer2DModel",)
FLUX_ATTENTION = ("FluxAttention",)


def is_flux(model: Any) -> bool:
    return any(c.__name__ in FLUX_MODELS for c in type(model).__mro__)


def is_flux_attention(module: Any) -> bool:
    return any(c.__name__ in FLUX_ATTENTION for c in type(module).__mro__)


def check_native(path: str, module: Any) -> None:
    """Refuse a Flux attention whose processor does not call torch's SDPA (the engine
    intercepts ``scaled_dot_product_attention``: diffusers' native backend)."""
    backend = getattr(getattr(module, "get_processor")(), "_attention_backend", None)  # noqa: B009
    if backend not in (None, "native"):
        raise GuidanceValueError(
            f"layer {path!r} uses attention backend {backend!r}; the engine intercepts "
            f"torch's scaled_dot_product_attention (the native backend)"
        )


@attrs.define(eq=False)
class TextLength:
    """The text token count of the model call in progress (``encoder_hidden_states``)."""

    model: torch.nn.Module
    length: int | None = None
    _handle: Any = None

    def _record(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        text = kwargs.get("encoder_hidden_states")
        if text is None and len(args) > 1:
            text = args[1]
        self.length = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.ndim == 3 else None

    def current(self, where: str) -> int:
        if self.length is None:
            raise GuidanceValueError(
                f"layer {where!r}: the Flux model was called without encoder_hidden_states, so "
                f"guidekit cannot tell its image tokens from its text tokens"
            )
        return self.length

    def install(self) -> None:
        if self._handle is None:
            self._handle = self.model.register_forward_pre_hook(self._record, with_kwargs=True)

    def restore(self) -> None:
        handle, self._handle = self._handle, None
        self.length = None
        if handle is not None:
            handle.remove()
