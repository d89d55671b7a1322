"""The bundled-model demo (``python -m guidekit demo``): table, grid PNG, call checks.

Tiny runs (1 sample per digit, 2-3 Euler steps) on the shipped weights; the numbers in the
table are checked against the compiled plans (``plan.rows``) and the PNG pixel for pixel
against the samples.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import guidekit
import guidekit.models
from guidekit.errors import GuidanceError
from guidekit.models.cache import DIGITS, ModelCache, digit_labels
from guidekit.models.demo import (
    DemoRow,
    Entry,
    check_calls,
    default_entries,
    run_entry,
    run_model_demo,
)
from guidekit.models.grid import HEADER, PAD, ZOOM, cell_box, grid_size, to_pixels
from guidekit.plan import CallRecord

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
ENTRIES = [
    Entry("eps", "Cond()"),
    Entry("eps", "CFG(2) + PAG(1)"),
    Entry("flow", "CFG(2) + Autoguidance(1)"),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo") / "grid.png"
    lines: list[str] = []
    result = run_model_demo(ENTRIES, per_digit=1, steps=STEPS, out=out, progress=False,
                            echo=lines.append, threads=1)
    return result, "\n".join(lines)


def test_default_entries_cover_the_issue_list() -> None:
    entries = default_entries()
    texts = {(e.model, e.text) for e in entries}
    assert ("eps", "Cond()") in texts and ("flow", "Cond()") in texts
    joined = " ".join(e.text for e in entries)
    for term in ("CFG(", "PAG(", "EMAG(", "APG(", "CADS(", "Autoguidance("):
        assert term in joined, term
    for e in entries:  # every default parses
        guidekit.parse(e.text)


def test_table_matches_the_plans(demo) -> None:
    result, text = demo
    models = ModelCache()
    assert [r.entry for r in result.rows] == ENTRIES and result.samples == DIGITS
    expected_rows = {"Cond()": 10, "CFG(2) + PAG(1)": 30, "CFG(2) + Autoguidance(1)": 30}
    expected_calls = {"Cond()": STEPS, "CFG(2) + PAG(1)": STEPS,
                      "CFG(2) + Autoguidance(1)": 2 * STEPS}  # the weak model: its own call
    for row in result.rows:
        bundled = models(row.entry.model)
        plan = bundled.compile(row.entry.text)
        sigmas = bundled.sigmas(STEPS)
        assert list(row.rows) == [plan.rows(float(s), DIGITS) for s in sigmas[:-1]]
        assert set(row.rows) == {expected_rows[row.entry.text]}
        assert row.calls == expected_calls[row.entry.text]
        assert 0 <= row.accuracy <= 1 and row.fd >= 0 and row.seconds > 0
        line = next(ln for ln in text.splitlines() if ln.startswith(row.entry.text + " "))
        cells = line.split()
        assert cells[-6:-3] == [row.entry.model, str(row.calls), str(row.rows[0])]
        assert cells[-2:] == [f"{row.accuracy:.3f}", f"{row.fd:.2f}"]
    assert "one model call per forward group" in text


def test_grid_png_size_and_pixels(demo) -> None:
    result, _ = demo
    assert result.grid is not None and result.grid.exists()
    img = Image.open(result.grid)
    assert img.mode == "L"
    cell = 8 * ZOOM
    width, height = img.size
    assert height == HEADER + len(ENTRIES) * (cell + PAD) + PAD
    label_width = width - DIGITS * (cell + PAD) - PAD
    assert label_width > 40  # room for the labels
    assert grid_size(len(ENTRIES), label_width) == img.size
    pixels = torch.from_numpy(__import__("numpy").asarray(img).copy())
    for i, row in enumerate(result.rows):
        for d in (0, 4, 9):
            left, top, right, bottom = cell_box(i, d, label_width)
            k = int(torch.nonzero(row.labels == d)[0])
            assert torch.equal(pixels[top:bottom, left:right], to_pixels(row.images[k]))
    # different expressions, same noise: the rows differ
    a, b = (cell_box(i, 3, label_width) for i in (0, 1))
    assert not torch.equal(pixels[a[1]:a[3], a[0]:a[2]], pixels[b[1]:b[3], b[0]:b[2]])


def test_check_calls_catches_a_missing_call() -> None:
    bundled = ModelCache()("eps")
    plan = bundled.compile("CFG(2)")
    sigmas = bundled.sigmas(2)
    calls = [CallRecord("main", 20, ("c", "u"), float(s), i) for i, s in enumerate(sigmas[:-1])]
    check_calls(plan, calls, sigmas, 10, budget=False)
    with pytest.raises(AssertionError, match="plan.rows says 20"):
        check_calls(plan, calls[:1], sigmas, 10, budget=False)
    split = [CallRecord("main", 10, ("c",), float(sigmas[0]), 0)] * 2 + calls[1:]
    check_calls(plan, split, sigmas, 10, budget=True)
    with pytest.raises(AssertionError, match="2 calls for 1 forward groups"):
        check_calls(plan, split, sigmas, 10, budget=False)


def test_an_expression_the_model_cannot_run_stops_with_guidekits_error() -> None:
    entry = Entry("eps", "CFG(2) | CADS(keys=('text',))")  # the bundled models have no text
    with pytest.raises(GuidanceError, match="text"):
        run_entry(entry, ModelCache(), digit_labels(1), steps=2, seed=0)


def test_rows_text_shows_a_range_when_a_gate_changes_rows() -> None:
    assert DemoRow(Entry("eps", "x"), rows=(20, 20, 10)).rows_text == "10-20"
    assert DemoRow(Entry("eps", "x"), rows=(30, 30)).rows_text == "30"


@pytest.mark.slow
def test_cli_runs_given_expressions(tmp_path: Path) -> None:
    out = tmp_path / "g.png"
    result = subprocess.run(
        [sys.executable, "-m", "guidekit", "demo", "--guidance", "CFG(2)", "-g",
         "CFG(2) + PAG(1) | APG(eta=0)", "--model", "flow", "--samples", "1", "--steps", "2",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(ln.startswith("CFG(2) ") and " flow " in ln for ln in lines)
    assert any(ln.startswith("CFG(2) + PAG(1) | APG(eta=0) ") for ln in lines)
    assert Image.open(out).size[1] == HEADER + 2 * (8 * ZOOM + PAD) + PAD


def test_the_check_line_names_a_split_the_auto_policy_kept(monkeypatch) -> None:
    # before: "one model call per forward group" also where the auto split had timed
    # smaller calls, and kept them (44 calls for 20 steps of one group)
    import guidekit.models.demo as demo_module

    def fake(entry, *args, **kwargs):
        return DemoRow(entry, calls=2 * STEPS, rows=(10,) * STEPS,
                       split="5-row calls" if entry.text == "Cond()" else "")

    monkeypatch.setattr(demo_module, "run_entry", fake)
    lines: list[str] = []
    run_model_demo(ENTRIES[:2], per_digit=1, steps=STEPS, out=None, progress=False,
                   echo=lines.append)
    check = next(line for line in lines if line.startswith("check:"))
    assert "one model call per forward group except where the auto split timed" in check
    assert "Cond() (5-row calls)" in check and "PAG" not in check
