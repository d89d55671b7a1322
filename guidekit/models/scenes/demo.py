"""The scenes half of ``python -m guidekit demo``: captions in, a grid with one row per caption.

:func:`run_scene_demo` samples each caption under each entry (an expression on ``scenes``,
or on its few-step sibling ``scenes-fast`` at 2 steps), reads every sample back with the
shipped attribute classifier (per-attribute adherence to the caption, averaged over the
attributes; ``exact``: right on every attribute) and

* prints a table: expression, model, steps, model calls, rows per step, seconds,
  adherence, exact;
* writes a PNG grid: one row per caption (written on the left), one column per entry.

``negative`` is a caption for the conditioning ``neg`` (``CFG(1.5, negative='neg')``); with
the default entries it adds CFG with that negative, alone and with NAG steering away from
it inside the cross-attention.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

import guidekit
from guidekit.models.cache import ModelCache

#: The demo's captions when none are given: one and two objects, each background.
CAPTIONS = (
    "a large red circle on the left on a black background",
    "a small blue square at the top on a white background",
    "a large yellow triangle right of a small green circle on a grey background",
    "a large purple square above a large red triangle on a black background",
)
#: Steps of the few-step sibling's entries.
FAST_STEPS = 2
#: The demo's CFG scale on ``scenes``: past about 1.5 CFG costs FD and buys no accuracy there.
W = 1.5


@attrs.frozen
class SceneEntry:
    """One grid column: guidance text on a scenes model, with its Euler steps."""

    model: str
    text: str
    steps: int = 20

    @property
    def label(self) -> str:
        return f"{self.model}/{self.steps}: {self.text}"


def default_scene_entries(negative: bool = False) -> list[SceneEntry]:
    """Unguided, CFG, CFG + PAG, CFG + EMAG (the paper's ``w_e = 1.5``) on ``scenes`` at
    ``w = 1.5``, this model's useful range (docs/benchmarks.md; with a negative caption: CFG
    away from it, and with NAG), then unguided, GAG and NAG on ``scenes-fast`` at 2 steps."""
    entries = [SceneEntry("scenes", "Cond()"), SceneEntry("scenes", f"CFG({W:g})")]
    if negative:
        entries += [SceneEntry("scenes", f"CFG({W:g}, negative='neg')"),
                    SceneEntry("scenes", f"CFG({W:g}, negative='neg') | NAG(4, negative='neg')")]
    else:
        entries += [SceneEntry("scenes", f"CFG({W:g}) + PAG(1)"),
                    SceneEntry("scenes", f"CFG({W:g}) + EMAG({W * 0.5:g})")]
    return entries + [SceneEntry("scenes-fast", "Cond()", FAST_STEPS),
                      SceneEntry("scenes-fast", "Cond() | GAG(2)", FAST_STEPS),
                      SceneEntry("scenes-fast", "Cond() | NAG(4)", FAST_STEPS)]


def caption_labels(captions: Sequence[str]) -> torch.Tensor:
    """The attribute labels ``[N, heads]`` each caption describes; a caption outside the
    grammar is refused by ``vocab.parse``, naming the word and its position."""
    from guidekit.models.scenes.attributes import HEADS, scene_labels
    from guidekit.models.scenes.vocab import parse

    rows = []
    for c in captions:
        try:
            labels = scene_labels(parse(c))
        except ValueError as err:
            raise guidekit.GuidanceValueError(f"caption {c!r}: {err}") from None
        rows.append([labels[k] for k in HEADS])
    return torch.tensor(rows)


@attrs.frozen(eq=False)
class SceneRow:
    """One entry's samples (one per caption), calls, rows per step, time and scores."""

    entry: SceneEntry
    images: torch.Tensor
    calls: int
    rows: tuple[int, ...]
    seconds: float
    adherence: float
    exact: float


