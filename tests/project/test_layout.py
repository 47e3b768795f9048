"""Where users import things from, and what the installed package may import."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_public_names_stay_where_users_import_them():
    import fused
    import fused.maps

    assert callable(fused.maps.trace)
    assert fused.FusedAttnProcessor is importlib.import_module("fused.processors.unet").FusedAttnProcessor
    from vico.methods import get_method
    from vico.methods.registry import METHODS

    assert get_method("vico") is METHODS["vico"]


def test_import_fused_and_vico_imports_no_test_module():
    code = "import sys, fused, fused.maps, vico, vico.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'tests'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "docs", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _module_imports(path: Path, package_root: Path) -> set[str]:
    """Modules of the package that ``path`` imports at module level (relative imports resolved)."""
    name = ".".join(path.relative_to(package_root.parent).with_suffix("").parts)
    is_pkg = path.name == "__init__.py"
    if is_pkg:
        name = name.rsplit(".", 1)[0]
    base = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:  # module level only: function-level imports are lazy
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{parent}.{node.module}" if node.module else parent
            else:
                mod = node.module or ""
            if node.module:  # `from . import x` imports submodule x, not its package's names
                found.add(mod)
            found.update(f"{mod}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _import_graph(package: str) -> dict[str, set[str]]:
    root = ROOT / package
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return {name: {m for m in _module_imports(path, root) if m in modules and m != name}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle_between_modules():
    for package in ("fused", "vico"):
        graph = _import_graph(package)
        assert _cycle(graph) is None, f"import cycle in {package}: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
