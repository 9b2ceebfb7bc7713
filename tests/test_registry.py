"""Registry readiness: the code ComfyUI imports reads no environment, starts no process and opens
no connection (the Comfy Registry's scanner flags these); the archive `comfy node publish` uploads,
built here as comfy-cli builds it, is the node pack alone, passes the same scan in every file,
imports and loads the embedded model without the trainer; and pyproject.toml carries what the
registry's specification asks for."""

import ast
import json
import re
import shutil
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


def _findings(path: Path, root: Path = ROOT) -> list[str]:
    rel = path.relative_to(root) if path.is_relative_to(root) else path.name
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


def _git(repo: Path, *args: str) -> list[str]:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args, "-z"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (the registry packs git-tracked files)")
    return [f for f in out.stdout.split("\0") if f]


def _pyproject(repo: Path = ROOT) -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")
    return tomllib.loads((repo / "pyproject.toml").read_text())


def archive_files(repo: Path) -> list[str]:
    """The files `comfy node pack` / `comfy node publish` put in the archive, chosen as comfy-cli's
    zip_files does (comfy_cli/file_utils.py): the git-tracked files that exist, minus those
    .comfyignore's patterns match (.gitignore syntax, matched here by git itself), plus every file
    under each [tool.comfy] includes path, tracked or not."""
    files = {f for f in _git(repo, "ls-files") if (repo / f).is_file()}
    if (repo / ".comfyignore").is_file():
        files -= set(_git(repo, "ls-files", "--cached", "--ignored", "--exclude-from=.comfyignore"))
    for include in _pyproject(repo).get("tool", {}).get("comfy", {}).get("includes", []):
        path = repo / include.lstrip("/")
        found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files |= {str(p.relative_to(repo)) for p in found}
    return sorted(files)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """The published archive, unpacked: the pack as ComfyUI-Manager installs it from the registry."""
    out = tmp_path_factory.mktemp("archive") / "comfyui-unifusion"
    for f in archive_files(ROOT):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / f, out / f)
    return out


def _listing(archive: Path) -> set[str]:
    return {str(p.relative_to(archive)) for p in archive.rglob("*") if p.is_file()}


def test_the_archive_is_the_node_pack(archive, import_path):
    files = _listing(archive)
    top = {f.split("/")[0] for f in files}
    pack = {"__init__.py", "nodes", "unifusion_core", "workflows", "requirements.txt", "pyproject.toml", "README.md",
            "LICENSE"}
    # web/ (the nodes' help pages) goes in as soon as the pack serves it and git tracks it
    web = re.search(r"^WEB_DIRECTORY\s*=\s*[\"']\./(\w+)", (ROOT / "__init__.py").read_text(), re.M)
    if web:
        pack.add(web.group(1))
        assert any(f.startswith(web.group(1) + "/docs/") for f in files), "the help pages are not in the archive"
        assert set(_git(ROOT, "ls-files", web.group(1))) <= files  # .comfyignore drops none of them
    assert top == pack, f"the archive holds {sorted(top - pack)} and lacks {sorted(pack - top)}"
    assert not [f for f in files if f.startswith("unifusion_core/train/") or "__pycache__" in f or f.endswith(".pyc")]
    needed = {str(f.relative_to(ROOT)) for f in import_path}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "workflows").rglob("*") if p.is_file()}
    # the shipped files the bundled workflows load: the checkpoint, the scene VLM, the demo LoRA
    needed |= {f"unifusion_core/assets/{name}" for name in
               ("unifusion-scenes-64.safetensors", "scene-vlm.safetensors", "lora-cyan.safetensors")}
    assert not needed - files, f"the archive lacks files the pack needs: {sorted(needed - files)}"


def test_every_file_in_the_archive_passes_the_scan(archive):
    py = sorted(archive.rglob("*.py"))
    assert len(py) > 40
    findings = [f for path in py for f in _findings(path, archive)]
    assert not findings, "the registry's scanner flags these in the published archive:\n" + "\n".join(findings)


