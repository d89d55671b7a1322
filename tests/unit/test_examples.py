"""The documentation's code runs: README/docs code blocks, the demo and its command line.

Every fenced ``python`` block in README.md and docs/*.md is executed, in order, one namespace
per file (like a doctest), except blocks whose first line starts with ``# planned``: those
show terms of a later issue (EMAG, PAG, ...) that do not exist yet.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import guidekit
from guidekit import APG, CADS, CFG, Autoguidance, Cond, Rescale
from guidekit.models.toy import ToyDenoiser, default_guidance, run_demo

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = ["README.md", "docs/semantics.md", "docs/terms.md", "docs/recipes.md"]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
PLANNED = "# planned"


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced python block in ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def runnable(code: str) -> bool:
    return not code.lstrip().startswith(PLANNED)


@pytest.mark.parametrize("name", DOC_FILES)
def test_doc_python_blocks_run(name: str) -> None:
    path = ROOT / name
    blocks = python_blocks(path)
    run = [(line, code) for line, code in blocks if runnable(code)]
    assert run, f"{name} has no runnable python block"
    namespace: dict[str, object] = {"__name__": f"doc:{name}"}
    torch.manual_seed(0)
    for line, code in run:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{name}:{line}", "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"{name}, python block at line {line} failed: {err!r}") from err


def _fenced(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block, in order."""
    return re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def test_readme_sampler_output_is_real() -> None:
    # The text block after the custom-sampler example is exactly what the example prints.
    blocks = _fenced((ROOT / "README.md").read_text(encoding="utf-8"))
    i = next(i for i, (lang, body) in enumerate(blocks) if "guidekit.guide(" in body)
    assert blocks[i][0] == "python" and blocks[i + 1][0] == "text"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[i][1], "README.md", "exec"), {"__name__": "readme"})
    assert out.getvalue().strip() == blocks[i + 1][1].strip()


def test_pasted_plan_output_is_current() -> None:
    # docs/semantics.md and docs/recipes.md paste print(plan) / explain output: keep it real.
    semantics = (ROOT / "docs" / "semantics.md").read_text(encoding="utf-8")
    g = (CFG(7) + Autoguidance(1.5).between(0.3, 5)
         | APG(eta=0, norm_threshold=5, momentum=-0.5) | Rescale(0.7))
    plan = guidekit.compile(g, prediction="eps")
    assert str(plan) in semantics
    assert plan.explain([20.0, 8, 3, 1, 0.4, 0.1, 0], batch=8) in semantics
    recipes = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    plan = guidekit.compile(CFG(7) + Autoguidance(1.5).between(0.3, 5) | APG(eta=0),
                            prediction="eps")
    assert str(plan) in recipes


def test_planned_blocks_mention_planned_terms_only() -> None:
    # A block may only be skipped if it really needs a term that does not exist yet.
    planned_terms = ("EMAG", "PAG", "SEG", "SLG", "SAG", "GAG", "PLADIS", "NAG")
    for name in DOC_FILES:
        for line, code in python_blocks(ROOT / name):
            if not runnable(code):
                assert any(t in code for t in planned_terms), f"{name}:{line} skipped for no reason"
                assert not any(hasattr(guidekit, t) for t in planned_terms if t in code), (
                    f"{name}:{line} is marked planned but its terms exist now: make it runnable"
                )


def test_readme_states_the_two_commands_exactly() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    venv = "python -m venv .venv && . .venv/bin/activate && "
    assert venv + "pip install -e . && python -m guidekit demo" in text
    assert venv + 'pip install -e ".[dev]" && pytest' in text


def test_readme_headline_arithmetic() -> None:
    # CFG(w) + s (c - e) == the EMAG paper's u + w (c' - u), c' = e + w_e (c - e), for
    # s = w (w_e - 1); checked with Autoguidance's (c - c@weak) standing in for (c - e).
    g = torch.Generator().manual_seed(1)
    c, u, e = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    w, w_e = 7.0, 1.5
    paper = u + w * ((e + w_e * (c - e)) - u)
    plan = guidekit.compile(CFG(w) + Autoguidance(w * (w_e - 1)), prediction="x0")
    # main runs [c u] as one call of 2B rows, weak runs [c@weak] (see docs/semantics.md)
    outs = {"main": lambda x, s, y: torch.cat([c, u]), "weak": lambda x, s, y: e}
    labels = torch.zeros(2, dtype=torch.long)
    y, _ = plan.step(plan.init(), torch.zeros_like(c), 1.0,
                     {"cond": {"y": labels}, "uncond": {"y": labels + 1}}, outs)
    torch.testing.assert_close(y, paper)
    assert abs((1 + 1.5 / 7) - 1.2142857) < 1e-6  # README: CFG(7) + EMAG(1.5) is w_e ~ 1.214


def _check_report(report, batch: int) -> None:
    """One call per forward group per step, each ``active_branches x B`` rows."""
    plan = report.plan
    assert len(report.steps) == len(report.sigmas) - 1
    for s in report.steps:
        groups = plan.program(s.sigma).groups
        assert len(s.calls) == len(groups), s
        for call, group in zip(s.calls, groups):
            assert call.model == group.model
            assert call.rows == len(group.branches) * batch
            assert call.branches == tuple(b.label for b in group.branches)
            assert call.step == s.step and call.sigma == pytest.approx(s.sigma)
        assert sum(c.rows for c in s.calls) == plan.rows(s.sigma, batch)
        assert s.ok


