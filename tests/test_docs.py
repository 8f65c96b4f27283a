"""The Markdown pages link only to files (and headings) that exist, and the README stays a short front page."""

import re
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def pages() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "recipes" / "README.md"]
    for folder in ("docs", "experiments"):
        found += sorted((ROOT / folder).rglob("*.md"))
    return [p for p in found if p.is_file()]


def prose_lines(text: str, strip_code: bool = True):
    """(line number, line) outside fenced code blocks, inline code removed unless ``strip_code=False``."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, INLINE_CODE.sub("", line) if strip_code else line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading.strip()).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    headings = (re.match(r"#{1,6} (.+)", line) for _, line in prose_lines(page.read_text(), strip_code=False))
    return {slug(m.group(1)) for m in headings if m}


def broken_links(page: Path) -> list[str]:
    broken = []
    for number, line in prose_lines(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, fragment = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{number}: {target}"
            if not resolved.exists():
                broken.append(f"{where} (no such file: {resolved})")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                broken.append(f"{where} (no heading with anchor #{fragment} in {resolved.name})")
    return broken


def test_pages_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in pages()}
    assert {"README.md", "docs/design.md", "benchmarks/README.md"} <= names


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_link_check_catches_a_broken_link(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading: with `code`\n")
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading-with-code) `[code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n[bad](missing.md) [bad anchor](there.md#nope) [web](https://x.y/z)\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    problems = broken_links(page)
    assert len(problems) == 2
    assert "missing.md (no such file" in problems[0] and "#nope" in problems[1]


def test_readme_is_a_short_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move a section into a page under docs/ (at most 250)"
