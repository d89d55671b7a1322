"""The guidance algebra's laws, as data, checked with hypothesis over every registered term.

Each :class:`Law` pairs a strategy (built from ``tests/strategies/``, which draws from the
whole registry) with a check (``_law_checks.py``); :func:`test_law` runs hypothesis once per
law, :func:`test_law_example` each law's hand-picked examples. Compile's layout does not
depend on the hash seed either. The registry and the strategies: test_laws_registry.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _law_checks import (
    BATCHES,
    Law,
    check_add_associative,
    check_add_commutative,
    check_batched_equals_reference,
    check_cfg_endpoints,
    check_compile_deterministic,
    check_duplicates,
    check_gate_outside_adds_nothing,
    check_identity_pipes,
    check_nested_gates,
    check_parse_roundtrip,
    check_pipe_associative,
    check_rows_are_needed_branches,
    check_scalar_distributes,
    check_zero_direction,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import (
    SCALES,
    World,
    apg_lefts,
    directions,
    expressions,
    gate_bounds,
    piped,
    predictions,
    processors,
    worlds,
)

from guidekit import (
    APG,
    CADS,
    CFG,
    ICG,
    TCFG,
    Autoguidance,
    CFGZeroStar,
    Cond,
    PerpNeg,
    Rescale,
    Toward,
    Uncond,
)

LAWS: list[Law] = [
    Law(
        "add_associative",
        lambda: st.tuples(predictions(), directions(), directions(), directions(), worlds()),
        check_add_associative,
    ),
    Law(
        "add_commutative",
        lambda: st.tuples(predictions(), predictions(), directions(), directions(), worlds()),
        check_add_commutative,
    ),
    Law(
        "zero_direction_is_identity",
        lambda: st.tuples(predictions(), directions(), BATCHES, worlds()),
        check_zero_direction,
    ),
    Law(
        "scalar_distributes",
        lambda: st.tuples(predictions(), SCALES, SCALES, directions(), directions(), worlds()),
        check_scalar_distributes,
    ),
    Law(
        "cfg_endpoints",
        lambda: st.tuples(directions(), BATCHES, worlds()),
        check_cfg_endpoints,
        examples=(
            (Autoguidance(2) - (Uncond() - Cond()), 2, World(2, 3, "flow", "flow", (0.7, 0.3))),
        ),
    ),
    Law(
        "duplicates_add_no_rows",
        lambda: st.tuples(predictions(), directions(), BATCHES),
        check_duplicates,
        examples=(
            (CFG(7), Autoguidance(1.5) + Autoguidance(0.5, model="small"), 2),
            # p + d cancels u exactly, p + d + d does not: the rows may differ there
            (CFG(0.5), 0.5 * (Cond() - Uncond()), 1),
            # one named conditioning read by several terms is one row block
            (CFG(7, negative="neg") + Toward(2, "style"),
             Toward(1, "style", negative="neg") - (Cond("style") - Uncond()), 2),
            (PerpNeg(5, negative=("neg", "style")) + (ICG(2) - Cond("icg")),
             Toward(-1.5, "neg") + 0.5 * (Cond("style") - Cond("icg")), 3),
        ),
    ),
    Law(
        "rows_are_the_needed_branches",
        lambda: st.tuples(expressions(), BATCHES),
        check_rows_are_needed_branches,
    ),
    Law(
        "pipe_associative",
        lambda: st.tuples(apg_lefts(), processors(), processors(), processors(), worlds()),
        check_pipe_associative,
    ),
    Law("identity_pipes", lambda: st.tuples(piped(), worlds()), check_identity_pipes),
    Law(
        "parse_str_roundtrip",
        lambda: st.tuples(expressions(), directions(), processors(), processors()),
        check_parse_roundtrip,
    ),
    Law(
        "compile_deterministic",
        lambda: st.tuples(expressions(), worlds()),
        check_compile_deterministic,
    ),
    Law(
        "batched_equals_reference",
        lambda: st.tuples(expressions(), worlds(), st.sampled_from([None, 1, 3])),
        check_batched_equals_reference,
        examples=(
            (
                CFG(7) + Autoguidance(1.5) | APG(eta=0, norm_threshold=5, momentum=-0.5),
                World(2, 1, "eps", "ve", (7.0, 2.5, 1.0)),
                3,
            ),
            (CFG(3) + (TCFG(2) - CFGZeroStar(5)).between(0.3, 2.5) | Rescale(0.7) | CADS(),
             World(3, 2, "v", "ve", (7.0, 1.0, 0.3)), 1),
            # CFG-Zero*'s zero-init step outputs 0; rescaling it must not divide by std 0
            (CFGZeroStar(4, zero_init_steps=1) | Rescale(0.7),
             World(2, 0, "x0", "ve", (7.0, 1.0)), None),
            # u's coefficient is 1 up to rounding (1.0000000000000002): w = 1 - alpha_u is 0,
            # so APG has no CFG update to project, as for Uncond() | APG()
            (CFG(-1.99) + -1.99 * (Uncond() - Cond()) | APG(eta=0),
             World(1, 0, "x0", "ve", (7.0,)), None),
        ),
    ),
    Law(
        "nested_gates_intersect",
        lambda: st.tuples(
            predictions(), directions(), gate_bounds(), gate_bounds(), BATCHES, worlds()
        ),
        check_nested_gates,
    ),
    Law(
        "gated_direction_outside_adds_no_rows",
        lambda: st.tuples(predictions(), directions(), gate_bounds(), BATCHES),
        check_gate_outside_adds_nothing,
        examples=(
            # (0, 1] is off at sigma 0, whichever level the plan was asked about first
            (Cond(), Autoguidance(1), (0.0, 1.0), 1),
            (CFG(7), Uncond() - Cond(), (0.5, 7.0), 2),
        ),
    ),
]


@pytest.mark.parametrize("law", LAWS, ids=[law.name for law in LAWS])
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_law(law: Law, data: st.DataObject) -> None:
    law.check(data.draw(law.strategy, label=law.name))


EXAMPLES = [(law, ex) for law in LAWS for ex in law.examples]


@pytest.mark.parametrize(
    ("law", "example"), EXAMPLES, ids=[f"{law.name}-{i}" for i, (law, _) in enumerate(EXAMPLES)]
)
def test_law_example(law: Law, example: Any) -> None:
    law.check(example)


_LAYOUT_SCRIPT = """
import json
import guidekit as g
from guidekit import APG, CADS, CFG, TCFG, Autoguidance, CFGZeroStar, Cond, Rescale, Uncond

