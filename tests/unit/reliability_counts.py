"""Count issue 11's reliability cases by expected outcome.

    python tests/unit/reliability_counts.py

Each case is one collected pytest item of the modules below; its outcome is its
``@pytest.mark.outcome(kind)`` ("error": a clear error naming the argument or term and the
fix; "correct": correct behaviour; "restored": a fault leaves state and model as they were),
or for test_parse.py and test_parse_errors.py (written before the marker) the kind of its
test function.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections import Counter
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
MODULES = (
    "unit/test_reliability.py",
    "unit/test_reliability_cases.py",
    "unit/test_reliability_faults.py",
    "unit/test_reliability_nonfinite.py",
    "unit/test_reliability_numerics.py",
    "unit/test_parse.py",
    "unit/test_parse_errors.py",
    "adapters/test_flow_reliability.py",
    "adapters/test_kdiffusion_reliability.py",
)
KINDS = ("error", "correct", "restored")
#: test_parse*.py's functions: malformed or hostile text is an error, the rest reads correctly
PARSE = {
    "test_parse_errors": "error",
    "test_library_errors_pass_through": "error",
    "test_library_errors_note_the_position": "error",
    "test_non_text_is_a_type_error": "error",
    "test_over_the_limits_is_a_parse_error": "error",
    "test_a_failing_processor_in_a_long_pipe_is_reported_where_it_stands": "error",
}


def outcome(item: pytest.Item) -> str | None:
    """The expected outcome of one collected case (``None``: unclassified)."""
    marker = item.get_closest_marker("outcome")
    if marker is not None:
        return str(marker.args[0])
    if Path(str(item.fspath)).name in ("test_parse.py", "test_parse_errors.py"):
        name = getattr(item, "originalname", item.name)
        return PARSE.get(name, "correct")
    return None


class _Collect:
    def __init__(self) -> None:
        self.kinds: Counter[str | None] = Counter()
        self.modules: Counter[str] = Counter()

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            self.kinds[outcome(item)] += 1
            self.modules[Path(str(item.fspath)).name] += 1


def count() -> tuple[Counter[str | None], Counter[str]]:
    """Cases by outcome and by module (collection only: nothing runs)."""
    plugin = _Collect()
    with contextlib.redirect_stdout(io.StringIO()):
        code = pytest.main(
            ["--collect-only", "-q", "-p", "no:cacheprovider", *(str(TESTS / m) for m in MODULES)],
            plugins=[plugin],
        )
    if code != 0:
        raise RuntimeError(f"collecting the reliability modules failed (pytest exit {code})")
    return plugin.kinds, plugin.modules


def main() -> int:
    kinds, modules = count()
    for name, n in sorted(modules.items()):
        print(f"{name:40} {n:4}")
    print(f"{'total':40} {sum(kinds.values()):4}")
    for kind in (*KINDS, None):
        if kinds.get(kind):
            print(f"  {kind or 'unclassified':38} {kinds[kind]:4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
