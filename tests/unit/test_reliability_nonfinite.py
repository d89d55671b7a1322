"""Issue 11: a NaN or inf in any branch's model output, or in the guided output, is reported at
the step where it appears (step, sigma, branch, terms), through guide(), k-diffusion, flow_matching
and the attention engine; ``nonfinite="warn"`` only warns, once per run."""

from __future__ import annotations

import math
import warnings
from typing import Any

import attrs
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import guidekit
from guidekit import APG, CFG, PAG, Autoguidance, GuidanceValueError
from guidekit.errors import NonFiniteError, NonFiniteWarning
from guidekit.processor import Processor

pytestmark = pytest.mark.outcome("error")

B = 2
SIGMAS = [4.0, 2.0, 1.0, 0.5, 0.0]


def faulty(where: str, at_step: int, value: float = math.nan) -> Any:
    """``model(x, sigma, y)``: finite, except the rows ``where`` selects from call ``at_step``."""
    calls = []

    def model(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(float(sigma[0]))
        out = 0.5 * x + y.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        if len(calls) - 1 >= at_step:
            rows = {"uncond": y == 0, "cond": y == 1, "all": torch.ones_like(y, dtype=torch.bool),
                    "sample1": torch.arange(len(y)) % B == 1}[where]
            out = out.clone()
            out[rows] = value
        return out

    return model


def run_guide(expr: Any, model: Any, steps: int = 4, **kwargs: Any) -> tuple[Any, torch.Tensor]:
    g = guidekit.guide(
        guidekit.compile(expr, max_rows=kwargs.pop("max_rows", None)), model,
        cond={"y": torch.ones(B, dtype=torch.long)}, uncond={"y": torch.zeros(B, dtype=torch.long)},
        sigmas=SIGMAS, **kwargs,
    )
    x = torch.ones(B, 3)
    for s in SIGMAS[:steps]:
        x = g(x, s)
    return g, x


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    ("expr", "where", "branches", "terms"),
    [
        (CFG(3) | APG(eta=0), "uncond", ["branch u"], ["CFG(3)"]),
        (CFG(3) | APG(eta=0), "cond", ["branch c"], ["CFG(3)"]),
        (CFG(3), "all", ["branch c", "branch u"], ["CFG(3)"]),
        (CFG(3) + (CFG(2) - CFG(1.5)), "sample1", ["sample(s) 1"], ["CFG(3)", "CFG(2)"]),
    ],
    ids=["uncond-apg", "cond-apg", "everywhere", "one-sample"],
)
def test_guide_reports_the_step_sigma_branch_and_term(value, expr, where, branches, terms):
    with pytest.raises(NonFiniteError) as info:
        run_guide(expr, faulty(where, at_step=2, value=value))
    text = str(info.value)
    kind = "NaN" if math.isnan(value) else "inf"
    for fragment in [f"returned {kind}", "at step 2", "sigma=1", *branches, *terms,
                     "nonfinite='warn'"]:
        assert fragment in text, (fragment, text)
    assert isinstance(info.value, GuidanceValueError)


@pytest.mark.outcome("restored")
def test_a_refused_step_leaves_the_run_state_as_it_was():
    model = faulty("uncond", at_step=2)
    g = guidekit.guide(guidekit.compile(CFG(3) | APG(eta=0, momentum=-0.5)), model,
                       cond={"y": torch.ones(B, dtype=torch.long)},
                       uncond={"y": torch.zeros(B, dtype=torch.long)}, sigmas=SIGMAS)
    x = torch.ones(B, 3)
    g(x, 4.0)
    g(x, 2.0)
    before = g.state
    with pytest.raises(NonFiniteError):
        g(x, 1.0)
    assert g.state is before and g.steps == 2


