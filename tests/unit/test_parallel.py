"""Branch parallelism (guidekit/parallel.py): ranks share a step's branch blocks and every
rank gets the same guided output as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from attention._tiny import dit_fn, tiny_dit

import guidekit
from guidekit import CFG, EMAG, PAG, GuidanceTypeError, GuidanceValueError
from guidekit.attention import install
from guidekit.branch import COND, UNCOND, Branch
from guidekit.parallel import shares

WORKER = Path(__file__).with_name("_parallel_worker.py")
C, U = Branch("main", COND), Branch("main", UNCOND)
P, E = Branch("main", COND, PAG(1).perturbation), Branch("main", COND, EMAG(1).perturbation)


def test_shares_deal_whole_blocks_and_give_every_rank_the_sources() -> None:
    # CFG: one block each; CFG + PAG: 2 and 1
    assert shares((C, U), frozenset(), 2) == (((0,), (1,)), ((0,), (1,)))
    assert shares((C, U, P), frozenset(), 2) == (((0, 2), (1,)), ((0, 2), (1,)))
    # CFG + EMAG: c, which EMAG averages, on both ranks; rank 0 sends it
    compute, send = shares((C, U, E), frozenset({C}), 2)
    assert compute == ((0, 2), (0, 1)) and send == ((0, 2), (1,))
    # more ranks than blocks: the last rank only joins the gather
    assert shares((C, U), frozenset(), 3)[0] == ((0,), (1,), ())


@pytest.fixture
def world_of_one(tmp_path: Path) -> Iterator[Any]:
    """A one-process gloo group in this process (file:// rendezvous)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0,
                            world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_compile_refuses_parallel_without_a_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(GuidanceValueError, match="init_process_group"):
        guidekit.compile(CFG(3), parallel=object())


def test_parallel_arguments_are_checked(world_of_one: Any) -> None:
    with pytest.raises(GuidanceTypeError, match="process group"):
        guidekit.compile(CFG(3), parallel="WORLD")
    with pytest.raises(GuidanceValueError, match="max_rows='auto'"):
        guidekit.compile(CFG(3), parallel=world_of_one, max_rows="auto")
    plan = guidekit.compile(CFG(3), parallel=world_of_one, max_rows=3)
    x = torch.randn(2, 4)
    with pytest.raises(GuidanceValueError, match="multiple of the batch"):
        guidekit.guide(plan, lambda x, s, y: x * y[:, None], cond={"y": torch.ones(2)},
                       uncond={"y": torch.zeros(2)})(x, 1.0)


def test_one_rank_equals_the_plain_plan_with_the_engine(world_of_one: Any) -> None:
    model = tiny_dit()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = []
    for parallel in (None, world_of_one):
        plan = guidekit.compile(CFG(3) + PAG(2, layers=[0]) + EMAG(1, layers=(1, 2)),
                                parallel=parallel)
        with torch.no_grad(), install(model, plan) as around:
            g = guidekit.guide(plan, dit_fn(model), cond={"class_labels": torch.tensor([3, 7])},
                               uncond={"class_labels": torch.tensor([0, 0])}, around_call=around)
            out.append(torch.stack([g(x, 5.0), g(x, 2.0)]))
    assert torch.equal(out[0], out[1])


@pytest.mark.slow
def test_two_cpu_processes_under_torchrun_equal_one_process(tmp_path: Path) -> None:
    """torchrun, 2 gloo ranks, a tiny diffusers DiT, 6 Euler steps: CFG, CFG + PAG, CFG + EMAG,
    CFG + PAG + gated EMAG-Q, CFG + SAG equal one process; EMAG's state equals on both."""
    out = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(WORKER), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world"] == 2
    for name in ("CFG", "CFG + PAG", "CFG + EMAG", "CFG + PAG + EMAGQ", "CFG + SAG"):
        r = report[name]
        assert r["diff"] <= 1e-6 * r["scale"], (name, r)
        assert r["rank_diff"] == 0.0, (name, r)  # every rank returns the same sample
        for per_rank in r["states"].values():
            for s in per_rank:  # the averages and the statistic, on EVERY rank
                assert s["ema_diff"] <= 1e-6 and s["delta_diff"] <= 1e-6, (name, s)
                assert s["same_keys"] and s["steps"][0] == s["steps"][1], (name, s)
                # also a rank that computed none of the perturbed rows knows which layer
                # they used
                assert s["used"][0] == s["used"][1], (name, s)
    # each rank ran its share: CFG 1 block of B = 2 rows instead of 2, CFG + PAG 2 and 1
    assert report["CFG"]["rows_rank"] == [[2] * 6, [2] * 6]
    assert report["CFG + PAG"]["rows_rank"] == [[4] * 6, [2] * 6]
    # CFG + EMAG: c on both ranks (EMAG averages it), u on one, e on the other
    assert report["CFG + EMAG"]["rows_rank"] == [[4] * 6, [4] * 6]
    emag = report["CFG + EMAG"]["states"]["EMAG"]
    assert emag[0]["used"][0] == emag[0]["used"][1] is not None  # rank 0 ran the e rows
