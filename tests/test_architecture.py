"""The package's import graph: no circles, and imports point down the layers.

Every import counts, lazy ones inside functions included (a lazy import hides a circle, it
does not remove it); imports under ``if TYPE_CHECKING:`` do not run and do not count. The
layers follow DESIGN.md's table, low to high."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "metafed"

# low -> high; a module belongs to the longest prefix that names it
LAYERS: list[tuple[str, ...]] = [
    ("metafed.tree", "metafed.types", "metafed.version", "metafed.errors", "metafed.losses", "metafed.run_folder",
     "metafed.section",
     "metafed.client.reply"),
    ("metafed.models",),
    ("metafed.data",),
    ("metafed.compression", "metafed.aggregate", "metafed.privacy", "metafed.incentive"),
    ("metafed.algorithms", "metafed.distill"),
    ("metafed.backends", "metafed.client", "metafed.client_store", "metafed.checkpoint", "metafed.attacks", "metafed.asynchrony"),
    ("metafed.eval", "metafed.pools", "metafed.protocols", "metafed.pipeline"),
    ("metafed.simulate",),
    ("metafed.config",),
    ("metafed.federation",),
    ("metafed.deploy",),  # the pool, the node and the ClientApp: below run
    ("metafed.tracking", "metafed.loggers", "metafed.plots"),
    ("metafed.run",),
    # the ServerApp, the Flower app bundle and deploy-local drive runs: above run
    ("metafed.deploy.server_app", "metafed.deploy.apps", "metafed.deploy.local"),
    ("metafed.compare", "metafed.sweep", "metafed.cli_options"),
    ("metafed.cli", "metafed", "metafed.__main__"),
]

# package facades that re-export their top module: they sit with it, not with the package
FACADES = {"metafed.deploy": "metafed.deploy.apps"}

# upward imports still standing, each with what removes it (issue 21: the round drivers)
KNOWN_UPWARD = {
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the metafed modules it imports (``from pkg import submodule`` names the submodule)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.split(".")[0] == "metafed"]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base.split(".")[0] != "metafed":
                    continue
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else resolve(base) for a in node.names]
            edges[module] |= {t for t in targets if t and t != module}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
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
                    found.append(sorted(component))
    return found


def layer_of(module: str) -> int:
    module = FACADES.get(module, module)
    best, length = None, -1
    for level, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > length:
                best, length = level, len(name)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_imports_point_down_the_layers():
    edges = import_graph()
    upward = {(m, t) for m, targets in edges.items() for t in targets if layer_of(t) > layer_of(m)}
    assert upward <= set(KNOWN_UPWARD), f"imports pointing up the layers: {sorted(upward - set(KNOWN_UPWARD))}"
    assert len(KNOWN_UPWARD) <= 2
