"""benchmarks/gpu.py runs end to end with --tiny on CPU and writes complete tables."""

from __future__ import annotations

import csv
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("sd3", "dit")
DTYPES = ("fp32", "bf16")
EXPRESSIONS = ("CFG", "CFG + PAG", "CFG + EMAG", "CFG + EMAG-Q", "CFG + SEG", "CFG + SAG")
MODES = ("guidekit one call", "guidekit per branch", "diffusers guider")
PEERS = {"CFG", "CFG + PAG", "CFG + SEG"}  # the expressions diffusers has a guider for


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu",
         "--steps", "2", "--repeats", "1", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "results.md").read_text().count("| sd3 | bf16 | CFG + SAG |") == 4  # 3 modes + drift

    rows = read(out / "results.csv")
    by_key = {(r["model"], r["dtype"], r["expression"], r["mode"]): r for r in rows}
    assert len(rows) == len(by_key)
    for key in itertools.product(MODELS, DTYPES, EXPRESSIONS, MODES):
        row = by_key[key]  # a row for every config, whatever happened to it
        _, _, expression, mode = key
        if mode != "diffusers guider":
            assert row["status"] == "ok", row
        elif expression not in PEERS:
            assert row["status"] == "n/a" and "no guider" in row["note"], row
        else:  # diffusers' PAG does not run on SD3's joint attention: recorded with its reason
            assert row["status"] == "ok" or row["status"].startswith("failed: "), row
        if row["status"] == "ok":
            for field in ("ms/step", "calls/step", "rows/step", "time / CFG"):
                assert math.isfinite(float(row[field])) and float(row[field]) > 0, (field, row)
            if mode != "diffusers guider" and key[:3] + ("diffusers guider",) in by_key and \
                    by_key[key[:3] + ("diffusers guider",)]["status"] == "ok":
                assert math.isfinite(float(row["guidekit / diffusers"])), row
    cfg_one = by_key[("dit", "fp32", "CFG", "guidekit one call")]
    assert float(cfg_one["time / CFG"]) == 1.0 and cfg_one["calls/step"] == "1"
    assert by_key[("dit", "fp32", "CFG", "guidekit per branch")]["calls/step"] == "2"
    assert by_key[("dit", "fp32", "CFG + PAG", "guidekit one call")]["rows/step"] == "3"
    # the peer runs one forward per condition
    assert by_key[("dit", "fp32", "CFG + PAG", "diffusers guider")]["calls/step"] == "3"

    drift = read(out / "drift.csv")
    assert {(d["model"], d["dtype"], d["expression"]) for d in drift} == set(
        itertools.product(MODELS, DTYPES, EXPRESSIONS))
    for d in drift:
        assert d["status"] == "ok", d
        a, r = float(d["max abs diff"]), float(d["max rel diff"])
        assert math.isfinite(a) and math.isfinite(r) and a >= 0 and r >= 0
        if d["dtype"] == "fp32":  # splitting changes rounding only
            assert r < 1e-4, d
