"""compile() and Plan: layout, active branches, call and row counts, spaces, explain."""

import math

import pytest
import torch

import guidekit as gk
from guidekit import APG, CFG, TCFG, Autoguidance, Cond, Rescale, Uncond

B = 3


class Recorder:
    """A model that records every call and returns a row-dependent, deterministic output."""

    def __init__(self, offset: float = 0.0):
        self.calls: list[tuple[int, dict]] = []
        self.offset = offset

    def __call__(self, x, sigma, tag):
        self.calls.append((x.shape[0], {"tag": tag.clone(), "sigma": sigma.clone()}))
        return x * 0.5 + tag.view(-1, 1) + self.offset


def conds():
    return {"cond": {"tag": torch.zeros(B)}, "uncond": {"tag": torch.ones(B)}}


def run(plan, sigma=1.0, **kw):
    model, weak = Recorder(), Recorder(offset=10.0)
    state = plan.init()
    x = torch.arange(B * 2, dtype=torch.float64).view(B, 2)
    y, state = plan.step(state, x, sigma, conds(), {"main": model, "weak": weak}, **kw)
    return y, model, weak, x


def test_layout_order_is_documented_and_independent_of_expression_order():
    p1 = gk.compile(Autoguidance(1) + Uncond() - Uncond() + CFG(3))
    p2 = gk.compile(CFG(3) + Autoguidance(1))
    for p in (p1, p2):
        assert [(g.model, [b.label for b in g.branches]) for g in p.groups] == [
            ("main", ["c", "u"]), ("weak", ["c@weak"])
        ]


def test_one_call_per_forward_group_with_active_rows():
    plan = gk.compile(CFG(3) + Autoguidance(1))
    y, model, weak, x = run(plan)
    assert [n for n, _ in model.calls] == [2 * B]
    assert [n for n, _ in weak.calls] == [B]
    # rows: cond block then uncond block
    assert model.calls[0][1]["tag"].tolist() == [0.0] * B + [1.0] * B
    c, u, cw = x * 0.5, x * 0.5 + 1, x * 0.5 + 10
    torch.testing.assert_close(y, u + 3 * (c - u) + (c - cw))
    assert plan.rows(1.0, B) == 3 * B and plan.nfe(1.0, B) == 2


def test_cfg_one_drops_the_unconditional_rows():
    plan = gk.compile(CFG(1))
    y, model, _, x = run(plan)
    assert [n for n, _ in model.calls] == [B]
    torch.testing.assert_close(y, x * 0.5)


def test_interval_drops_branches_outside():
    plan = gk.compile(CFG(3) + Autoguidance(1).between(0.5, 2))
    assert plan.rows(5.0, B) == 2 * B and plan.rows(2.0, B) == 3 * B
    assert plan.rows(0.5, B) == 2 * B  # lo is excluded
    _, _, weak, _ = run(plan, sigma=5.0)
    assert weak.calls == []


def test_row_budget_splits_into_fewest_calls():
    plan = gk.compile(CFG(3) + Autoguidance(1), max_rows=4)
    y_split, model, weak, x = run(plan)
    assert [n for n, _ in model.calls] == [4, 2]
    assert [n for n, _ in weak.calls] == [3]
    assert plan.nfe(1.0, B) == 3
    y_one, *_ = run(gk.compile(CFG(3) + Autoguidance(1)))
    torch.testing.assert_close(y_split, y_one)


def test_sigma_reaches_the_model_as_one_value_per_row():
    plan = gk.compile(CFG(2))
    _, model, _, _ = run(plan, sigma=torch.full((B,), 0.25))
    assert model.calls[0][1]["sigma"].tolist() == [0.25] * (2 * B)


def test_output_space_conversion():
    plan = gk.compile(CFG(2), prediction="eps", noise="ve")
    y_eps, _, _, x = run(plan, sigma=2.0)
    y_x0, *_ = run(plan, sigma=2.0, output="x0")
    torch.testing.assert_close(y_x0, x - 2.0 * y_eps)


def test_print_and_explain_show_rows_calls_and_formula():
    plan = gk.compile(CFG(3) + Autoguidance(1).between(0.5, 2) | APG(eta=0))
    text = str(plan)
    assert "forward groups: main [c u]; weak [c@weak]" in text
    assert "out = 4·c - 2·u - c@weak | APG()" in text
    explained = plan.explain([4.0, 2.0, 1.0, 0.25, 0.0], batch=2)
    assert "0 " in explained and "main[c u] 1x (2x2=4)" in explained
    assert "weak[c@weak] 1x (1x2=2)" in explained
    assert "total: 4 steps, 6 model calls, 20 rows" in explained


