"""The package's layers: no module imports from a layer above its own, and no import cycle.

Lowest first; a module may import from its own layer or any below (function-level imports included:
a lazy import up the layers is still a dependency up the layers). docs/architecture.md draws the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import zipmoe_ray

LAYERS = [
    {"_version", "_lazy", "errors", "env"},  # no dependencies
    {"codec", "models"},  # bit planes; model families and their transformers glue
    {"store"},  # the on-disk format, reading and writing
    {"cache", "schedule", "trace"},  # cache forms and accounting; the layer scheduler; routing traces
    {"runtime"},  # engine settings, the budget, prompts and stats as plain values
    {"stages"},  # executor, scheduler, loader, decompressor, expert host
    {"plan", "backends"},  # planning and calibration; where the stages run
    {"sim"},  # the simulator runs the scheduler and the planner
    {"engine", "streaming", "preflight"},  # the generation API
    {"cli", "actors", "serve", ""},  # entry points; "" is the package root
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
ROOT = Path(zipmoe_ray.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(("zipmoe_ray", *parts))] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every zipmoe_ray module ``name`` imports (resolved to modules, not names)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("zipmoe_ray"):
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            out.update(subs or [target])
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("zipmoe_ray"))
    return {m for m in out if m in MODULES and m != name}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_has_a_layer():
    missing = sorted({_layer(m) for m in MODULES} - set(RANK))
    assert not missing, f"add {missing} to LAYERS (and to docs/architecture.md)"


def test_no_import_runs_up_the_layers():
    bad = []
    for name, path in MODULES.items():
        for target in _imports(name, path):
            if RANK[_layer(target)] > RANK[_layer(name)]:
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    # a package's __init__ re-exporting its modules is not a cycle with a module that imports a sibling
    for name in graph:
        graph[name] = {
            t for t in graph[name] if not (MODULES[t].name == "__init__.py" and name.startswith(t + "."))
        }
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_planning_and_simulating_do_not_import_torch():
    """The simulator, the planner and the CLI's parser never touch a tensor; importing torch cost them a
    second or more of every `zipmoe simulate` and `zipmoe plan` (the store and codec export lazily)."""
    import subprocess
    import sys

    code = (
        "import sys, zipmoe_ray.cli.main, zipmoe_ray.sim, zipmoe_ray.plan, zipmoe_ray.stages.scheduler; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "something on the simulate path imports torch again"
