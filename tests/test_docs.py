"""README stays a door, and the manual it opens onto holds together: README is short, every page it
links to exists, and every relative link (and #anchor) in README.md and docs/*.md resolves."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", flags=re.DOTALL | re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", flags=re.MULTILINE)


def prose(text: str) -> str:
    """Markdown without its fenced code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_a_door():
    lines = len(README.read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines; the manual belongs in docs/"


def test_readme_links_to_existing_docs_pages():
    pages = [t.split("#")[0] for t in links(README) if t.startswith("docs/") and t.split("#")[0].endswith(".md")]
    assert pages, "README links to no docs/ page"
    missing = [p for p in pages if not (ROOT / p).is_file()]
    assert not missing, f"README links to docs pages that do not exist: {missing}"


def test_every_docs_page_is_linked_from_readme():
    linked = {(ROOT / t.split("#")[0]).resolve() for t in links(README) if t.split("#")[0]}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages README does not link to: {orphans}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"


def test_the_module_tables_name_every_file_of_the_core_and_no_other():
    """docs/python.md's tables of unifusion_core/, encoders/ and train/ list what is there."""
    text = (ROOT / "docs" / "python.md").read_text()
    named = set(re.findall(r"`([a-z_0-9]+\.py)`", text))
    for folder in ("unifusion_core", "unifusion_core/encoders", "unifusion_core/train"):
        files = {p.name for p in (ROOT / folder).glob("*.py") if not p.name.startswith("__")}
        assert files <= named, f"{folder}: not in docs/python.md: {sorted(files - named)}"
    every = {p.name for p in (ROOT / "unifusion_core").rglob("*.py")}
    assert named <= every | {"__init__.py", "__main__.py"}, f"docs/python.md names files that are gone: {named - every}"


def test_the_encoder_families_table_lists_every_registered_model_type():
    from unifusion_core.encoders.registry import FAMILIES

    text = (ROOT / "docs" / "encoders.md").read_text()
    missing = [t for f in FAMILIES for t in f.model_types if f"`{t}`" not in text]
    assert not missing, f"docs/encoders.md's families table lacks {missing}"