def test_run_demo_counts_one_call_per_group_per_step() -> None:
    out: list[str] = []
    report = run_demo(echo=out.append)
    assert report.plan.expr == default_guidance()
    _check_report(report, batch=4)
    # The default's Autoguidance is gated to 0.3 < sigma <= 5: two groups inside, one outside.
    inside = [s for s in report.steps if 0.3 < s.sigma <= 5]
    outside = [s for s in report.steps if not 0.3 < s.sigma <= 5]
    assert inside and outside
    assert all([c.rows for c in s.calls] == [8, 4] for s in inside)
    assert all([c.rows for c in s.calls] == [8] for s in outside)
    assert report.model_calls == 2 * len(inside) + len(outside)
    assert report.rows == 12 * len(inside) + 8 * len(outside)
    assert torch.isfinite(report.samples).all()
    assert report.accuracy == 1.0  # guided samples land nearest their own class
    text = "\n".join(out)
    assert str(report.plan) in text and report.plan.explain(report.sigmas, batch=4) in text
    assert "exactly one model call per forward group per step" in text


@pytest.mark.parametrize(
    ("expr", "rows_per_step"),
    [
        (CFG(1), [3]),  # CFG(1) is c alone: the unconditional branch is never computed
        (CFG(3) | CADS(noise_scale=0.2), [6]),  # CADS gets float class weights, not labels
        (Cond() + Autoguidance(2), [3, 3]),  # Autoguidance alone: main [c] + weak [c@weak]
    ],
)
def test_run_demo_other_expressions(expr, rows_per_step) -> None:
    report = run_demo(expr, steps=5, batch=3, echo=None)
    _check_report(report, batch=3)
    assert all([c.rows for c in s.calls] == rows_per_step for s in report.steps)


def test_run_demo_reads_text_with_parse() -> None:
    report = run_demo("CFG(3) | APG(eta=0)", steps=4, batch=2, echo=None)
    assert report.plan.expr == (CFG(3) | APG(eta=0))
    _check_report(report, batch=2)


def test_run_demo_row_budget_splits_groups() -> None:
    report = run_demo(CFG(3), steps=3, batch=4, max_rows=3, echo=None)
    for s in report.steps:  # 8 rows in calls of at most 3
        assert [c.rows for c in s.calls] == [3, 3, 2]


def test_run_demo_detects_missing_calls(monkeypatch) -> None:
    # The demo's own check must be able to fail: drop the records of one call.
    original = guidekit.Guided.__call__

    def lossy(self, x, sigma):
        y = original(self, x, sigma)
        if len(self.calls) == 3:
            self.calls.pop()
        return y

    monkeypatch.setattr(guidekit.Guided, "__call__", lossy)
    with pytest.raises(AssertionError, match="expected one call per forward group"):
        run_demo(CFG(3), steps=5, echo=None)


def test_toy_denoiser_is_the_exact_denoiser() -> None:
    # For data N(mean, std^2 I) the optimal x0 is the posterior mean; eps = (x - x0) / sigma.
    model = ToyDenoiser(classes=3, shape=(2, 2), seed=5)
    y = torch.tensor([0, 2, 3])
    x = torch.randn(3, 2, 2)
    sigma = torch.tensor([0.5, 0.5, 0.5])
    mean, std = model.means[y].detach(), model.stds[y].detach().view(-1, 1, 1)
    x0 = (std**2 * x + 0.25 * mean) / (std**2 + 0.25)
    torch.testing.assert_close(model(x, sigma, y).detach(), (x - x0) / 0.5)
    one_hot = torch.nn.functional.one_hot(y, 4).float()
    torch.testing.assert_close(model(x, sigma, one_hot), model(x, sigma, y))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "guidekit", *args], capture_output=True, text=True, cwd=ROOT,
        env=env, timeout=120,
    )


@pytest.mark.slow
def test_cli_demo_help() -> None:
    result = _cli("demo", "--help")
    assert result.returncode == 0, result.stderr
    assert "--guidance" in result.stdout and "--toy" in result.stdout  # both demos


@pytest.mark.slow
def test_cli_bad_guidance_is_a_message_not_a_traceback() -> None:
    result = _cli("demo", "--guidance", "CFG(7) + CFG(3)")
    assert result.returncode == 2
    assert "guidekit demo:" in result.stderr and "Traceback" not in result.stderr


def test_cli_main_in_process() -> None:
    from guidekit.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["demo", "--toy", "--guidance", "CFG(2)", "--steps", "3", "--batch", "2"]) == 0
    assert "exactly one model call per forward group per step" in out.getvalue()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([]) == 2  # no command: help, non-zero


@pytest.mark.slow
def test_example_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_sampler.py"), "--steps", "4"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert "exactly one model call per forward group per step" in result.stdout


def test_models_using_them_block_runs() -> None:
    # docs/models.md "Using them" (issue 11: it raised NameError once); run with one label
    # per digit instead of 100 so the suite stays short, everything else as written
    text = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    block = text.split("## Using them", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "repeat_interleave(100)" in block
    code = block.replace("repeat_interleave(100)", "repeat_interleave(1)")
    namespace: dict = {"__name__": "models_doc"}
    exec(compile(code, "docs/models.md", "exec"), namespace)
    assert len(namespace["result"].calls) > 0
