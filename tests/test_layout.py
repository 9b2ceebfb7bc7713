"""The house's import graph: layered, without a cycle (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "unifusion_core"
# Entry points and the layers above the library: nothing below them imports them.
TOP = ("unifusion_core.__main__", "unifusion_core.train", "unifusion_core.eval")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (ROOT / Path(*name.split(".")) / "__init__.py").is_file()


def exists(name: str) -> bool:
    return is_package(name) or (ROOT / Path(*name.split("."))).with_suffix(".py").is_file()


def imports(path: Path) -> set[str]:
    """The unifusion_core modules a file imports, anywhere in it (submodules, not their package, where
    `from package import submodule` names one)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("unifusion_core")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("unifusion_core"):
                continue
            subs = {f"{target}.{a.name}" for a in node.names if exists(f"{target}.{a.name}")}
            out |= subs or {target}
            if subs != {f"{target}.{a.name}" for a in node.names}:
                out.add(target)  # names from the package's own __init__ too
    out.discard(me)
    return {m for m in out if exists(m)}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in CORE.rglob("*.py")}


def test_the_core_has_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g.get(m, ())):
            if n.startswith(m + ".") and is_package(m):
                continue  # a package's __init__ re-exporting its own submodules
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_trainer_the_benchmark_or_the_clis():
    g = graph()
    upward = sorted(f"{m} -> {n}" for m, deps in g.items() if not m.startswith(TOP)
                    for n in deps if n.startswith(TOP))
    assert not upward, upward


def test_the_cycle_check_sees_a_lazy_import_cycle(tmp_path, monkeypatch):
    """The check above can fail: a cycle made by an import inside a function is found."""
    pkg = tmp_path / "unifusion_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "CORE", pkg)
    assert graph() == {"unifusion_core": set(), "unifusion_core.a": {"unifusion_core.b"},
                       "unifusion_core.b": {"unifusion_core.a"}}