d = Autoguidance(1.5, model="weak") + Autoguidance(0.5, model="small").between(0.3, 4)
exprs = [
    CFG(7) + d | APG(eta=0, norm_threshold=5, momentum=-0.5) | Rescale(0.7),
    Uncond() + (Cond(model="small") - Uncond(model="weak")) + (Uncond() + d - Cond()).between(0, 2.5),
    CFGZeroStar(4, zero_init_steps=1) + (TCFG(3) - CFG(2)).between(1, 7) + d + d,
    Uncond(model="weak") + 2 * (d - d) + (Cond() - Uncond(model="small")) | CADS(),
    (CFG(3) + d).between(0.5, 20) + 0 * d | Rescale(0.3) | APG(eta=1),
]
out = []
for e in exprs:
    for rows in (None, 3):
        p = g.compile(e, prediction="eps", max_rows=rows)
        out.append([str(p), [(gr.model, [b.label for b in gr.branches]) for gr in p.groups],
                    [(lo, hi, [(repr(a), c) for a, c in pr.coefs], pr.formula)
                     for lo, hi, pr in p.regions()],
                    [p.rows(s, 2) for s in (30, 5, 2, 0.7, 0.4, 0.1)]])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_compile_layout_does_not_depend_on_the_hash_seed() -> None:
    outputs = []
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", _LAYOUT_SCRIPT], env=env, capture_output=True, text=True,
            cwd=Path(__file__).resolve().parents[2], timeout=120, check=False,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert json.loads(outputs[0]), "the script printed no layouts"
    assert outputs[0] == outputs[1], "compile's layout changed with PYTHONHASHSEED"
