"""Attention perturbations: frozen values that name layers, plus the math they apply.

A perturbation is the ``perturbation`` of a :class:`guidekit.branch.Branch`: a frozen,
hashable attrs value that holds no tensors. It names the layers it targets (``layers``;
``None`` means the architecture's documented default, resolved when the engine is
installed, see :mod:`guidekit.attention.layers`) and computes the attention of the rows
it owns from queries, keys and values in head layout ``[rows, heads, tokens, head_dim]``
(the plain-module protocol may also hand it ``[rows, tokens, dim]``; the identity map
does not care).

Perturbed-attention guidance (PAG), https://arxiv.org/abs/2403.17377: the perturbed
branch replaces the self-attention map of the chosen layers by the identity matrix, so
each token attends only to itself and the attention output is the value ``V`` itself.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import attrs
import torch

from guidekit.errors import GuidanceTypeError, GuidanceValueError

#: One layer address: an index into the model's named layer list, or a module path.
Layer = int | str
#: A normalised layer selection: a non-empty tuple of addresses, or ``None`` for the default.
Layers = tuple[Layer, ...] | None


def to_layers(value: Any) -> Any:
    """Normalise a layer selection to a tuple (``7 -> (7,)``, ``range(2) -> (0, 1)``).

    Accepts ``None`` (the architecture's default), one int or module path, or a list,
    tuple or range of them. Anything else is returned unchanged for
    :func:`check_layers` to reject with a message that names the field.
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple, range)):
        return tuple(_index(v) for v in value)
    if isinstance(value, (numbers.Integral, str)) and not isinstance(value, bool):
        return (_index(value),)
    return value


def _index(value: Any) -> Any:
    # NumPy / torch integer scalars become plain ints, so equal selections hash equal
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def check_layers(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: ``None`` or a non-empty tuple of distinct ints / non-empty strings."""
    where = f"{type(instance).__name__}({attribute.name}=...)"
    if hasattr(instance, "_name"):
        where = f"{instance._name}({attribute.name}=...)"
    if value is None:
        return
    if not isinstance(value, tuple):
        raise GuidanceTypeError(
            f"{where}: layers must be an int, a module path, or a list / tuple / range of "
            f"them (e.g. layers=(7, 8, 9) or layers='transformer_blocks.3.attn1'), got "
            f"{type(value).__name__} {value!r}"
        )
    if not value:
        raise GuidanceValueError(
            f"{where}: layers is empty; leave it out (None) for the architecture's default"
        )
    for item in value:
        ok_int = isinstance(item, int) and not isinstance(item, bool)
        ok_str = isinstance(item, str) and item.strip() == item and item != ""
        if not (ok_int or ok_str):
            raise GuidanceTypeError(
                f"{where}: each layer is an int index or a module path string, got "
                f"{type(item).__name__} {item!r}"
            )
    seen: set[Layer] = set()
    for item in value:
        if item in seen:
            raise GuidanceValueError(f"{where}: layer {item!r} is listed twice in {value!r}")
        seen.add(item)


def fmt_layers(layers: Layers) -> str:
    """Text of a layer selection as ``guidekit.parse`` reads it back: ``(7, 8, 9)``."""
    if layers is None:
        return "default"
    inner = ", ".join(repr(x) for x in layers)
    return f"({inner},)" if len(layers) == 1 else f"({inner})"


class AttentionPerturbation:
    """Base of attention perturbations (subclasses are ``@attrs.frozen`` with ``layers``).

    Subclasses define :meth:`attend`. ``needs_qk`` says whether the engine must compute
    queries and keys for the perturbed rows (the identity map needs only the values).
    ``self_only`` says the perturbation is defined for self-attention only (queries and
    keys come from the same tokens); the engine refuses cross-attention layers for it.
    """

    __slots__ = ()
    needs_qk: ClassVar[bool] = True
    self_only: ClassVar[bool] = True
    layers: Layers

    #: ``attend(query, key, value, *, mask=None, **extras)``: the attention output for the
    #: perturbed rows, shaped like ``query`` with the last axis of ``value``
    #: (``[rows, heads, tokens, head_dim]``). Keyword extras are passed only to ops that
    #: declare them: ``image=(start, stop)`` (joint attention: where the image keys sit;
    #: ops with ``joint = True``), ``scale`` and ``scope`` (stateful ops: the softmax
    #: scale, the layer and step state), ``size`` (SEG: the token grid). Declared as a
    #: callable, not a method, because each op takes its own extras.
    attend: Callable[..., torch.Tensor]


@attrs.frozen(repr=False)
class IdentityAttention(AttentionPerturbation):
    """PAG's perturbation, https://arxiv.org/abs/2403.17377: the self-attention map of the
    targeted layers becomes the identity, so the attention output is ``V`` (before the
    module's output projection, residual and rescale, which still apply).

    A mask is ignored: under the identity map every token attends to itself only, which
    no key-padding mask of a self-attention removes.
    """

    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    needs_qk: ClassVar[bool] = False
    #: in joint text-image attention the image queries attend to their own image key only
    joint: ClassVar[bool] = True

    def attend(
        self,
        query: torch.Tensor | None,
        key: torch.Tensor | None,
        value: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        image: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if image is not None:
            value = value[..., image[0] : image[1], :]
        if query is not None and query.shape[-2] != value.shape[-2]:
            raise GuidanceValueError(
                f"identity attention needs as many queries as keys (self-attention); got "
                f"{query.shape[-2]} queries and {value.shape[-2]} keys"
            )
        return identity_attention(value, heads=None if query is None else query.shape[-3])

    def __repr__(self) -> str:
        return f"IdentityAttention({'' if self.layers is None else fmt_layers(self.layers)})"


def identity_attention(value: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """``I @ V = V``: the output of an identity attention map.

    With grouped-query attention (fewer key/value heads than query heads, axis -3) the
    value heads are repeated to ``heads``, as ``scaled_dot_product_attention`` with
    ``enable_gqa=True`` shares them.
    """
    if heads is not None and value.ndim >= 3 and value.shape[-3] != heads:
        kv_heads = value.shape[-3]
        if heads % kv_heads:
            raise GuidanceValueError(
                f"{heads} query heads cannot share {kv_heads} key/value heads"
            )
        return value.repeat_interleave(heads // kv_heads, dim=-3)
    return value


def perturbations_in(branches: Iterable[Any]) -> tuple[Any, ...]:
    """Distinct non-None perturbations of ``branches``, in order of first appearance."""
    seen: dict[Any, None] = {}
    for b in branches:
        if b.perturbation is not None:
            seen.setdefault(b.perturbation, None)
    return tuple(seen)
