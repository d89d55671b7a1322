"""The scenes tokenizer and token encoder (issue 13): fixed ids, padding, the mask."""

from __future__ import annotations

import pytest
import torch

from guidekit.models.scenes.data import generate
from guidekit.models.scenes.encoder import TokenEncoder
from guidekit.models.scenes.tokenizer import BOS, EOS, MAX_LENGTH, PAD, Tokenizer
from guidekit.models.scenes.vocab import WORDS

CAPTION = "a small red circle on the left on a black background"


def test_ids_are_fixed() -> None:
    tok = Tokenizer()
    assert (PAD, BOS, EOS) == (0, 1, 2)
    assert tok.vocab[:4] == ("<pad>", "<bos>", "<eos>", "a")
    assert tok.vocab_size == 3 + len(WORDS) == 28
    # pinned so that shipped weights keep meaning the same words
    assert [tok.ids[w] for w in ("small", "red", "circle", "background")] == [4, 6, 11, 27]


def test_padding_and_mask() -> None:
    tok = Tokenizer()
    ids, mask = tok.encode([CAPTION, ""])
    assert ids.shape == mask.shape == (2, MAX_LENGTH) and ids.dtype == torch.long
    n = len(CAPTION.split()) + 2
    assert ids[0, 0] == BOS and ids[0, n - 1] == EOS and (ids[0, n:] == PAD).all()
    assert mask[0].tolist() == [1] * n + [0] * (MAX_LENGTH - n)
    # the empty caption is the unconditional input: bos, eos, never an all-masked row
    assert ids[1, :3].tolist() == [BOS, EOS, PAD] and mask[1].sum() == 2
    assert tok.decode(ids) == [CAPTION, ""]


def test_every_generated_caption_fits() -> None:
    tok = Tokenizer()
    captions = generate(200, seed=1).captions
    ids, _ = tok.encode(captions)
    assert tok.decode(ids) == list(captions)


@pytest.mark.parametrize(
    ("caption", "words"),
    [("a small red dog", r"the word 'dog' is not in the scenes vocabulary"),
     ("a <pad> red", "the word '<pad>'"),
     (" ".join(["a"] * 15), "17 tokens with bos and eos, over max_length=16")],
)
def test_bad_captions_are_refused_by_name(caption: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Tokenizer().encode(caption)


def test_encoder_ignores_padded_positions() -> None:
    torch.manual_seed(0)
    enc = TokenEncoder(Tokenizer().vocab_size, width=16, layers=2, heads=2).eval()
    ids, mask = Tokenizer().encode([CAPTION, "a large blue square at the top on a grey background"])
    with torch.no_grad():
        h = enc(ids, mask)
        # whatever sits under the mask changes nothing
        junk = torch.where(mask.bool(), ids, torch.full_like(ids, 5))
        h2 = enc(junk, mask)
    assert h.shape == (2, MAX_LENGTH, 16)
    torch.testing.assert_close(h, h2, rtol=0, atol=1e-6)
    assert not h[~mask.bool()].any()
    assert h[mask.bool()].abs().sum(-1).min() > 0
    # attention is bidirectional: the first token sees the words after it
    other = Tokenizer().encode(CAPTION.replace("red", "blue"))
    with torch.no_grad():
        h3 = enc(*other)
    assert (h3[0, 0] - h[0, 0]).abs().max() > 1e-4


def test_encoder_refuses_bad_shapes() -> None:
    enc = TokenEncoder(28, width=8, layers=1, heads=2)
    with pytest.raises(ValueError, match="must both be"):
        enc(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