# After the import, the pack's own unifusion_core (not the checkout's) loads the embedded model.
_USE_THE_CORE = _IMPORT_LIKE_COMFYUI + r"""
core = sys.modules[name + ".unifusion_core"]
assert Path(core.__file__).is_relative_to(root) and not hasattr(core, "train")
model = core.load_model(core.bundled_model())
print(json.dumps(type(model).__name__))
"""


def test_the_archive_imports_and_loads_the_embedded_model_without_the_trainer(archive, tmp_path):
    assert not (archive / "unifusion_core" / "train").exists()
    out = subprocess.run([sys.executable, "-c", _USE_THE_CORE, str(archive)], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    imported, model = out.stdout.splitlines()[-2:]
    assert "nodes/host.py" in json.loads(imported) and json.loads(model) == "UniFusionModel"


def test_the_archive_is_chosen_as_comfy_cli_chooses_it(tmp_path, monkeypatch):
    """.comfyignore's patterns as comfy-cli applies them, on a throwaway repository holding the
    paths that matter: anchored folders drop only the root's, the pack's web/docs/ stays."""
    for var in ("GIT_DIR", "GIT_INDEX_FILE", "GIT_WORK_TREE"):  # set under git hooks: not this repository's
        monkeypatch.delenv(var, raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    shutil.copyfile(ROOT / ".comfyignore", repo / ".comfyignore")
    (repo / "pyproject.toml").write_text("[tool.comfy]\nincludes = []\n")
    kept = ["__init__.py", "nodes/host.py", "unifusion_core/model.py", "unifusion_core/encoders/load.py",
            "unifusion_core/assets/m.safetensors", "web/docs/UniFusionSample.md", "web/docs/img/a.png",
            "workflows/a b.json", "requirements.txt", "pyproject.toml", "README.md", "LICENSE"]
    dropped = ["tests/test_x.py", "tools/t.py", "bench/b.py", "docs/training.md", "docs/icon.png",
               "unifusion_core/train/dist.py", "unifusion_core/train/__init__.py", ".ci/run", "Makefile",
               "constraints.txt", "requirements-train.txt", ".gitignore", ".comfyignore", "nodes/__pycache__/x.pyc"]
    for f in kept + dropped:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / f).touch()
    subprocess.run(["git", "-C", str(repo), "add", "-f", "."], check=True)
    (repo / "untracked.py").touch()  # only tracked files are packed
    assert archive_files(repo) == sorted(kept)
    # includes add their files, tracked or not
    (repo / "pyproject.toml").write_text('[tool.comfy]\nincludes = ["dist"]\n')
    (repo / "dist").mkdir()
    (repo / "dist" / "main.js").touch()
    assert archive_files(repo) == sorted(kept + ["dist/main.js"])


def test_pyproject_has_what_the_registry_asks_for():
    """docs.comfy.org/registry/specifications, as comfy-cli reads it (comfy_cli/registry/config_parser.py)."""
    data = _pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name), name
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    # a table with a file or a text: comfy-cli warns on anything else, and the file is in the archive
    assert project["license"] == {"file": "LICENSE"}
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("GNU GENERAL PUBLIC LICENSE")
    assert project["description"] and project["requires-python"]
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert project["urls"]["Documentation"] and project["urls"]["Bug Tracker"]
    os_classifiers = [c for c in project["classifiers"] if c.startswith("Operating System :: ")]
    assert os_classifiers and all(c.split(" :: ")[1] in {"Microsoft", "POSIX", "MacOS", "OS Independent"}
                                  for c in os_classifiers)
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r"https://\S+\.(png|svg|jpg|gif)", comfy["Icon"])
    icon = ROOT / comfy["Icon"].split("/main/", 1)[1]  # the file the URL serves, from this checkout
    assert icon.is_file()
    if icon.suffix == ".png":
        width, height = int.from_bytes(icon.read_bytes()[16:20], "big"), int.from_bytes(icon.read_bytes()[20:24], "big")
        assert width <= 800 and height <= 400, (width, height)
    for part in comfy["requires-comfyui"].split(","):  # comfy-cli's validate_version pattern
        assert re.fullmatch(r"(==|>=|<=|!=|~=|>|<|<>|=)?\s*\d+\.\d+\.\d+", part.strip()), part
    assert comfy.get("includes", []) == []  # everything the pack needs is tracked (see .comfyignore)