def run_scene_entry(entry: SceneEntry, models: ModelCache, captions: Sequence[str],
                    labels: torch.Tensor, *, seed: int, negative: str | None) -> SceneRow:
    from guidekit.models.scenes.classifier import adherence, shipped_classifier
    from guidekit.models.scenes.sample import sample_scenes

    conds = {"neg": negative} if negative is not None else None
    r = sample_scenes(models(entry.model), entry.text, captions, steps=entry.steps, seed=seed,
                      conds=conds)
    steps = sorted({c.step for c in r.calls})
    rows = tuple(sum(c.rows for c in r.calls if c.step == s) for s in steps)
    with torch.no_grad():
        right = adherence(shipped_classifier().predict(r.images), labels)
    exact = right.pop("all")
    return SceneRow(entry, r.images, len(r.calls), rows, r.seconds,
                    sum(right.values()) / len(right), exact)


def render_scene_grid(rows: Sequence[SceneRow], captions: Sequence[str], zoom: int = 3) -> Any:
    """A PIL image: one row per caption (the caption on the left), one column per entry
    (its label on top); every column starts from the same noise."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell, pad, head = 32 * zoom, 6, 30
    left = pad + max(int(probe.textlength(c, font=font)) for c in captions) + pad
    img = Image.new("RGB", (left + len(rows) * (cell + pad) + pad,
                            head + len(captions) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    for j, r in enumerate(rows):
        x = left + pad + j * (cell + pad)
        draw.text((x, 2), r.entry.model + f"/{r.entry.steps}", fill="black", font=font)
        draw.text((x, 15), r.entry.text[:cell // 6], fill="black", font=font)
        for i in range(len(captions)):
            px = ((r.images[i].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            px = px.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
            img.paste(Image.fromarray(px.permute(1, 2, 0).numpy(), mode="RGB"),
                      (x, head + pad + i * (cell + pad)))
    for i, c in enumerate(captions):
        draw.text((pad, head + pad + i * (cell + pad) + cell // 2 - 5), c, fill="black",
                  font=font)
    return img


def format_scene_table(rows: Sequence[SceneRow], n: int) -> str:
    head = ("expression", "model", "steps", "calls", "rows/step", "seconds", "adherence",
            "exact")
    body = [(r.entry.text, r.entry.model, str(r.entry.steps), str(r.calls),
             "-".join(sorted({str(min(r.rows)), str(max(r.rows))}, key=int)),
             f"{r.seconds:.1f}", f"{r.adherence:.3f}", f"{r.exact:.3f}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join([cells[0].ljust(widths[0])]
                       + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]).rstrip()
             for cells in [head, tuple("-" * w for w in widths), *body]]
    lines.append(f"N = {n} captions per expression; adherence = the attribute classifier's "
                 "per-attribute agreement with the caption (exact: every attribute)")
    return "\n".join(lines)


def run_scene_demo(
    entries: Sequence[SceneEntry] | None = None,
    captions: Sequence[str] | None = None,
    *,
    negative: str | None = None,
    seed: int = 0,
    out: str | Path | None = "guidekit-demo-scenes.png",
    echo: Callable[[str], None] | None = print,
    device: Any = "cpu",
) -> list[SceneRow]:
    """Sample every caption under each entry, print the table, write the grid PNG."""
    say = echo or (lambda _: None)
    start = time.perf_counter()
    captions = list(captions or CAPTIONS)
    labels = caption_labels(captions)
    if entries is None:
        entries = default_scene_entries(negative is not None)
    exprs = [guidekit.parse(e.text) for e in entries]  # a typo fails before anything loads
    if negative is not None:
        if not any("neg" in guidekit.compile(e).conditionings for e in exprs):
            raise guidekit.GuidanceValueError(
                f"negative caption {negative!r} is the conditioning 'neg', which no "
                "expression reads: add one that does, e.g. --guidance \"CFG(1.5, negative='neg')\"")
        from guidekit.models.scenes.tokenizer import Tokenizer

        try:
            Tokenizer().encode(negative)
        except ValueError as err:
            raise guidekit.GuidanceValueError(f"negative caption {negative!r}: {err}") from None
    models = ModelCache(device)
    rows = [run_scene_entry(e, models, captions, labels, seed=seed, negative=negative)
            for e in entries]
    say(format_scene_table(rows, len(captions)))
    if negative is not None:
        say(f"negative 'neg' = {negative!r} for every caption")
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        render_scene_grid(rows, captions).save(path)
        say(f"wrote {path} (rows: captions; columns: expressions, model/steps on top)")
    say(f"scenes total {time.perf_counter() - start:.1f} s")
    return rows
