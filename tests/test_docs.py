"""The README stays a front door and no link in it or in docs/ points nowhere.

Every relative link and image in README.md and docs/*.md must name a file that exists, and a `#anchor` must name
a heading of the file it points to (GitHub's slugs). Links inside code blocks and code spans are not links.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250

# [text](target) and ![alt](target); the target may carry a "title" after a space.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^\s{0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto: ...


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with code spans blanked out."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
            continue
        lines.append("" if fenced else CODE_SPAN.sub("", line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text without markup, lower-cased, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters of any script, digits and '_'
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get -1, -2 ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of each relative link and image in a Markdown file."""
    found = []
    lines = prose_lines(path.read_text(encoding="utf-8"))
    for number, line in enumerate(lines, start=1):
        for m in INLINE_LINK.finditer(line):
            found.append((number, m.group(1)))
    for m in REFERENCE_DEFINITION.finditer("\n".join(lines)):
        found.append(("\n".join(lines)[: m.start()].count("\n") + 1, m.group(1)))
    return [(n, t) for n, t in found if not EXTERNAL.match(t)]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per link whose file or heading does not exist, named by the file and line it is on."""
    problems = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not linked.exists():
            problems.append(f"{where} -> no file {linked}")
        elif anchor and linked.suffix == ".md" and unquote(anchor).lower() not in anchors(linked):
            problems.append(f"{where} -> no heading '#{anchor}' in {linked.relative_to(root)}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    assert broken_links(path) == []


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_the_checker_sees_broken_links(tmp_path: Path):
    (tmp_path / "other.md").write_text("# Serving (`bench/serve.py`)\n## Twice\n## Twice\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#serving-benchservepy) [second](other.md#twice-1) ![img](other.md) [web](https://x.org/y)\n"
        "[self](#a-heading) `[code](missing.md)`\n```\n[fenced](missing.md)\n```\n# A heading\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) ![gone image](pic.png)\n",
        encoding="utf-8",
    )
    assert [p.split(" -> ")[0] for p in broken_links(page, root=tmp_path)] == [
        "page.md:7: missing.md",
        "page.md:7: other.md#nowhere",
        "page.md:7: pic.png",
    ]
