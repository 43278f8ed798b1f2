"""The import rules of docs/architecture.md, read from the code: every module's imports are
parsed (no import is executed), and the layers and the absence of cycles are checked."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("cpmjax", "pallas_kernels", "sharding")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The longest known module that ``name`` names (``a.b.func`` -> ``a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: pathlib.Path) -> set[str]:
    """Modules of our packages that ``module`` imports, anywhere in its body (function-level
    imports count: a lazy import is still an edge of the graph)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # ``from pkg import module`` is an edge to that module; ``from pkg import name``
                # (a re-exported function or class) is an edge to ``pkg`` itself
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in MODULES else source)
    resolved = {_resolve(t) for t in targets if t.split(".")[0] in PACKAGES}
    return {r for r in resolved if r and r != module}


def _graph() -> dict[str, set[str]]:
    return {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_parser_sees_the_packages():
    graph = _graph()
    assert {"cpmjax", "cpmjax.ops", "sharding.burst", "pallas_kernels"} <= set(graph)
    assert "cpmjax.models" in graph["cpmjax.hf"]


def test_kernels_and_sharding_import_nothing_from_cpmjax():
    graph = _graph()
    offenders = {
        module: sorted(t for t in targets if t.split(".")[0] == "cpmjax")
        for module, targets in graph.items()
        if module.split(".")[0] in ("pallas_kernels", "sharding")
    }
    assert {m: t for m, t in offenders.items() if t} == {}


def test_kernels_do_not_import_sharding():
    graph = _graph()
    offenders = {m: sorted(t) for m, t in graph.items()
                 if m.startswith("pallas_kernels") and any(x.startswith("sharding") for x in t)}
    assert offenders == {}


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_across_packages():
    """``from pkg._private import x`` or ``from pkg.mod import _x`` only inside ``pkg``'s own
    top-level subpackage (``cpmjax.generate`` may use its own private names, not those of
    ``cpmjax.models``)."""

    def owner(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if parts[0] == "cpmjax" and len(parts) > 1 else parts[0]

    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module.split(".")[0] not in PACKAGES:
                continue
            target = _resolve(node.module) or node.module
            names = [a.name for a in node.names]
            private_module = any(p.startswith("_") for p in node.module.split("."))
            private_names = [n for n in names if n.startswith("_")]
            if (private_module or private_names) and owner(target) != owner(module):
                bad.append(f"{module}: from {node.module} import {', '.join(names)}")
    assert bad == []


LOW = {"cpmjax.errors", "cpmjax.report", "cpmjax.timing", "cpmjax.tokenizer",
       "cpmjax.safetensors_io", "cpmjax.ops", "cpmjax.attention_backends", "cpmjax.models",
       "cpmjax.hf", "cpmjax.distributed", "cpmjax.launch"}
FEATURES = {"cpmjax.delta", "cpmjax.train", "cpmjax.generate", "cpmjax.evals",
            "cpmjax.tools", "cpmjax.compress", "cpmjax.scaling", "cpmjax.fusion"}


def _level(module: str) -> int:
    """0 kernels, 1 sharding, 2 models and the seams, 3 features, 4 the public package and the
    command line (``cpmjax/__init__.py``, ``cpmjax/cli.py``, every ``*/cli.py``)."""
    parts = module.split(".")
    if parts[0] == "pallas_kernels":
        return 0
    if parts[0] == "sharding":
        return 1
    if module == "cpmjax" or parts[-1] == "cli":
        return 4
    owner = ".".join(parts[:2])
    if owner in LOW:
        return 2
    if owner in FEATURES:
        return 3
    raise AssertionError(f"{module} is in no layer: add it to LOW or FEATURES (and to "
                         "docs/architecture.md)")


def test_imports_only_run_downwards():
    graph = _graph()
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                    if _level(t) > _level(m))
    assert upward == []


def test_features_import_each_other_one_way():
    """Between the feature packages (layer 3) only these directions exist."""
    allowed = {("cpmjax.generate", "cpmjax.train"), ("cpmjax.train", "cpmjax.delta"),
               ("cpmjax.evals", "cpmjax.generate"), ("cpmjax.evals", "cpmjax.train"),
               ("cpmjax.tools", "cpmjax.generate"), ("cpmjax.compress", "cpmjax.delta"),
               ("cpmjax.train", "cpmjax.compress"),
               ("cpmjax.tools", "cpmjax.train"),
               ("cpmjax.scaling", "cpmjax.train"), ("cpmjax.scaling", "cpmjax.generate"),
               ("cpmjax.scaling", "cpmjax.evals"), ("cpmjax.scaling", "cpmjax.compress"),
               ("cpmjax.fusion", "cpmjax.train"), ("cpmjax.fusion", "cpmjax.generate"),
               ("cpmjax.fusion", "cpmjax.delta")}
    graph = _graph()
    seen = set()
    for module, targets in graph.items():
        if _level(module) != 3:
            continue
        for target in targets:
            pair = (".".join(module.split(".")[:2]), ".".join(target.split(".")[:2]))
            if _level(target) == 3 and pair[0] != pair[1]:
                seen.add(pair)
    assert seen - allowed == set()
