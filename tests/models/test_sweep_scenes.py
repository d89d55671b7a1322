"""The scenes models in the sweep (issue 13): a job's captions are held-out ones, its scores
are read by the attribute classifier, and Autoguidance runs its weak sibling through that
sibling's own encoder."""

from __future__ import annotations

import pytest
import torch

import guidekit
from guidekit.models.cache import ModelCache
from guidekit.models.scenes.sample import sample_scenes
from guidekit.models.sweep import family_of, read_csv, run_sweep, sweep_models
from guidekit.models.sweep.scenes import SCENES, SceneJob

CAPTIONS = ["a small red circle on the left on a black background",
            "a large blue square above a small green triangle on a white background"]


@pytest.fixture(scope="module")
def models() -> ModelCache:
    return ModelCache()


def test_the_scenes_family_joins_the_sweep() -> None:
    assert {"scenes", "scenes-fast"} <= set(sweep_models())
    assert family_of("scenes-fast") is SCENES
    assert {"accuracy", "fd"} <= set(SCENES.metrics)


def test_a_job_samples_held_out_captions_ten_per_class() -> None:
    job = SCENES.conditioning(2)
    assert isinstance(job, SceneJob) and len(job) == 20
    assert job.labels.shape == (20, 9) and job.images.shape == (20, 3, 32, 32)
    assert len(set(job.captions)) > 10
    with pytest.raises(ValueError, match="at most 200"):
        SCENES.conditioning(201)


def test_real_scenes_score_as_real() -> None:
    job = SCENES.conditioning(10)
    real = SCENES.score(job.images, job)
    assert real["accuracy"] == 1.0 and real["exact"] == 1.0  # the classifier reads them all
    assert real["diversity_gap"] == 0.0
    noise = SCENES.score(torch.rand(job.images.shape) * 2 - 1, job)
    assert noise["accuracy"] < 0.6 and noise["exact"] == 0.0
    assert 0 <= real["fd"] < 0.1 * noise["fd"]


def test_a_scenes_sweep_writes_its_metrics(tmp_path) -> None:
    run_sweep(models=("scenes-fast",), methods=("none",), exprs=["CFG({s}) | GAG(2)"],
              scales=(2.0,), seeds=(0,), per_digit=1, steps=2, out=tmp_path, speed=False,
              plots=False, progress=False, echo=None)
    rows = read_csv(tmp_path / "runs.csv")
    assert [r["method"] for r in rows] == ["none", "CFG({s}) | GAG(2)"]
    for r in rows:
        assert r["model"] == "scenes-fast" and 0 <= float(r["accuracy"]) <= 1
        assert float(r["fd"]) > 0 and "exact" in r


def test_autoguidance_reads_the_weak_sibling_through_its_own_encoder(models) -> None:
    main, weak = models("scenes"), models("scenes-weak")
    r = sample_scenes(main, "Cond() + Autoguidance(2)", CAPTIONS, steps=1, seed=3, weak=weak,
                      clamp=False)
    assert [(c.model, c.rows) for c in r.calls] == [("main", 2), ("weak", 2)]
    sigmas = main.sigmas(1)
    s = torch.full((2,), float(sigmas[0]))
    x = main.convention.initial(r.noise, float(sigmas[0]))
    with torch.no_grad():
        c = main.model_fn(x, s, **main.conditions(CAPTIONS))
        c_weak = weak.model_fn(x, s, **weak.conditions(CAPTIONS))  # weak's own encoder
    want = x + float(sigmas[1] - sigmas[0]) * (c + 2 * (c - c_weak))
    torch.testing.assert_close(r.images, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(guidekit.GuidanceValueError, match="CADS with Autoguidance"):
        sample_scenes(main, "(Cond() + Autoguidance(2)) | CADS()", CAPTIONS, steps=1,
                      weak=weak)
    with pytest.raises(guidekit.GuidanceValueError, match="scenes-fast.*has none"):
        SCENES.sample(models, "scenes-fast", "Cond() + Autoguidance(1)", CAPTIONS, steps=1,
                      seed=0)


def test_a_method_one_model_cannot_run_is_left_out_of_that_model_only(tmp_path) -> None:
    result = run_sweep(models=("scenes", "scenes-fast"), methods=("none", "Autoguidance"),
                       scales=(1.0,), seeds=(0,), per_digit=1, steps=1, out=tmp_path,
                       speed=False, plots=False, progress=False, echo=None)
    ran = {(r["model"], r["method"]) for r in result.rows}
    assert ran == {("scenes", "none"), ("scenes", "Autoguidance"), ("scenes-fast", "none")}
    assert any("Autoguidance left out on scenes-fast" in n for n in result.notes)
    assert not any("on scenes:" in n for n in result.notes)


def test_one_sweep_runs_both_families(tmp_path) -> None:
    run_sweep(models=("eps", "scenes-fast"), methods=("none",), exprs=["CFG(1.5)"],
              seeds=(0,), per_digit=1, steps=1, out=tmp_path, speed=False, plots=False,
              progress=False, echo=None)
    rows = read_csv(tmp_path / "runs.csv")
    assert {r["model"] for r in rows} == {"eps", "scenes-fast"}
    # the digits score no 'exact': their cells stay empty, the scenes' are filled
    assert {r["model"]: r["exact"] == "" for r in rows} == {"eps": True, "scenes-fast": False}
    summary = read_csv(tmp_path / "summary.csv")
    assert {r["model"] for r in summary} == {"eps", "scenes-fast"}
