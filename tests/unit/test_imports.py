"""The package's import graph: no cycle among module-level imports, and the engine does not import Ray (the factory
above both, layerstream/api.py, opens a pipeline)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "layerstream"


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(name: str, path: Path, mods, top_level: bool) -> set[str]:
    """The package's modules that `name` imports (at module level only, or anywhere in it)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = ast.walk(tree) if not top_level else (
        n for stmt in tree.body for n in (ast.walk(stmt) if isinstance(stmt, (ast.If, ast.Try)) else [stmt]))
    out = set()
    for n in nodes:
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - n.level + 1] + ([n.module] if n.module else []))
            for alias in n.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base)
        elif isinstance(n, ast.Import):
            out.update(alias.name for alias in n.names)
    return {m for m in out if m in mods and m != name}


def test_no_import_cycle_at_module_level():
    mods = modules()
    graph = {m: imports(m, f, mods, top_level=True) for m, f in mods.items()}
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert len(graph) > 40 and not cycles, cycles


def test_the_engine_does_not_import_ray():
    mods = modules()
    engine = [m for m in mods if m.startswith("layerstream.engine")]
    assert "layerstream.engine.scheduler" in engine
    bad = {m: sorted(x for x in imports(m, mods[m], mods, top_level=False) if x.startswith("layerstream.ray"))
           for m in engine}
    assert not any(bad.values()), bad
    src = "".join(mods[m].read_text() for m in engine)
    assert "import ray" not in src and "from ray" not in src