def test_print_names_the_branch_cfgpp_renoises_with():
    """CFG++ re-noises inside the sampler's step: print(plan) says with what, and who steps it."""
    text = str(gk.compile(gk.CFGpp(0.6) + gk.PAG(1)))
    assert "re-noise: with u (Uncond()) -- CFG++ needs the sampler's cooperation" in text
    assert "KDiffusionGuided.sample" in text and "FlowGuided(solver='euler')" in text
    named = str(gk.compile(gk.CFGpp(0.6, negative="neg").between(1, 10)))
    assert "re-noise: with neg (Cond('neg'))" in named and "gated off" in named
    assert "re-noise" not in str(gk.compile(CFG(3)))


def test_nonlinear_atoms_and_processor_requirements():
    plan = gk.compile(TCFG(3) | Rescale(0.7))
    assert [b.label for b in plan.branches] == ["c", "u"]
    plan = gk.compile(Uncond() | Rescale(0.7))
    assert [b.label for b in plan.program(1.0).branches] == ["c", "u"]  # Rescale reads c


def test_compile_is_deterministic():
    e = CFG(3) + Autoguidance(1).between(0.5, 2) - Autoguidance(0.5, model="tiny") | APG()
    p1, p2 = gk.compile(e), gk.compile(e)
    assert p1.groups == p2.groups and p1.entries == p2.entries
    assert str(p1) == str(p2)


def test_zero_and_cancelled_terms_need_no_model():
    plan = gk.compile(Cond() + 0 * Autoguidance(1) + Autoguidance(2) - Autoguidance(2))
    assert plan.models == ("main",)
    assert plan.rows(1.0, 1) == 1


def test_breakpoints_partition_noise_levels():
    plan = gk.compile(CFG(3).between(1, 10) + Autoguidance(1).between(0.5, 2))
    assert plan.breakpoints == (0.5, 1.0, 2.0, 10.0)
    los = [lo for lo, _, _ in plan.regions()]
    assert los == [10.0, 2.0, 1.0, 0.5, 0.0]
    assert math.isinf(plan.regions()[0][1])


def test_plan_needs_prediction_and_valid_space():
    with pytest.raises(gk.GuidanceTypeError, match="direction"):
        gk.compile(Autoguidance(1))
    with pytest.raises(gk.GuidanceValueError, match="unknown prediction space 'noise'"):
        gk.compile(CFG(3), prediction="noise")


def test_around_call_sees_each_calls_row_layout():
    import contextlib

    seen = []

    @contextlib.contextmanager
    def around(layout):
        seen.append((layout.model, layout.rows, [(b.label, s, e) for b, s, e in layout.blocks]))
        yield

    plan = gk.compile(CFG(3) + Autoguidance(1), max_rows=4)
    run(plan, around_call=around)
    assert seen == [
        ("main", 4, [("c", 0, 3), ("u", 3, 4)]),
        ("main", 2, [("u", 0, 2)]),
        ("weak", 3, [("c@weak", 0, 3)]),
    ]


class _Kernels(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators dispatched, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _by_terms(plan, sigma, native):
    """The combine term by term, each coefficient times its branch (the definition)."""
    prog = plan.program(sigma)
    return sum(coef * native[b].double() for b, coef in prog.coefs)


@pytest.mark.parametrize(("expr", "kernel"), [
    (CFG(3), "lerp"),  # two weights summing to one
    (CFG(3) + (CFG(2, negative="neg") - CFG(2)), "mm"),  # three rows: one product
])
def test_one_kernel_combines_the_rows_of_one_call(expr, kernel):
    plan = gk.compile(expr)
    prog = plan.program(1.0)
    assert prog.row_weights == tuple(dict(prog.coefs)[b] for b in prog.groups[0].branches)
    def model(x, sigma, tag):  # distinct rows per conditioning, no add / mul of its own
        return x.pow(tag.view(-1, 1)).sin()

    x = torch.randn(B, 2)
    cs = {**conds(), "neg": {"tag": torch.full((B,), 2.0)}}
    keep = {}
    with _Kernels() as seen:
        y, _ = plan.step(plan.init(), x, 1.0, cs, {"main": model}, keep=keep)
    combine = [n for n in seen.names if n in ("lerp", "mm", "mul", "add")]
    assert combine == [kernel]
    assert torch.allclose(y.double(), _by_terms(plan, 1.0, keep), rtol=1e-6, atol=1e-6)


def test_rows_the_combine_skips_keep_it_term_by_term():
    # fixed shapes run an inactive branch's rows; a NaN there must not reach the output
    # through a zero weight, so that program has no row weights
    plan = gk.compile(CFG(3) + (CFG(2, negative="neg") - CFG(2)).between(5, 10),
                      fixed_shapes=True)
    assert plan.program(1.0).row_weights is None
    assert gk.compile(CFG(3) + Autoguidance(1)).program(1.0).row_weights is None  # two groups
