"""The sweep sharded over 2 CPU processes by torchrun gives the single process's numbers.

Launches ``python -m torch.distributed.run --nproc_per_node 2 --standalone -m guidekit
sweep`` (2 CPU ranks meeting in torchrun's store) on a tiny grid and compares its
``runs.csv`` with an in-process run: every column but the wall time and the rank that ran
the job must be equal, and both ranks must have run jobs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from guidekit.models.sweep import read_csv, run_sweep

ROOT = Path(__file__).resolve().parents[2]
GRID = dict(models=("eps",), methods=("none", "CFG", "Autoguidance", "CADS"), scales=(2.0,),
            seeds=(0, 1), per_digit=1, steps=2)


def _comparable(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "rank")} for r in rows]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path: Path) -> None:
    single = tmp_path / "single"
    run_sweep(**GRID, out=single, threads=1, speed=False, plots=False, progress=False,
              echo=None)
    sharded = tmp_path / "sharded"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        "-m", "guidekit", "sweep", "--models", "eps", "--methods", "none,CFG,Autoguidance,CADS",
        "--scales", "2", "--seeds", "2", "--samples", "1", "--steps", "2", "--threads", "1",
        "--device", "cpu", "--no-speed", "--no-plot", "--no-progress", "--out", str(sharded),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "8 jobs on 2 process(es)" in result.stdout
    a, b = read_csv(single / "runs.csv"), read_csv(sharded / "runs.csv")
    assert len(a) == len(b) == 8
    assert _comparable(a) == _comparable(b)
    assert {r["rank"] for r in a} == {"0"} and {r["rank"] for r in b} == {"0", "1"}
    # every job on the rank the round-robin shard gives it
    assert all(int(r["rank"]) == int(r["index"]) % 2 for r in b)
    assert (sharded / "summary.csv").exists()
