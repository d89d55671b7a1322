"""``guidekit sweep`` on guidance expressions given as text (``--expr``, ``--exprs``)."""

from __future__ import annotations

import pytest

from guidekit.errors import GuidanceValueError
from guidekit.models.cache import ModelCache
from guidekit.models.cli import main
from guidekit.models.sweep import (
    Job,
    check_exprs,
    make_jobs,
    method_name,
    panel_title,
    pareto_panels,
    read_csv,
    read_exprs,
    run_job,
    run_sweep,
    summarize,
    unsupported,
)

TINY = dict(per_digit=1, steps=2, speed=False, progress=False, echo=None)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sweep-exprs")
    result = run_sweep(models=("eps",), exprs=("CFG(1.5) + EMAG(1)", "CFG({s})|APG(eta=0)"),
                       scales=(2.0, 3.0), seeds=(0, 1), out=out, **TINY)
    return result, out


def test_method_name_is_the_repr_with_the_placeholder() -> None:
    assert method_name("CFG(1.5)+EMAG(1)") == "CFG(1.5) + EMAG(1)"
    assert method_name("CFG({s})|APG(eta=0)") == "CFG({s}) | APG()"  # eta=0 is the default
    assert panel_title("CFG({s}) | APG()") == "CFG(s) | APG()"
    assert panel_title("APG") == "CFG(s) | APG(eta=0)"  # a named method: its template


def test_expressions_with_and_without_placeholder_make_their_jobs() -> None:
    exprs = check_exprs(["CFG(1.5) + EMAG(1)", "CFG({s}) | APG(eta=0)"], [1.5, 3])
    jobs = make_jobs(["eps", "flow"], ["none"], seeds=[0, 1, 2], scales=[1.5, 3], exprs=exprs)
    per_model = 3 * (1 + 1 + 2)  # none, the fixed expression once, the swept one per scale
    assert len(jobs) == 2 * per_model and [j.index for j in jobs] == list(range(len(jobs)))
    eps = jobs[:per_model]
    assert [(j.method, j.scale, j.text) for j in eps[3:6]] == [
        ("CFG(1.5) + EMAG(1)", None, "CFG(1.5) + EMAG(1)")] * 3
    assert [j.seed for j in eps[3:6]] == [0, 1, 2]
    assert [(j.method, j.scale, j.text) for j in eps[6::3]] == [
        ("CFG({s}) | APG()", 1.5, "CFG(1.5) | APG(eta=0)"),
        ("CFG({s}) | APG()", 3.0, "CFG(3) | APG(eta=0)")]
    assert jobs[per_model].model == "flow"


def test_bad_expressions_are_refused_naming_them(tmp_path) -> None:
    with pytest.raises(GuidanceValueError, match=r"'CFG\(2\) \+ FOO\(1\)'.*unknown name 'FOO'"):
        check_exprs(["CFG(1.5)", "CFG(2) + FOO(1)"], None)
    with pytest.raises(GuidanceValueError, match=r"'CFG\(\{s\}, 2\)' at scale 1\.5"):
        check_exprs(["CFG({s}, 2)"], [1.5])
    with pytest.raises(GuidanceValueError, match=r"placeholder but no scales"):
        check_exprs(["CFG({s})"], None)
    with pytest.raises(GuidanceValueError, match=r"same expression \(CFG\(2\)\)"):
        check_exprs(["CFG(2)", "CFG( 2 )"], None)
    # before anything is sampled or written: a good expression first changes nothing
    out = tmp_path / "never"
    with pytest.raises(GuidanceValueError, match="FOO"):
        run_sweep(models=("eps",), exprs=("CFG(2)", "CFG(2) + FOO(1)"), seeds=(0,), out=out,
                  **TINY)
    assert not out.exists()


