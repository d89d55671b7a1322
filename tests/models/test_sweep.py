"""``guidekit sweep``: the job grid, the statistics, the files it writes, the speed figures."""

from __future__ import annotations

import math
import sys

import pytest

import guidekit
from guidekit.models.cache import ModelCache
from guidekit.models.sweep import (
    METHODS,
    Job,
    check_methods,
    expression,
    make_jobs,
    markdown_table,
    mean_std,
    pareto_front,
    read_csv,
    run_job,
    run_sweep,
    summarize,
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sweep")
    result = run_sweep(models=("eps",), methods=("none", "CFG"), scales=(2.0,), seeds=(0, 1),
                       per_digit=1, steps=2, out=out, speed=True, speed_batch=10,
                       speed_steps=2, speed_repeats=1, progress=False, echo=None)
    return result, out


def test_every_method_parses_at_every_scale() -> None:
    for method, (_, scales) in METHODS.items():
        for s in scales:
            assert guidekit.parse(expression(method, s)) is not None  # raises if not
    assert expression("CFG+PAG", 2.0) == "CFG(1.5) + PAG(2)"
    assert expression("APG", 1.5) == "CFG(1.5) | APG(eta=0)"


def test_jobs_are_ordered_and_seeded_per_job() -> None:
    jobs = make_jobs(["eps", "flow"], ["none", "CFG", "PAG"], seeds=[0, 1])
    assert [j.index for j in jobs] == list(range(len(jobs)))
    per_model = 2 * (1 + len(METHODS["CFG"][1]) + len(METHODS["PAG"][1]))
    assert len(jobs) == 2 * per_model
    assert jobs[0] == Job(0, "eps", "none", 0.0, 0) and jobs[1].seed == 1
    assert jobs[per_model].model == "flow"
    override = make_jobs(["eps"], ["none", "CFG"], seeds=[3], scales=[2, 4])
    assert [(j.method, j.scale, j.seed) for j in override] == [
        ("none", 0.0, 3), ("CFG", 2.0, 3), ("CFG", 4.0, 3)]


def test_methods_are_checked_by_name() -> None:
    assert check_methods() == list(METHODS)
    assert check_methods(["CADS", "CFG"]) == ["CADS", "CFG"]
    with pytest.raises(ValueError, match="unknown method"):
        check_methods(["CFG", "XYZ"])


def test_mean_std_and_summary() -> None:
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, math.sqrt(7 / 3)))
    m, s = mean_std([5.0])
    assert m == 5.0 and math.isnan(s)
    assert all(math.isnan(v) for v in mean_std([1.0, math.nan]))
    rows = [
        {"model": "eps", "method": "CFG", "scale": "2", "expression": "CFG(2)", "seed": k,
         "samples": 10, "steps": 4, "accuracy": a, "fd": f, "diversity": 1.0,
         "diversity_gap": 0.5, "calls": 4, "rows": 80, "seconds": 1.0}
        for k, (a, f) in enumerate([(0.8, 3.0), (0.9, 5.0)])
    ]
    (row,) = summarize(rows)
    assert row["accuracy_mean"] == pytest.approx(0.85)
    assert row["fd_std"] == pytest.approx(math.sqrt(2))
    assert row["rows_per_step"] == 20 and row["seeds"] == 2
    assert math.isnan(row["fd_vs_none_mean"])  # no baseline rows
    assert "| eps | `CFG(2)` | 0.850 ± 0.071 | 4.0 ± 1.4 |" in markdown_table([row])
    # a pipe in the expression is escaped, so the table keeps its 8 columns
    piped = markdown_table([{**row, "expression": "CFG(2) | APG(eta=0)"}]).splitlines()[-1]
    assert "`CFG(2) \\| APG(eta=0)`" in piped
    assert len(piped.replace("\\|", "").split("|")) == 10
    # paired with the unguided run of the same seed: FD 3 - 10 and 5 - 11
    base = [{**rows[k], "method": "none", "scale": "0", "expression": "Cond()",
             "accuracy": 0.5, "fd": f} for k, f in enumerate([10.0, 11.0])]
    none, cfg = summarize(base + rows)
    assert (none["fd_vs_none_mean"], none["fd_vs_none_std"]) == (0.0, 0.0)
    assert cfg["fd_vs_none_mean"] == pytest.approx(-6.5)
    assert cfg["fd_vs_none_std"] == pytest.approx(math.sqrt(0.5))
    assert cfg["accuracy_vs_none_mean"] == pytest.approx(0.35)


