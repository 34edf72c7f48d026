"""The package's shape: no import cycles (lazy imports inside functions count too), and the lower
layers never import the ones above them."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "crossblock"
# a module of the left layer may not import any module of the right ones
LAYERS = {
    "crossblock.quant": ("crossblock.engine", "crossblock.stages", "crossblock.recipe", "crossblock.api",
                         "crossblock.cli", "crossblock.export", "crossblock.roundings", "crossblock.grids"),
    "crossblock.grids": ("crossblock.engine", "crossblock.stages", "crossblock.recipe", "crossblock.api",
                         "crossblock.cli", "crossblock.export"),
    "crossblock.roundings": ("crossblock.engine", "crossblock.stages", "crossblock.recipe", "crossblock.api",
                             "crossblock.cli", "crossblock.export"),
    "crossblock.engine": ("crossblock.stages", "crossblock.recipe", "crossblock.api", "crossblock.cli"),
    "crossblock.preprocess": ("crossblock.engine", "crossblock.stages", "crossblock.recipe", "crossblock.api",
                              "crossblock.cli"),
    "crossblock.export": ("crossblock.engine", "crossblock.stages", "crossblock.recipe", "crossblock.api",
                          "crossblock.cli"),
    "crossblock.stages": ("crossblock.recipe", "crossblock.api", "crossblock.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
                # `from . import x` names a submodule when one exists, else something in the package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_lower_layers_do_not_import_higher_ones():
    bad = [f"{src} imports {dst}" for src, dsts in import_graph().items() for dst in dsts
           for layer, above in LAYERS.items()
           if (src == layer or src.startswith(layer + ".")) and any(dst == a or dst.startswith(a + ".") for a in above)]
    assert not bad, bad
