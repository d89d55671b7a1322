"""A word tokenizer over the captions' fixed vocabulary: fixed ids, padding, an attention mask.

Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, then :data:`~.vocab.WORDS` in order. A caption
becomes ``<bos> words... <eos>`` padded with ``<pad>`` to :data:`MAX_LENGTH`; the mask is 1
on the real tokens (bos and eos included). The empty caption ``""`` is ``<bos> <eos>``, the
unconditional input: never an all-masked row, whose cross-attention would have no keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from guidekit.models.scenes.vocab import WORDS

SPECIALS = ("<pad>", "<bos>", "<eos>")
PAD, BOS, EOS = 0, 1, 2
#: The longest caption (two objects) is 14 words, plus bos and eos.
MAX_LENGTH = 16


class Tokenizer:
    """``encode(captions) -> (ids, mask)``, both ``[B, max_length]`` int64."""

    def __init__(self, max_length: int = MAX_LENGTH) -> None:
        if max_length < 2:
            raise ValueError(f"Tokenizer(max_length={max_length}): bos and eos need 2 tokens")
        self.max_length = max_length
        self.vocab: tuple[str, ...] = (*SPECIALS, *WORDS)
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_ids(self, caption: str) -> list[int]:
        """``[bos, word ids..., eos]`` of one caption (no padding)."""
        out = [BOS]
        for word in caption.split():
            if word not in self.ids or word in SPECIALS:
                raise ValueError(
                    f"caption {caption!r}: the word {word!r} is not in the scenes vocabulary "
                    f"({', '.join(WORDS)})"
                )
            out.append(self.ids[word])
        out.append(EOS)
        if len(out) > self.max_length:
            raise ValueError(
                f"caption {caption!r} is {len(out)} tokens with bos and eos, over "
                f"max_length={self.max_length}"
            )
        return out

    def encode(self, captions: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` of a caption or a list of them, padded to ``max_length``."""
        if isinstance(captions, str):
            captions = [captions]
        if len(captions) == 0:
            raise ValueError("Tokenizer.encode: give at least one caption ('' is unconditional)")
        ids = torch.full((len(captions), self.max_length), PAD, dtype=torch.long)
        for i, text in enumerate(captions):
            row = self.token_ids(text)
            ids[i, : len(row)] = torch.tensor(row)
        return ids, (ids != PAD).long()

    def decode(self, ids: torch.Tensor) -> list[str]:
        """The captions of ``ids`` ``[B, L]`` (specials dropped)."""
        return [" ".join(self.vocab[i] for i in row if i > EOS) for row in ids.tolist()]
