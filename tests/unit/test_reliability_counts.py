"""The reliability modules hold at least 300 cases, each classified by expected outcome."""

from __future__ import annotations

from reliability_counts import KINDS, count


def test_at_least_300_cases_each_with_an_outcome():
    kinds, _ = count()
    assert None not in kinds, "a reliability case has no @pytest.mark.outcome(...)"
    assert set(kinds) <= set(KINDS)
    assert sum(kinds.values()) >= 300
