"""The shape of the puzzle package, read statically from its source (nothing is imported).

1. The import graph between puzzle's modules has no cycle. Every `import` / `from ... import` statement counts,
   wherever it is: at module level, inside a function (a lazy import), under `if TYPE_CHECKING:`, and
   `importlib.import_module("<literal>")`. Lazy imports count because a cycle through one is still two modules that
   each need the other: deferring the import only hides the knot from the interpreter. Two edges are left out on
   purpose: the implicit import of a package's `__init__` when one of its submodules is imported (a package that
   re-exports its submodules would otherwise be a cycle with each of them), and imports by a computed name (cli.py's
   subcommand modules), which no static reading can follow.
2. No module imports a private name (`_x`) from another puzzle module, neither by `from m import _x` nor as
   `m._x` on an imported module: a name another module needs is part of its owner's interface and is public.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "puzzle"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def resolve_base(module: str, node: ast.ImportFrom) -> str:
    """The absolute module named by `from <base> import ...` in `module` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def owner(name: str) -> str | None:
    """The puzzle module that `import name` runs last: name itself, else its nearest enclosing module."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str) -> Iterator[tuple[str, int, str | None]]:
    """(imported puzzle module, line, name taken from it or None) for every import statement in `module`."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := owner(alias.name)) is not None:
                    yield target, node.lineno, None
        elif isinstance(node, ast.ImportFrom):
            base = resolve_base(module, node)
            if owner(base) is None:
                continue
            for alias in node.names:
                # `from puzzle.pkg import sub` imports the submodule when there is one, else a name of the package.
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:
                    yield submodule, node.lineno, None
                else:
                    yield owner(base), node.lineno, alias.name
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (target := owner(node.args[0].value)) is not None
        ):
            yield target, node.lineno, None


def module_aliases(module: str) -> dict[str, str]:
    """Local names bound to puzzle modules in `module` (`from puzzle import convert`, `import puzzle.x as x`)."""
    tree = ast.parse(MODULES[module].read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    out[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = resolve_base(module, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    out[alias.asname or alias.name] = f"{base}.{alias.name}"
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line importing it}, self-imports left out."""
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for module in MODULES:
        for target, line, _ in imports(module):
            if target != module:
                graph[module].setdefault(target, line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected component with more than one module (Tarjan, then a DFS)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # Breadth-first from start's successors back to start, inside the component: a shortest cycle.
        parents: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parents:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in members and w not in parents:
                        parents[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while (prev := parents[path[-1]]) != start:
            path.append(prev)
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    hops = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join([*hops, cycle[-1]])


def test_the_graph_sees_lazy_and_relative_imports():
    """The reader resolves what the real package uses, so an empty cycle list means something."""
    graph = import_graph()
    assert "puzzle.errors" in graph["puzzle.config.schema"]  # module level
    assert "puzzle.runner.validate" in graph["puzzle.stages.parent"]  # inside a function
    assert "puzzle.model.modeling_puzzle" in graph["puzzle.stages.gkd.assemble"]  # under TYPE_CHECKING
    assert (
        "puzzle.model.block_config" in graph["puzzle.model.configuration_puzzle"]
    )  # relative (`from .block_config import`)
    assert graph["puzzle.stages.profile"], "puzzle/stages/profile/__init__.py re-exports its submodules"


def test_find_cycles_names_the_cycle():
    graph = {"a": {"b": 3}, "b": {"c": 5}, "c": {"a": 7, "d": 1}, "d": {}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert describe(["a", "b", "c", "a"], graph) == "a (line 3) -> b (line 5) -> c (line 7) -> a"
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in puzzle/ (lazy imports count):\n" + "\n".join(
        describe(c, graph) for c in cycles
    )


def test_no_private_names_imported_across_modules():
    found = []
    for module, path in MODULES.items():
        rel = path.relative_to(ROOT.parent)
        for target, line, name in imports(module):
            if name is not None and is_private(name) and target != module:
                found.append(f"{rel}:{line}: imports {name} from {target}")
            elif name is None and target != module and is_private(target.rpartition(".")[2]):
                found.append(f"{rel}:{line}: imports private module {target}")
        aliases = module_aliases(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and aliases[node.value.id] != module
                and is_private(node.attr)
            ):
                found.append(f"{rel}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    assert not found, "private names used across puzzle modules (make them public or keep them at home):\n" + "\n".join(
        sorted(set(found))
    )


MAX_LINES = 600


def test_no_module_is_over_600_lines():
    """A module that grows past this does several jobs; split it by job, as gkd/ and config/ were."""
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


STAGES = ("parent", "data", "bld", "score", "profile", "search", "gkd", "evaluate", "export", "serve", "compare")


def test_every_stage_has_a_module_of_its_name():
    """A reader finds each stage's code under puzzle/stages/ by the stage's name, with its adapter `run`, and the
    pipeline runs exactly that adapter."""
    from puzzle.runner.pipeline import build_stages

    assert tuple(s.name for s in build_stages()) == STAGES
    adapters = {s.name: s.run.__qualname__ for s in build_stages()}
    for stage in STAGES:
        module = f"{PACKAGE}.stages.{stage}"
        adapter = module if module in MODULES and MODULES[module].name != "__init__.py" else f"{module}.stage"
        assert adapter in MODULES, f"stage {stage}: no puzzle/stages/{stage}.py or puzzle/stages/{stage}/stage.py"
        tree = ast.parse(MODULES[adapter].read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body), f"{adapter} has no run()"
        assert adapters[stage] == f"{adapter}.run"