def test_an_expression_a_model_cannot_run_is_refused_naming_the_model(tmp_path) -> None:
    (neg,) = check_exprs(["CFG(2, negative='neg')"], None)
    assert "needs the conditioning(s) 'neg'" in (unsupported(ModelCache(), "eps", neg) or "")
    out = tmp_path / "never"
    with pytest.raises(GuidanceValueError,
                       match=r"CFG\(2, negative='neg'\)\W+cannot run on model 'eps'.*'neg'"):
        run_sweep(models=("eps",), exprs=("CFG(2, negative='neg')",), seeds=(0,), out=out,
                  **TINY)
    assert not out.exists()
    (auto,) = check_exprs(["Cond() + Autoguidance(1)"], None)
    assert "has none" in (unsupported(ModelCache(), "eps-weak", auto) or "")


def test_a_named_method_and_its_expression_give_the_same_row() -> None:
    cache = ModelCache()
    named = run_job(Job(0, "eps", "CFG", 2.0, 1), cache, per_digit=1, steps=2)
    given = run_job(Job(0, "eps", "CFG({s})", 2.0, 1, "CFG({s})"), cache, per_digit=1, steps=2)
    # NaN (diversity of one sample per digit) is equal to NaN here
    differ = {k for k in named if str(named[k]) != str(given[k])}
    assert differ == {"method", "seconds"} and given["method"] == "CFG({s})"


def test_sweep_rows_summary_and_plot_key_on_the_expression(swept) -> None:
    result, out = swept
    runs = read_csv(out / "runs.csv")
    assert [(r["method"], r["scale"], r["expression"]) for r in runs[::2]] == [
        ("none", "0", "Cond()"), ("CFG(1.5) + EMAG(1)", "", "CFG(1.5) + EMAG(1)"),
        ("CFG({s}) | APG()", "2", "CFG(2)|APG(eta=0)"),
        ("CFG({s}) | APG()", "3", "CFG(3)|APG(eta=0)")]
    assert [r["seed"] for r in runs] == ["0", "1"] * 4
    summary = summarize(runs)  # from the CSV's strings, as from fresh rows
    assert [(s["method"], s["scale"], s["seeds"]) for s in summary] == [
        ("none", "0", 2), ("CFG(1.5) + EMAG(1)", "", 2), ("CFG({s}) | APG()", "2", 2),
        ("CFG({s}) | APG()", "3", 2)]
    assert all(s["fd_vs_none_std"] == s["fd_vs_none_std"] for s in summary)  # paired: not NaN
    panels = pareto_panels(summary)
    assert list(panels) == ["CFG(1.5) + EMAG(1)", "CFG({s}) | APG()"]
    assert [r["scale"] for r in panels["CFG({s}) | APG()"]] == ["2", "3"]
    assert (out / "pareto-eps.png").stat().st_size > 1000
    assert "`CFG(2)\\|APG(eta=0)`" in (out / "summary.md").read_text()


def test_cli_reads_expressions_from_flags_and_a_file(tmp_path, capsys) -> None:
    listing = tmp_path / "exprs.txt"
    listing.write_text("# mine\nCFG({s})  # swept\n\n  Cond() + EMAG(1)\n")
    assert read_exprs(listing) == ["CFG({s})", "Cond() + EMAG(1)"]
    out = tmp_path / "cli"
    args = ["sweep", "--models", "eps", "--seeds", "1", "--samples", "1", "--steps", "1",
            "--no-speed", "--no-plot", "--no-progress", "--out", str(out)]
    assert main([*args, "--exprs", str(listing), "--expr", "CFG(1.5) + PAG(1)",
                 "--scales", "1.5", "3"]) == 0
    runs = read_csv(out / "runs.csv")
    assert [(r["method"], r["scale"]) for r in runs] == [
        ("none", "0"), ("CFG(1.5) + PAG(1)", ""), ("CFG({s})", "1.5"), ("CFG({s})", "3"),
        ("Cond() + EMAG(1)", "")]
    capsys.readouterr()
    assert main([*args, "--expr", "CFG(2) +", "--scales", "1.5,3"]) == 2
    assert "sweep expression 'CFG(2) +'" in capsys.readouterr().err
