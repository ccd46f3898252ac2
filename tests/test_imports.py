"""The package has no import cycles: every import between sparselora's modules (module level or inside a
function) is read from the source, and the graph must be acyclic."""

import ast
from pathlib import Path

import sparselora

ROOT = Path(sparselora.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = ["sparselora", *p.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
            out |= subs
            if len(subs) < len(node.names):  # `from pkg import name`: pkg itself (a submodule needs only its parent)
                out.add(base)
    return {m for m in out if m in mods and m != name}


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)



def test_the_flops_function_shadows_no_module():
    import importlib

    assert callable(sparselora.flops)
    assert importlib.import_module("sparselora.flop_count").flops is sparselora.flops
    assert not (ROOT / "flops.py").exists()  # `import sparselora.flops as m` would give the function, not it
