"""benchmarks/engine_floor.py: the hand-written steps equal guidekit's and the script runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("diffusers")


def test_hand_written_steps_equal_guidekit_and_the_table_is_complete() -> None:
    # the script refuses to time a floor that differs from guidekit's step (relative 1e-4),
    # so a zero exit says each hand-written step computes guidekit's prediction
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine_floor.py"), "--repeats", "2"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    out = proc.stdout
    for name in ("CFG(7) ", "CFG(7) + PAG(3) ", "CFG(7) + EMAG(1.5) ",
                 "CFG(7) + PAG(3) + EMAG(1.5) | APG(eta=0)"):
        assert name in out
    assert "max relative difference" in out
