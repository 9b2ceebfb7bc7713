"""Registry readiness: the code ComfyUI imports reads no environment, starts no process and opens
no connection (the Comfy Registry's scanner flags these), and .comfyignore keeps development files
out of the published archive without dropping anything the pack needs."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Import the pack the way ComfyUI's load_custom_node does (the folder's __init__.py as a package
# named after its path) in a fresh interpreter, and list the pack's files that got imported.
_IMPORT_LIKE_COMFYUI = r"""
import importlib.util, json, sys
from pathlib import Path
root = Path(sys.argv[1])
name = str(root).replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, root / "__init__.py")
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
assert module.NODE_CLASS_MAPPINGS
files = {Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
ours = [f.relative_to(root) for f in files if f.is_relative_to(root)]
print(json.dumps(sorted(str(f) for f in ours if not any(p.startswith(".") for p in f.parts))))
"""

# Modules whose import means subprocesses or network access.
BANNED_MODULES = {
    "subprocess", "socket", "ssl", "urllib", "urllib3", "http", "requests", "httpx", "aiohttp",
    "ftplib", "smtplib", "websocket", "websockets", "huggingface_hub", "pip",
}
# os functions that read or write the environment or start processes.
BANNED_OS = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv", "system", "popen",
             "fork", "forkpty"}
BANNED_BUILTINS = {"eval", "exec", "__import__"}


def _relative_imports(path: Path) -> set[Path]:
    """Files of the pack a module imports relatively, at the top or inside functions (lazy)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            stems = [node.module] if node.module else [a.name for a in node.names]
            for stem in stems:
                target = base.joinpath(*stem.split("."))
                for f in (target.with_suffix(".py"), target / "__init__.py"):
                    if f.is_file():
                        found.add(f)
    return found


@pytest.fixture(scope="module")
def import_path(tmp_path_factory) -> list[Path]:
    """The pack's source files that run inside ComfyUI: what importing it loads, plus the pack's
    modules those import lazily (inside functions)."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_LIKE_COMFYUI, str(ROOT)],
        cwd=tmp_path_factory.mktemp("elsewhere"),  # not the checkout: nothing importable by accident
        capture_output=True, text=True, check=True,
    ).stdout
    files = {ROOT / f for f in json.loads(out.splitlines()[-1])}
    todo = list(files)
    while todo:
        for f in _relative_imports(todo.pop()) - files:
            files.add(f)
            todo.append(f)
    return sorted(files)


def _findings(path: Path) -> list[str]:
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        what = None
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
            if node.module == "os":
                names += [f"os.{a.name}" for a in node.names if a.name in BANNED_OS]
        else:
            names = []
        for name in names:
            if name.split(".")[0] in BANNED_MODULES or name.startswith("os."):
                what = f"imports {name}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "os" and (node.attr in BANNED_OS or node.attr.startswith(("spawn", "exec"))):
                what = f"os.{node.attr}"
            elif node.value.id == "torch" and node.attr == "hub":  # downloads
                what = "torch.hub"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in BANNED_BUILTINS:
            what = f"{node.func.id}()"
        if what:
            found.append(f"{rel}:{node.lineno}: {what}")
    return found


def test_import_path_is_the_nodes_and_the_core(import_path):
    names = {str(f.relative_to(ROOT)) for f in import_path}
    assert {"__init__.py", "nodes/host.py", "unifusion_core/encoders/encoder.py"} <= names
    # training and the CLIs are never imported by the nodes
    assert not [n for n in names if n.startswith(("tests/", "tools/", "bench/", "unifusion_core/train/"))], names


def test_no_environment_process_or_network_on_the_import_path(import_path):
    findings = [f for path in import_path for f in _findings(path)]
    assert not findings, "the registry's scanner flags these:\n" + "\n".join(findings)


def test_the_scan_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import os, subprocess\nfrom urllib.request import urlopen\nfrom os import getenv\n"
                   "x = os.environ.get('A')\neval('1')\nmodel.eval()\nimport torch\ntorch.hub.load('a', 'b')\n")
    found = _findings(bad)
    assert sorted(f.split(": ", 1)[1] for f in found) == sorted(
        ["imports subprocess", "imports urllib.request", "imports os.getenv", "os.environ", "eval()", "torch.hub"]
    ), found


def _git_ls(*args: str) -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (the registry packs git-tracked files)")
    return set(out.stdout.splitlines())


def test_comfyignore_keeps_the_pack_and_drops_development_files(import_path):
    ignore = ["--exclude-from=.comfyignore"]
    assert (ROOT / ".comfyignore").is_file()
    dev = _git_ls("--cached", "--", "tests", ".ci", "tools", "bench", "Makefile", "constraints.txt")
    assert any(f.startswith("tests/") for f in dev) and any(f.startswith(".ci/") for f in dev)
    assert _git_ls("--cached", "--ignored", *ignore, "--", *dev) == dev

    needed = [str(f.relative_to(ROOT)) for f in import_path]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "unifusion_core" / "assets").glob("*.safetensors")]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "workflows").rglob("*") if p.is_file()]
    needed += [n for n in ("requirements.txt", "pyproject.toml", "README.md", "LICENSE") if (ROOT / n).exists()]
    assert "unifusion_core/assets/unifusion-scenes-64.safetensors" in needed
    dropped = _git_ls("--cached", "--others", "--ignored", *ignore, "--", *needed)
    assert not dropped, f".comfyignore leaves out files the pack needs: {sorted(dropped)}"
