"""The scenes half of ``python -m guidekit demo`` (issue 13): captions from the command line,
a negative caption, a table checked against the calls and a grid with one row per caption."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from guidekit.errors import GuidanceError
from guidekit.models.cli import main
from guidekit.models.scenes.demo import (
    CAPTIONS,
    SceneEntry,
    caption_labels,
    default_scene_entries,
    run_scene_demo,
)

NEG = "a large blue circle on the left on a black background"


def test_default_entries_show_both_models_and_the_negative_caption() -> None:
    plain = default_scene_entries()
    assert {e.model for e in plain} == {"scenes", "scenes-fast"}
    assert any("GAG" in e.text and e.steps <= 4 for e in plain)
    assert not any("neg" in e.text for e in plain)
    assert any("NAG" in e.text and "neg" in e.text for e in default_scene_entries(True))


def test_the_table_and_grid_match_the_samples(tmp_path) -> None:
    lines: list[str] = []
    entries = [SceneEntry("scenes", "Cond()", 2),
               SceneEntry("scenes", "CFG(3, negative='neg') | NAG(4, negative='neg')", 2),
               SceneEntry("scenes-fast", "Cond() | GAG(2)", 1)]
    rows = run_scene_demo(entries, CAPTIONS[:2], negative=NEG, out=tmp_path / "s.png",
                          echo=lines.append)
    assert [(r.calls, r.rows) for r in rows] == [(2, (2, 2)), (2, (4, 4)), (1, (2,))]
    text = "\n".join(lines)
    assert "CFG(3, negative='neg') | NAG(4, negative='neg')" in text and repr(NEG) in text
    img = Image.open(tmp_path / "s.png").convert("RGB")
    assert img.size[1] == 30 + 2 * (96 + 6) + 6
    # the caption rows hold the samples: first caption, first column, top-left pixel
    first = rows[0].images[0]
    px = ((first[:, 0, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).tolist()
    left = img.size[0] - 3 * (96 + 6)
    assert list(img.getpixel((left, 36))) == px


def test_bad_captions_are_refused_by_word() -> None:
    with pytest.raises(GuidanceError, match="caption 'a small red blob"):
        caption_labels(["a small red blob on the left on a black background"])
    with pytest.raises(GuidanceError, match="which no expression reads"):
        run_scene_demo([SceneEntry("scenes", "CFG(3)", 1)], CAPTIONS[:1], negative=NEG,
                       out=None, echo=None)


def test_the_cli_runs_captions_and_refuses_mixed_families(tmp_path, capsys) -> None:
    out = tmp_path / "d.png"
    rc = main(["demo", "--model", "scenes-fast", "-g", "Cond() | GAG(2)", "--steps", "1",
               "--caption", CAPTIONS[0], "--out", str(out), "--no-progress"])
    assert rc == 0 and (tmp_path / "d-scenes.png").exists() and not out.exists()
    assert "Cond() | GAG(2)" in capsys.readouterr().out
    assert main(["demo", "--caption", CAPTIONS[0], "--negative", "3"]) == 2
    assert "--negative-caption" in capsys.readouterr().err
    assert main(["demo", "--model", "eps", "--caption", CAPTIONS[0]]) == 2
    assert main(["demo", "--model", "scenes", "-g", "CFG(3)", "--steps", "1", "--caption",
                 "a small red blob", "--out", str(out)]) == 2
    assert "blob" in capsys.readouterr().err
