"""The floors of the codebase stay one-way: engine -> training -> runs -> alerts -> chat -> arena
-> site.

Every import counts, also those inside functions (a lazy import hides a circle from Python
but not from a reader), so a module that needs another one's caller gets a third module both
import instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "training", "runs", "alerts", "chat", "arena", "nanochat_site")
# What each package may import from the others (DESIGN.md "Dependency direction").
ALLOWED = {
    "engine": set(),
    "training": {"engine"},
    "runs": {"engine", "training", "nanochat_site"},
    # Alerts hear about runs through runs/signals.py; runs never imports alerts.
    "alerts": {"engine", "training", "runs", "nanochat_site"},
    "chat": {"engine", "training", "runs", "alerts", "nanochat_site"},
    "arena": {"engine", "training", "runs", "alerts", "chat", "nanochat_site"},
    "nanochat_site": {"engine", "training", "runs", "alerts", "chat", "arena"},
}
NO_DJANGO = ("engine", "training")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = [
        p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "migrations" not in p.parts
    ]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, trail = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return [*trail, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*trail, nxt]))
    return None


def test_no_module_imports_itself_back():
    graph = _graph()
    cycles = [c for m in sorted(graph) if (c := _cycle_through(graph, m))]
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_the_floors_below(package):
    wrong = []
    for path in (ROOT / package).rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in PACKAGES and top != package and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            if package in NO_DJANGO and top in ("django", "channels", "rest_framework", "celery"):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)
