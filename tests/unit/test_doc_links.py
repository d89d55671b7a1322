"""Every relative link in README.md and docs/*.md points to an existing file and anchor.

Anchors follow GitHub's rule for headings: the heading's text (markdown marks removed),
lower-cased, with every character other than a letter, digit, space, ``-`` or ``_``
dropped and spaces turned into ``-``; a repeated heading gets ``-1``, ``-2``, ... Explicit
``<a id="...">`` / ``<a name="...">`` anchors count too. Fenced code is not markdown, so
neither its ``#`` lines nor its brackets count.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$", re.MULTILINE)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=[\"']([^\"']+)[\"']", re.IGNORECASE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def prose(text: str) -> str:
    """The markdown outside fenced code blocks and inline code spans."""
    text = FENCE.sub("", text)
    return re.sub(r"`+[^`\n]*`+", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*|_)(?=\S)(.+?)(?<=\S)\1", r"\2", text)  # emphasis marks
    text = "".join(ch for ch in text.strip().lower() if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link may name in ``path``."""
    text = path.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    found = set(HTML_ANCHOR.findall(text))
    for match in HEADING.finditer(FENCE.sub("", text)):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    text = prose(path.read_text(encoding="utf-8"))
    return [*LINK.findall(text), *REFERENCE.findall(text)]


def test_slug_follows_github() -> None:
    assert slug("CFG-Zero*") == "cfg-zero"
    assert slug("Cond, Uncond") == "cond-uncond"
    assert slug("PLADIS, GAG and NAG (attention modifiers)") == "pladis-gag-and-nag-attention-modifiers"
    assert slug("`guide()`: the custom-sampler API") == "guide-the-custom-sampler-api"
    assert slug("EMAG and EMAG-Q") == "emag-and-emag-q"
    assert slug("**Bold** _it_ [link](x.md)") == "bold-it-link"
    assert slug("snake_case stays") == "snake_case-stays"


def test_anchors_number_repeated_headings(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("# A\n## Limits\n```sh\n# not a heading\n```\n## Limits\n<a id=\"x\"></a>\n")
    assert anchors(page) == {"a", "limits", "limits-1", "x"}


def test_links_skip_code() -> None:
    assert LINK.findall(prose("see [t](docs/terms.md#cfg) and `[x](nowhere.md)`")) == ["docs/terms.md#cfg"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in links(path):
        if not target or EXTERNAL.match(target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file)).resolve() if file else path
        if ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target}: outside the repository")
        elif not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            broken.append(f"{target}: no heading or anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{path.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)
