"""The bundled models take a label per conditioning name: ``sample(..., conds={"neg": 3})``.

Oracles are hand-written Euler loops over the model's own prediction, one call per label.
"""

from __future__ import annotations

import pytest
import torch

from guidekit import CFG, Cond, GuidanceTypeError, GuidanceValueError, Uncond
from guidekit.models import Bundled, load, sample
from guidekit.models.bundled import network_prediction

B = 4
ATOL = 2e-3  # batched and separate calls round differently (see test_sampling.py)
LABELS = torch.tensor([0, 3, 7, 9])


@pytest.fixture(scope="module")
def eps() -> Bundled:
    return load("eps")


def _hand_loop(m: Bundled, steps: int, seed: int, combine: object,
               labels: dict[str, torch.Tensor]) -> torch.Tensor:
    sig = m.sigmas(steps).tolist()
    x = torch.randn((B, 1, 8, 8), generator=torch.Generator().manual_seed(seed)) * sig[0]
    with torch.no_grad():
        for i in range(steps):
            s = torch.full((B,), sig[i])
            p = {n: network_prediction(m.transformer, m.convention, x, s, y)
                 for n, y in labels.items()}
            x = x + (sig[i + 1] - sig[i]) * combine(**p)  # type: ignore[operator]
    return x.clamp(-1, 1)


def test_a_negative_digit_replaces_the_null_class_in_one_call(eps: Bundled) -> None:
    res = sample(eps, CFG(3, negative="neg"), LABELS, steps=3, seed=1, conds={"neg": 3})
    assert [(c.rows, c.branches) for c in res.calls] == [(2 * B, ("c", "neg"))] * 3
    ref = _hand_loop(eps, 3, 1, lambda c, n: n + 3 * (c - n),
                     {"c": LABELS, "n": torch.full((B,), 3)})
    torch.testing.assert_close(res.images, ref, rtol=0, atol=ATOL)


def test_three_labels_per_sample_share_one_call(eps: Bundled) -> None:
    neg = [1, 2, 8, 4]
    res = sample(eps, CFG(3) - (Cond("neg") - Uncond()), LABELS, steps=2, seed=3,
                 conds={"neg": neg})
    assert [(c.rows, c.branches) for c in res.calls] == [(3 * B, ("c", "u", "neg"))] * 2
    ref = _hand_loop(eps, 2, 3, lambda c, u, n: u + 3 * (c - u) - (n - u),
                     {"c": LABELS, "u": torch.full((B,), 10), "n": torch.tensor(neg)})
    torch.testing.assert_close(res.images, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("conds", "error", "words"),
    [
        ({"cond": 3}, GuidanceValueError, "the labels argument itself"),
        ({"neg": 11}, GuidanceValueError, r"conds\['neg'\] must hold class indices 0..9"),
        ({"neg": [1, 2]}, GuidanceValueError, "2 labels for 4 samples"),
        ({"neg": "three"}, GuidanceTypeError, r"conds\['neg'\] is a str"),
    ],
)
def test_bad_named_labels_are_refused_by_name(eps: Bundled, conds: dict, error: type,
                                              words: str) -> None:
    with pytest.raises(error, match=words):
        sample(eps, CFG(3, negative="neg"), LABELS, steps=1, conds=conds)


def test_a_missing_named_label_is_refused_by_name(eps: Bundled) -> None:
    with pytest.raises(GuidanceValueError, match="'neg'"):
        sample(eps, CFG(3, negative="neg"), LABELS, steps=1)


def test_the_demo_compares_cfg_with_a_negative_digit(tmp_path, capsys) -> None:
    from guidekit.models.cli import main

    args = ["demo", "--negative", "3", "--samples", "1", "--steps", "2", "--no-progress",
            "--out", str(tmp_path / "g.png")]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("CFG(1.5) ") for ln in lines)
    assert any(ln.startswith("CFG(1.5, negative='neg') ") for ln in lines)
    assert "negative 'neg' = digit 3 for every sample" in lines
    assert (tmp_path / "g.png").exists()


@pytest.mark.parametrize(
    ("extra", "words"),
    [(["-g", "CFG(2)"], "which no expression reads"), (["--toy"], "no digits"),
     (["--negative", "12"], "a digit 0..9")],
)
def test_the_demo_refuses_a_negative_it_cannot_use(extra, words, tmp_path, capsys) -> None:
    from guidekit.models.cli import main

    args = ["demo", "--negative", "3", *extra, "--samples", "1", "--steps", "1",
            "--no-progress", "--out", str(tmp_path / "g.png")]
    assert main(args) == 2
    assert words in capsys.readouterr().err
