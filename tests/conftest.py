"""Shared pytest set-up: hypothesis profiles, ``import strategies``, and the ``laws`` marker.

Profiles: ``dev`` (few examples, random) for local runs and ``ci`` (more examples,
derandomized, failing examples printed as reproduction blobs). ``ci`` is loaded when the
``CI`` environment variable is set, ``dev`` otherwise; ``HYPOTHESIS_PROFILE=<name>`` wins
over both.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import attrs
import pytest
from hypothesis import settings

import guidekit.split

TESTS = Path(__file__).resolve().parent
LAWS = TESTS / "laws"

# Test modules import the shared strategies as a top-level module (`from strategies import
# ...`) from any folder, without tests/ having to be a package.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# deadline=None: the first example of a law pays for torch warm-up and compile caches, which
# would otherwise trip hypothesis's per-example deadline and make runs flaky. Both profiles
# derive from hypothesis's own defaults, not from whatever profile is loaded at import (recent
# hypothesis versions load a built-in "ci" profile by themselves when CI is set).
_BASE = settings.get_profile("default")
settings.register_profile("dev", parent=_BASE, max_examples=50, deadline=None)
settings.register_profile(
    "ci", parent=_BASE, max_examples=100, deadline=None, derandomize=True, print_blob=True
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


# Tests count model calls and Dynamo frames: the default split must not start timing trials
# when a loaded machine makes a tiny call slow. The shipped default is tested with injected
# clocks and memory readers in tests/unit/test_split_policy.py.
guidekit.split.DEFAULT = attrs.evolve(guidekit.split.SHIPPED, min_seconds=math.inf)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/laws with ``laws`` (select with ``-m laws``)."""
    for item in items:
        path = Path(str(item.path)).resolve()
        if LAWS == path or LAWS in path.parents:
            item.add_marker(pytest.mark.laws)
