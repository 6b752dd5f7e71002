"""No import circles: every module of the project's packages (delib_jax, train, eval, benchmarks) is read with `ast`,
its imports collected (at module level and inside functions, relative ones resolved), and the graph between the
project's modules must have no cycle (one direction of flow: a package that needs a later step imports it, never
the reverse)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("delib_jax", "train", "eval", "benchmarks")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file of the project's packages (``pkg/__init__.py`` -> ``pkg``)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of the dotted ``name`` that is a project module (None: not ours)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def imports_of(module: str, source: str, modules: dict[str, Path], is_package: bool) -> set[str]:
    """The project modules that ``module`` imports anywhere in ``source`` (module level, functions, classes)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            # ``from pkg import sub`` imports the module pkg.sub when there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out |= {owner for t in targets if (owner := _owner(t, modules)) is not None and owner != module}
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules(root)
    return {
        m: imports_of(m, path.read_text(encoding="utf-8"), modules, path.name == "__init__.py")
        for m, path in modules.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module (Tarjan's algorithm,
    iterative), sorted."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(set(component))
    return sorted(_cycle_in(graph, c) for c in components)


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle in the component {component}")


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and "delib_jax.cli" in graph and "train.cub" in graph  # the packages were read
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_are_read_everywhere_and_relative_ones_resolved(tmp_path):
    """The reader sees imports inside functions and classes, resolves ``from . import x`` and ``from ..a import b``,
    and maps ``from pkg import name`` to pkg (a name) or pkg.name (a submodule)."""
    (tmp_path / "delib_jax" / "sub").mkdir(parents=True)
    for package in PACKAGES[1:]:
        (tmp_path / package).mkdir()
    files = {
        "delib_jax/__init__.py": "from delib_jax.sub import thing\n",
        "delib_jax/sub/__init__.py": "from . import a\n",
        "delib_jax/sub/a.py": "def f():\n    from ..b import g\n",
        "delib_jax/b.py": "class C:\n    def m(self):\n        import delib_jax.sub.a as a\n",
        "train/x.py": "from delib_jax import b, name\nimport numpy\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph == {
        "delib_jax": {"delib_jax.sub"},
        "delib_jax.sub": {"delib_jax.sub.a"},
        "delib_jax.sub.a": {"delib_jax.b"},
        "delib_jax.b": {"delib_jax.sub.a"},
        "train.x": {"delib_jax.b", "delib_jax"},
    }
    assert find_cycles(graph) == [["delib_jax.b", "delib_jax.sub.a", "delib_jax.b"]]


@pytest.mark.parametrize(
    "graph, cycles",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]]),
        ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b", "a"], ["c", "d", "c"]]),
    ],
)
def test_find_cycles(graph, cycles):
    assert find_cycles(graph) == cycles
