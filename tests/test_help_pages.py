"""The nodes' help pages: ComfyUI's frontend shows WEB_DIRECTORY/docs/<node id>.md in its node docs
panel (fetched from /extensions/<pack folder>/docs/<node id>.md, images relative to that folder).
Every node has one, every picture a page shows exists, and each page names the node's inputs and
outputs. That ComfyUI serves them: tests/test_comfyui.py."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)[^)]*\)|<img[^>]*\ssrc=['\"]([^'\"]+)['\"]")


@pytest.fixture(scope="module")
def pack():
    """The pack imported as ComfyUI imports it: the repository folder's __init__.py as a package."""
    spec = importlib.util.spec_from_file_location("unifusion_help_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in [n for n in sys.modules if n.startswith(spec.name)]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def docs(pack) -> Path:
    return (ROOT / pack.WEB_DIRECTORY / "docs").resolve()


def test_web_directory_is_exported(pack):
    """ComfyUI (nodes.load_custom_node) serves getattr(module, "WEB_DIRECTORY"), relative to the pack."""
    assert "WEB_DIRECTORY" in pack.__all__
    web = (ROOT / pack.WEB_DIRECTORY).resolve()
    assert web.is_dir() and web.is_relative_to(ROOT), web


def test_every_node_has_a_help_page(pack, docs):
    pages = {p.stem for p in docs.glob("*.md")}
    assert set(pack.NODE_CLASS_MAPPINGS) <= pages, f"no help page for {set(pack.NODE_CLASS_MAPPINGS) - pages}"
    assert pages <= set(pack.NODE_CLASS_MAPPINGS), f"help pages for no node: {pages - set(pack.NODE_CLASS_MAPPINGS)}"


def test_every_picture_a_page_shows_exists(pack, docs):
    """The frontend prefixes a relative src with /extensions/<pack>/docs/ and leaves absolute ones
    alone: pictures must be relative, inside web/docs, and there."""
    shown = 0
    for cls in pack.NODE_CLASS_MAPPINGS:
        for found in IMAGE.finditer((docs / f"{cls}.md").read_text(encoding="utf-8")):
            src = found.group(1) or found.group(2)
            assert not re.match(r"^(/|[a-z]+:)", src), f"{cls}.md: {src} is not relative to web/docs"
            path = (docs / src).resolve()
            assert path.is_relative_to(docs), f"{cls}.md: {src} is outside web/docs (the server would not serve it)"
            assert path.is_file(), f"{cls}.md shows {src}, which is not in web/docs"
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{src} is not a PNG"
            shown += 1
    assert shown >= 1


def test_each_page_names_the_nodes_inputs_and_outputs(pack, docs):
    for cls, node in pack.NODE_CLASS_MAPPINGS.items():
        text = (docs / f"{cls}.md").read_text(encoding="utf-8")
        spec = node.INPUT_TYPES()
        names = [*spec["required"], *spec.get("optional", {}), *getattr(node, "RETURN_NAMES", ())]
        missing = [n for n in names if not re.search(rf"\b{re.escape(n)}\b", text)]
        assert not missing, f"{cls}.md does not mention {missing}"
        assert text.startswith(f"# {pack.NODE_DISPLAY_NAME_MAPPINGS[cls]}\n"), f"{cls}.md: title is not the node's name"
        assert 20 <= len(text.splitlines()) <= 80, f"{cls}.md: {len(text.splitlines())} lines"
