"""Token perturbation guidance (TPG): guide away from the model with shuffled tokens.

https://arxiv.org/abs/2506.10036 -- ``c + s (c - p)`` (with CFG: ``u + w (c - u) + s (c - p)``),
where ``p`` is the conditional prediction with the token order of the chosen blocks' input
hidden states shuffled. In guidekit ``TPG(s)`` is the direction ``s (c - p)``: the paper's
prediction is ``Cond() + TPG(s, layers=...)``, with CFG ``CFG(w) + TPG(s, layers=...)``.

``p`` rides in the same batched call as ``c`` and ``u``: the attention engine
(:func:`guidekit.attention.install`) permutes the tokens of each chosen block's
``hidden_states`` for the ``p`` rows only, just before the block runs
(:mod:`guidekit.attention.blocks`); ``layers`` indexes the BLOCK list as SLG's does
(:mod:`guidekit.attention.block_list`). The tokens are not put back afterwards: the block
and everything after it see the shuffled order (guidekit's reading of the paper; whether
the authors' code restores the order was not checked).

**The permutation** is explicit and reproducible: :func:`token_permutation` of the run's
seed (``guide(..., seed=...)``, ``reset(seed=...)``), the step index and the block's path,
over the block's token count (a hash, sorted: no random generator, so it traces under
``torch.compile``; checked on CPU only). It is redrawn at every step and differs per
block; the calls of one step (a row budget's chunks, a sampler's extra in-step calls at
the same step index) use the same one, and all ``p`` rows share it (the authors share it
across the batch). The authors' code draws a fresh ``torch.randperm`` from the global
generator at every call of every chosen block: guidekit keeps that kind of permutation
per step and block but ties it to the run's seed, so runs never share permutations and a
run repeats exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from guidekit.attention.ops import (
    AttentionPerturbation,
    Layers,
    check_layers,
    fmt_layers,
    to_layers,
)
from guidekit.branch import COND, MAIN, Branch
from guidekit.fields import Examples, finite_or_schedule, to_float
from guidekit.registry import register
from guidekit.terms.base import DirectionTerm

#: SplitMix64's constants (as signed int64 where they exceed 2**63)
_GOLDEN, _M1, _M2 = (c - 2**64 for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                          0x94D049BB133111EB))


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values (``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's step on int64 values (arithmetic mod 2**64): a bijection."""
    z = z + _GOLDEN
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def path_tag(path: str) -> int:
    """A block path as a number: ``h = (h * 131 + ord(ch)) mod (2**61 - 1)`` over its
    characters (plain Python arithmetic, which ``torch.compile`` folds to a constant)."""
    h = 0
    for ch in path:
        h = (h * 131 + ord(ch)) % (2**61 - 1)
    return h


def token_permutation(
    key: torch.Tensor, path: str, tokens: int, device: Any = None
) -> torch.Tensor:
    """The token order TPG gives block ``path`` over ``tokens`` tokens in the step whose
    ForwardState ``key`` is ``[seed, step]``: with ``mix`` SplitMix64's step (mod 2**64),
    ``b = mix(mix(seed) ^ step ^ path_tag(path))`` and the tokens sorted by
    ``mix(i + b)`` as signed 64-bit integers (``mix`` is a bijection: no ties).

    Only integer tensor operations (wrapping int64 arithmetic): traced by ``torch.compile``
    without a graph break, and no device's random generator (checked on CPU only).
    """
    key = key.to(device)
    b = _mix(_mix(key[0]) ^ key[1] ^ path_tag(path))
    return torch.argsort(_mix(torch.arange(tokens, dtype=torch.int64, device=device) + b))


@attrs.frozen(repr=False)
class TokenShuffle(AttentionPerturbation):
    """TPG's perturbation: the tokens of the input ``hidden_states`` of the blocks
    ``layers`` are permuted for the rows of its branch (see the module docstring)."""

    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    #: handled by :class:`~guidekit.attention.blocks.BlockSkipper`, not inside an attention
    skips_blocks: ClassVar[bool] = True
    skip: ClassVar[str] = "shuffle"
    needs_qk: ClassVar[bool] = False
    #: reads the step's ForwardState (seed, step) inside the forward
    needs_state: ClassVar[bool] = True
    #: no default block list: the blocks are the user's choice (SD3's SLG default is SLG's)
    default_blocks: ClassVar[bool] = False

    def attend(self, query: Any, key: Any, value: Any, **kw: Any) -> torch.Tensor:
        raise AssertionError("TPG shuffles block inputs; it never runs inside an attention layer")

    def permutation(self, state: Any, path: str, tokens: int, device: Any) -> torch.Tensor:
        """This step's permutation of block ``path`` (``state``: the step's ForwardState)."""
        return token_permutation(state.key, path, tokens, device)

    @property
    def where(self) -> str:
        return f"TPG(layers={fmt_layers(self.layers)})"

    def __repr__(self) -> str:
        return f"TokenShuffle({'' if self.layers is None else fmt_layers(self.layers)})"


@register
@attrs.frozen(repr=False)
class TPGTerm(DirectionTerm):
    """``scale * (c - p)``, ``p`` = ``c`` with the tokens entering the blocks ``layers``
    shuffled (https://arxiv.org/abs/2506.10036).

    ``layers``: indices into the model's BLOCK list (as :class:`~guidekit.terms.slg.SLGTerm`),
    module paths, or a list / tuple / range of them; there is no default (``None`` raises
    at install, listing the blocks).
    """

    scale: float = attrs.field(converter=to_float, validator=finite_or_schedule)
    layers: Layers = attrs.field(default=None, converter=to_layers, validator=check_layers)
    _name: ClassVar[str] = "TPG"
    _positional: ClassVar[tuple[str, ...]] = ("scale",)
    _example: ClassVar[str] = "TPG(3, layers=(0, 1))"
    field_examples: ClassVar[Examples] = {"layers": (None, (0, 1), -1)}

    @property
    def perturbation(self) -> Any:
        """The frozen perturbation value of the negative branch."""
        return TokenShuffle(self.layers)

    def negative(self) -> Branch:
        return Branch(model=MAIN, cond=COND, perturbation=self.perturbation)


TPG = TPGTerm