def test_pareto_front() -> None:
    # (accuracy, FD): higher accuracy and lower FD are better
    pts = [(0.9, 5.0), (0.95, 4.0), (0.99, 8.0), (0.9, 6.0), (0.99, 9.0), (0.95, 4.0)]
    assert pareto_front(pts) == [1, 5, 2]  # ties both kept; (0.9, 5) is beaten by (0.95, 4)


def test_run_job_is_deterministic() -> None:
    cache = ModelCache()
    job = Job(7, "eps", "CFG", 2.0, 1)
    a = run_job(job, cache, per_digit=1, steps=2)
    b = run_job(job, cache, per_digit=1, steps=2)
    assert {k: v for k, v in a.items() if k != "seconds"} == {
        k: v for k, v in b.items() if k != "seconds"}
    assert a["index"] == 7 and a["expression"] == "CFG(2)" and a["rows"] == 2 * 20
    c = run_job(Job(7, "eps", "CFG", 2.0, 2), cache, per_digit=1, steps=2)
    assert c["fd"] != a["fd"]  # another seed, other samples


def test_sweep_files(sweep) -> None:
    result, out = sweep
    names = {p.name for p in result.files}
    assert {"runs.csv", "summary.csv", "summary.md", "speed.csv", "pareto-eps.png"} <= names
    runs = read_csv(out / "runs.csv")
    assert [(r["method"], r["scale"], r["seed"]) for r in runs] == [
        ("none", "0", "0"), ("none", "0", "1"), ("CFG", "2", "0"), ("CFG", "2", "1")]
    assert all(r["samples"] == "10" and r["rank"] == "0" for r in runs)
    assert [int(r["rows"]) for r in runs] == [20, 20, 40, 40]  # 2 steps x (1 or 2) x 10
    summary = read_csv(out / "summary.csv")
    assert len(summary) == 2
    for s in summary:
        mine = [float(r["fd"]) for r in runs if r["method"] == s["method"]]
        assert float(s["fd_mean"]) == pytest.approx(sum(mine) / 2)
        assert float(s["fd_std"]) == pytest.approx(abs(mine[0] - mine[1]) / math.sqrt(2))
    assert (out / "pareto-eps.png").stat().st_size > 1000


def test_speed_figures(sweep) -> None:
    result, out = sweep
    speed = read_csv(out / "speed.csv")
    assert speed and all(r["threads"] == "1" for r in speed)
    for r in speed:  # one repeat: the median ratio is the ratio of the two times
        assert r["repeats"] == "1" and r["spread"] == "0.0"
        assert float(r["ratio"]) == pytest.approx(
            float(r["numerator_ms"]) / float(r["denominator_ms"]))
    figures = {(r["figure"], r["numerator"]) for r in speed}
    assert ("sequential calls / one call", "CFG(3), max_rows=N: 2 calls") in figures
    assert ("term / CFG", "CFG(3) + EMAG(1)") in figures
    assert ("guided step / bare forward", "CFG(3) + PAG(2)") in figures
    assert ("guidekit / diffusers guider", "CFG(3)") in figures
    assert ("guidekit / diffusers guider", "CFG(3) + PAG(2) from step 1: 1 call") in figures


def test_without_matplotlib_the_csv_is_written(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = run_sweep(models=("eps",), methods=("none",), seeds=(0,), per_digit=1, steps=1,
                       out=tmp_path, speed=False, progress=False, echo=None)
    assert (tmp_path / "runs.csv").exists() and not list(tmp_path.glob("*.png"))
    assert any("guidekit[plots]" in n for n in result.notes)