def test_chunked_calls_name_the_right_branch():
    # max_rows=1: every row is its own call, so the failing call's rows must be placed by offset
    def model(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(((y == 0) & (x[:, 0] > 1.5)).view(-1, 1), math.nan, x)

    g = guidekit.guide(guidekit.compile(CFG(3), max_rows=1), model,
                       cond={"y": torch.ones(B)}, uncond={"y": torch.zeros(B)})
    with pytest.raises(NonFiniteError, match=r"branch u \(sample\(s\) 1\)") as info:
        g(torch.tensor([[1.0, 1.0], [2.0, 2.0]]), 1.0)
    assert "branch c" not in str(info.value) and len(g.calls) == 4  # c0 c1 u0 u1


def test_weak_model_nan_names_autoguidance():
    good = faulty("cond", at_step=99)
    weak = faulty("all", at_step=1)
    with pytest.raises(NonFiniteError) as info:
        run_guide(CFG(2) + Autoguidance(1.5), good, models={"weak": weak})
    text = str(info.value)
    assert "model 'weak'" in text and "branch c@weak" in text and "Autoguidance(1.5)" in text
    assert "at step 1" in text


@pytest.mark.outcome("correct")
def test_warn_warns_once_per_run_and_goes_on():
    model = faulty("uncond", at_step=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        g, x = run_guide(CFG(3), model, nonfinite="warn")
    found = [w for w in seen if issubclass(w.category, NonFiniteWarning)]
    assert len(found) == 1 and "at step 1" in str(found[0].message)
    assert torch.isnan(x).all() and g.steps == 4
    g.reset()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        g(torch.ones(B, 3), 4.0)
        g(torch.ones(B, 3), 2.0)
    assert len([w for w in seen if issubclass(w.category, NonFiniteWarning)]) == 1


def test_non_finite_guided_output_after_processors():
    def huge(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(y.view(-1, 1) == 1, 3e38, -3e38).expand_as(x).to(torch.float32)

    with pytest.raises(NonFiniteError) as info:
        run_guide(CFG(3) | APG(eta=0), huge)
    text = str(info.value)
    assert "guided output of CFG(3) | APG()" in text and "every model output was finite" in text
    assert "at step 0" in text and "processors: APG()" in text


@pytest.mark.parametrize("bad", ["ignore", "off", None, True])
def test_bad_policy_names_the_argument(bad):
    with pytest.raises(GuidanceValueError, match=r"nonfinite=.*'raise'.*'warn'"):
        run_guide(CFG(3), faulty("cond", 99), nonfinite=bad)


def test_pag_rows_only_at_step_2_through_the_attention_engine():
    from attention._tiny import dit_fn, tiny_dit

    from guidekit.attention import install

    model = tiny_dit()
    plan = guidekit.compile(CFG(3) + PAG(2, layers=1))
    fn = dit_fn(model)
    calls = []

    def poisoned(x, sigma, class_labels):
        out = fn(x, sigma, class_labels)
        calls.append(out.shape[0])
        if len(calls) == 3:  # step 2: the rows after c and u are the PAG branch's
            out = out.clone()
            out[2 * B :] = math.nan
        return out

    x = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), install(model, plan) as around:
        g = guidekit.guide(plan, poisoned, cond={"class_labels": torch.tensor([3, 7])},
                           uncond={"class_labels": torch.tensor([0, 0])}, around_call=around,
                           sigmas=SIGMAS)
        g(x, 4.0)
        g(x, 2.0)
        with pytest.raises(NonFiniteError) as info:
            g(x, 1.0)
    text = str(info.value)
    assert "at step 2" in text and "branch c[IdentityAttention" in text
    assert "used by PAG(2, layers=(1,))" in text
    assert "branch u" not in text and "CFG(3)" not in text


def test_kdiffusion_sampler_stops_at_the_step():
    from k_diffusion.sampling import get_sigmas_karras, sample_heun

    from guidekit.adapters.kdiffusion import KDiffusionGuided

    sigmas = get_sigmas_karras(6, 0.1, 10.0, device="cpu").double()
    den = KDiffusionGuided(CFG(3) | APG(eta=0), faulty("uncond", at_step=5), sigmas=sigmas,
                           cond={"y": torch.ones(B, dtype=torch.long)},
                           uncond={"y": torch.zeros(B, dtype=torch.long)})
    with pytest.raises(NonFiniteError) as info:
        sample_heun(den, torch.randn(B, 3, dtype=torch.float64) * 10, sigmas, disable=True)
    # heun evaluates s0, s1 | s1, s2 | s2, s3: call 5 is the first at sigmas[3], step 3
    assert f"at step 3 (sigma={float(sigmas[3]):g})" in str(info.value)
    assert "branch u" in str(info.value)


def test_flow_matching_solver_stops_at_the_step():
    from flow_matching.solver import ODESolver

    from guidekit.adapters.flow import FlowGuided

    def velocity(x, t, cond):
        out = x * 0 + cond.view(-1, 1)
        if float(torch.as_tensor(t).flatten()[0]) >= 0.5:
            out = out.clone()
            out[cond == 0] = math.inf
        return out

    grid = torch.linspace(0, 1, 5, dtype=torch.float64)
    guided = FlowGuided(CFG(3), velocity, time_grid=grid, cond=torch.ones(B, dtype=torch.float64),
                        uncond=torch.zeros(B, dtype=torch.float64))
    with pytest.raises(NonFiniteError) as info:
        ODESolver(velocity_model=guided.model_wrapper()).sample(
            x_init=torch.zeros(B, 3, dtype=torch.float64), time_grid=grid, method="euler",
            step_size=None)
    assert "returned inf at step 2 (sigma=0.5)" in str(info.value)
    assert "branch u" in str(info.value)


def test_a_non_finite_branch_output_handed_in_is_named_by_its_branch() -> None:
    """A caller that ran the branches itself (``native=``, the modular guider's batches): a NaN
    in one branch's output is reported as that branch's, and the state is not advanced."""
    from guidekit.run import Run

    plan = guidekit.compile(CFG(3) | APG(eta=0, momentum=-0.5), prediction="eps")
    run = Run(plan, sigmas=SIGMAS, on_rise="restart")
    x = torch.ones(B, 3)
    bad = torch.zeros(B, 3)
    bad[1, 0] = math.nan
    branches = {b.label: b for b in plan.program(SIGMAS[0]).branches}
    native = {branches["c"]: torch.zeros(B, 3), branches["u"]: bad}
    with pytest.raises(NonFiniteError, match=r"branch u handed in \(native=\) holds NaN at step "
                       r"0 \(sigma=4, sample\(s\) 1\), used by CFG\(3\), "
                       r"APG\(momentum=-0.5\)") as info:
        run.step(x, SIGMAS[0], {}, {}, native=native)
    assert "every model output was finite" not in str(info.value)
    assert run.state.level == -1


def test_a_model_replaced_between_steps_is_the_one_called_and_checked():
    """The run wraps its models once and keeps the wrappers while the caller hands over the
    same models: a model replaced in the same mapping is wrapped (and checked) anew."""
    good = faulty("uncond", at_step=10**6)
    g = guidekit.guide(
        guidekit.compile(CFG(3)), good,
        cond={"y": torch.ones(B, dtype=torch.long)}, uncond={"y": torch.zeros(B, dtype=torch.long)},
        sigmas=SIGMAS,
    )
    x = torch.ones(B, 3)
    x = g(x, SIGMAS[0])
    g.models["main"] = faulty("uncond", at_step=0)
    with pytest.raises(NonFiniteError, match="branch u"):
        g(x, SIGMAS[1])


def test_a_call_log_assigned_by_hand_receives_the_calls():
    g, _ = run_guide(CFG(3), faulty("uncond", at_step=10**6), steps=1)
    assert len(g.calls) == 1
    g.calls = []
    g(torch.ones(B, 3), SIGMAS[1])
    assert [c.rows for c in g.calls] == [2 * B]


class _HostReads(TorchDispatchMode):
    """Counts the operators that read a device value on the host (a synchronisation each)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket is torch.ops.aten._local_scalar_dense:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.outcome("correct")
@pytest.mark.parametrize("max_rows", [None, 1])
def test_one_host_read_per_guided_call_checks_every_model_output(max_rows):
    # the model outputs and the guided output are checked in one reduction read once, however
    # many calls the step made (max_rows=1: six), so the combine queues behind the model
    g = guidekit.guide(guidekit.compile(CFG(3) + (CFG(2, negative="neg") - CFG(2)),
                                        max_rows=max_rows),
                       lambda x, sigma, y: 0.5 * x + y.view(-1, 1).to(x.dtype),  # reads nothing
                       cond={"y": torch.ones(B, dtype=torch.long)},
                       uncond={"y": torch.zeros(B, dtype=torch.long)},
                       conds={"neg": {"y": torch.full((B,), 2, dtype=torch.long)}})
    g(torch.ones(B, 3), 4.0)
    with _HostReads() as count:
        g(torch.ones(B, 3), 2.0)
    assert count.reads == 1 and len(g.calls) == (2 if max_rows is None else 12)


@attrs.frozen
class _Strict(Processor):
    """A processor that refuses a non-finite input (as an SVD or a solver may)."""

    def apply(self, y: torch.Tensor, ctx: Any, state: Any) -> tuple[torch.Tensor, Any]:
        if not bool(torch.isfinite(y).all()):
            raise RuntimeError("strict: the input is not finite")
        return y, state


def test_a_step_that_fails_on_the_nan_reports_the_models_nan():
    # the check of the model outputs waits for the guided output; where the combine or a
    # processor fails first (on the NaN itself), the model's NaN is still what is reported
    with pytest.raises(NonFiniteError, match=r"returned NaN at step 1.*branch u") as info:
        run_guide(CFG(3) | _Strict(), faulty("uncond", at_step=1))
    assert isinstance(info.value.__cause__, RuntimeError)

    def huge(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(y.view(-1, 1) == 1, 3e38, -3e38).expand_as(x).to(torch.float32)

    # finite model outputs, a combine that overflows: the processor's own error goes on as is
    with pytest.raises(RuntimeError, match="strict") as failed:
        run_guide(CFG(3) | _Strict(), huge)
    assert not isinstance(failed.value, NonFiniteError)
