"""SLG skipping whole blocks together with CADS on the bundled DiT (issue 11): the label
embedding CADS hooks lives inside every block, so a skipped block runs on all rows."""

from __future__ import annotations

import torch

from guidekit import CADS, CFG, SLG
from guidekit.models import load, sample

LABELS = torch.tensor([1, 2])


def test_slg_with_cads_runs_in_one_call_and_equals_one_call_per_branch() -> None:
    eps = load("eps")
    expr = CFG(1.5) + SLG(1, layers=2) | CADS()
    one = sample(eps, expr, LABELS, steps=4, seed=3)
    assert [c.rows for c in one.calls] == [6] * 4  # c, u and the skipped-block rows together
    # one branch per call: the SLG call skips block 2 on all its rows, so no sub-batch at all
    per_branch = sample(eps, expr, LABELS, steps=4, seed=3, max_rows=2)
    assert [c.rows for c in per_branch.calls] == [2] * 12
    assert torch.allclose(one.images, per_branch.images, atol=2e-3)
    plain = sample(eps, CFG(1.5) + SLG(1, layers=2), LABELS, steps=4, seed=3)
    assert (one.images - plain.images).abs().max() > 1e-3  # CADS really annealed
