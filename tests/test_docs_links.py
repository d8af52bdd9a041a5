"""The README is the front door: it stays short, starts with the two commands, and every relative
link in it and in docs/*.md leads to a file that exists (and, for `#anchors` into Markdown, to a
heading that exists)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) and ![alt](target); the target ends at the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose(text: str) -> list[str]:
    """The lines of a Markdown page outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a Markdown page offers (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative link on a page, code blocks left out."""
    found = []
    text = page.read_text(encoding="utf-8")
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if fenced:
            continue
        for m in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, mailto:, ...
                continue
            found.append((number, target))
    return found


def test_slug_matches_github():
    assert slug("Exported models (`spotline export`, `bench --backends`)") == (
        "exported-models-spotline-export-bench---backends")
    assert slug("On a GPU (NVIDIA H200, torch 2.11 + CUDA 13.0)") == (
        "on-a-gpu-nvidia-h200-torch-211--cuda-130")
    assert slug("The demo models: `models/demo/`") == "the-demo-models-modelsdemo"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for number, target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{page.name}:{number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.name}:{number}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "\n".join(broken)


def test_pages_have_links_to_check():
    # The checker must see the README's links, or the test above would pass on nothing.
    targets = [t for _, t in links(README)]
    assert "docs/architecture.md" in targets
    assert any("#" in t for t in targets)


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move detail into docs/"
    assert lines[0].startswith("# ")
    first = next(i for i, line in enumerate(lines[1:], 1) if line.strip())
    assert lines[first] == "```sh"
    assert lines[first + 1].startswith("make demo")
    assert lines[first + 2].startswith("make test")
    assert lines[first + 3] == "```"


def test_readme_maps_every_docs_page():
    targets = {t.partition("#")[0] for _, t in links(README)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md"))
               if f"docs/{p.name}" not in targets]
    assert not missing, f"README.md does not link to docs/{missing}"


def test_no_issue_numbers_in_docs():
    # "issue 13", "issues #17", "(#30)"; not a consumer's name ("detect#0") or "restart #1".
    pattern = re.compile(r"\b[Ii]ssues? #?[0-9]+|\(#[0-9]+\)")
    hits = [f"{page.name}:{number}: {line.strip()}"
            for page in PAGES
            for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line)]
    assert not hits, "\n".join(hits)
