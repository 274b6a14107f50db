"""The package's structure, checked from its source: no import cycle (function-level imports
included), dependencies point down the layers of the design, and quantizer state is changed only
through the Quantizer's own methods."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "qdrop"

# Layers, bottom first: a module may import its own layer and the layers below, never above.
# (The design: quant <- graph/nlp <- recon/export <- api <- cli/bench; the small helpers at the
# bottom import nothing of qdrop's higher layers.)
LAYERS = [
    {"errors", "io", "distributed"},
    {"quant", "models", "data", "eval"},
    {"graph", "nlp"},
    {"recon", "export"},
    {"api", "pipeline", "nlp_pipeline", "demo", "train"},
    {"cli", "bench", "__init__", "__main__"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every qdrop module `path` imports, at any depth of the file (functions included)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "qdrop"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qdrop":
                continue
            found.add(target)
            for a in node.names:  # `from . import bench` imports a module
                if (SRC.parent / (target + "." + a.name).replace(".", "/")).with_suffix(".py").exists() or \
                        (SRC.parent / (target + "." + a.name).replace(".", "/") / "__init__.py").exists():
                    found.add(f"{target}.{a.name}")
    return found - {mod}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for t in imports_of(path):
            while t and t not in modules:  # `from qdrop.x import name`: the module is qdrop.x
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                targets.add(t)
        edges[name] = targets
    return edges


def _package_of(module: str) -> str:
    """A module's own imports of its package's __init__ are not edges of the design (Python
    runs the __init__ first anyway): qdrop.nlp.units -> qdrop.nlp is not a cycle."""
    return module.rsplit(".", 1)[0]


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycle():
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph().items()}
    cycles = find_cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of the design (add it to LAYERS)")


def test_dependencies_point_down():
    bad = []
    for m, targets in graph().items():
        for t in targets:
            if m.startswith(t + ".") or t == "qdrop":
                continue
            if layer_of(t) > layer_of(m):
                bad.append(f"{m} -> {t}")
    assert not bad, "imports that point up the layers: " + ", ".join(sorted(bad))


def test_graph_never_imports_nlp():
    bad = [f"{m} -> {t}" for m, ts in graph().items() if m.startswith("qdrop.graph") for t in ts if t.startswith("qdrop.nlp")]
    assert not bad, bad


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path, monkeypatch):
    """A function-level import closing a loop is found (the tests above could not fail otherwise)."""
    pkg = tmp_path / "qdrop"
    (pkg / "graph").mkdir(parents=True)
    (pkg / "nlp").mkdir()
    for f in ("__init__.py", "graph/__init__.py", "nlp/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "graph" / "a.py").write_text("def f():\n    from ..nlp import b\n")
    (pkg / "nlp" / "b.py").write_text("from qdrop.graph.a import f\n")
    import sys

    me = sys.modules[__name__]
    monkeypatch.setattr(me, "SRC", pkg)
    edges = graph()
    assert "qdrop.nlp.b" in edges["qdrop.graph.a"] and "qdrop.graph.a" in edges["qdrop.nlp.b"]
    assert find_cycles(edges)


QUANTIZER_FIELDS = {"state", "prob", "calibrated", "observer", "alpha", "hard_round", "round_up", "scheme"}


def test_quantizer_state_changes_only_through_its_methods():
    """Outside quant/, nothing assigns a Quantizer's fields or copies into its scale / zero point:
    it calls set_state / set_range / set_drop / ... (quant/quantizer.py)."""
    bad = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "quant":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(el, ast.Attribute) and el.attr in QUANTIZER_FIELDS and not (
                            isinstance(el.value, ast.Name) and el.value.id == "self"):
                        bad.append(f"{path.relative_to(SRC)}:{node.lineno} .{el.attr} =")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "copy_":
                owner = node.func.value
                if isinstance(owner, ast.Attribute) and owner.attr in ("scale", "zero_point"):
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno} .{owner.attr}.copy_")
    assert not bad, "quantizer fields written outside quant/: " + ", ".join(bad)


def test_benchmark_scripts_import_only_what_qdrop_has():
    """The benchmark scripts import qdrop inside functions that only a long run reaches: a moved or
    renamed module must fail here, not an hour into a benchmark."""
    import importlib

    # rglob: the results folders keep the scripts that made them
    scripts = sorted((SRC.parents[1] / "benchmarks").rglob("*.py"))
    assert scripts
    missing = []
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "qdrop":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                        missing.append(f"{path.relative_to(SRC.parents[1])}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "qdrop" and importlib.util.find_spec(alias.name) is None:
                        missing.append(f"{path.relative_to(SRC.parents[1])}: import {alias.name}")
    assert not missing, missing
