"""The house is one-way: planner -> core <- runtime, the application on top; the core and the
planner never import torch; no module imports itself round a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flexgen_graph", "planner", "runtime")
# what each layer may import from the project
ALLOWED = {"core": {"core"}, "planner": {"core", "planner"}, "runtime": {"core", "runtime"},
           "app": {"core", "planner", "runtime", "app"}}
NO_TORCH = {"core", "planner"}


def layer(module: str) -> str | None:
    top = module.split(".")[0]
    if top == "flexgen_graph":
        # `python -m flexgen_graph` is the application's entry point
        return "app" if module.startswith(("flexgen_graph.app", "flexgen_graph.__main__")) else "core"
    return top if top in ("planner", "runtime") else None


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """Absolute names of what a module imports (anywhere in it, or at module level only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - n.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in n.names}  # `from pkg import module`
    return out


def project_target(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def test_no_upward_import_and_no_torch_below_the_runtime():
    known, bad = modules(), []
    for mod, path in known.items():
        mine = layer(mod)
        for name in imports(path, mod, top_level_only=False):
            top = name.split(".")[0]
            if top == "torch" and mine in NO_TORCH:
                bad.append(f"{mod} imports {name}")
            target = project_target(name, known)
            if target and layer(target) not in ALLOWED[mine]:
                bad.append(f"{mod} ({mine}) imports {target} ({layer(target)})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    known = modules()
    g = nx.DiGraph()
    for mod, path in known.items():
        for name in imports(path, mod, top_level_only=True):
            target = project_target(name, known)
            if target and target != mod and not mod.startswith(target + "."):  # a package's own __init__ runs first
                g.add_edge(mod, target)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_core_and_planner_load_without_torch():
    code = ("import sys, flexgen_graph, flexgen_graph.planfile, flexgen_graph.lower, flexgen_graph.hardware, "
            "planner.search, planner.verify, planner.schedule; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'runtime', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
