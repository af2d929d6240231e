"""The shape of the package (issue 14, "a house without circles"), read with ``ast`` from the sources:

(a) no import cycle between the modules of ``normsurgeon/``, function-level imports included (imports
    under ``if TYPE_CHECKING:`` are not counted; a package's ``__init__`` is a node of its own);
(b) the lower layers ``normsurgeon/io/`` and ``normsurgeon/graph/`` import no recipe package;
(c) no file in ``normsurgeon/`` is over 400 lines;
(d) the output forms of pyproject.toml are installed (the loader finds a recipe's form only through its
    entry point, ``normsurgeon/io/forms.py``).

``PENDING_EDGES`` / ``PENDING_SIZES`` list what is known to break (a) / (c) and is being fixed in the lead's
own files (``stream/``, ``conversion.py``, ``transforms/``, ``verification/``); nothing else may be listed.
An entry that no longer breaks the rule fails the test too: delete it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "normsurgeon"
MAX_LINES = 400
RECIPES = ("batchnorm", "lnfree", "placement", "prepbn", "diagnose", "train", "stream", "conversion", "recipes",
           "cli", "verification")
LOWER_LAYERS = ("io", "graph")
LEAD = ("normsurgeon.stream", "normsurgeon.conversion", "normsurgeon.transforms", "normsurgeon.verification")  # prefixes

# Known imports that close a cycle, in the lead's files: (importer, imported) -> what to do. The cycles are
# looked for without these edges; each must still exist (delete it once fixed).
PENDING_EDGES: dict[tuple[str, str], str] = {
}
# Known files over MAX_LINES in the lead's files (paths relative to the repository).
PENDING_SIZES: dict[str, str] = {}


# ---------------------------------------------------------------------------------------- the import graph
def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``package`` (``__init__`` named by its package)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list:
    """Every Import / ImportFrom node, at any depth, in line order, except inside ``if TYPE_CHECKING:``
    bodies (their ``else:`` counts)."""
    found, stack = [], list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))
    return sorted(found, key=lambda n: (n.lineno, n.col_offset))


def _known(name: str, modules: dict) -> str | None:
    """``name`` if it is a module, else its nearest enclosing module (None outside the package)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: line of the first such import}."""
    modules = modules_of(root, package)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [_known(a.name, modules) for a in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for a in node.names:  # ``from x import y``: the module x.y where there is one, else x
                    full = f"{mod}.{a.name}"
                    targets.append(full if full in modules else _known(mod, modules))
            for t in targets:
                if t is not None and t != name:
                    edges.setdefault(t, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def cycle_path(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    """One cycle through the component's first module, as ``a (line) -> b (line) -> a``."""
    members, start = set(component), component[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first, inside the component, back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members or w in prev:
                    continue
                prev[w] = v
                if w == start:
                    nxt = []
                    break
                nxt.append(w)
            if start in prev:
                break
        frontier = nxt
    path, v = [start], start
    while True:
        v = prev[v]
        path.append(v)
        if v == start:
            break
    path.reverse()
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(path, path[1:])) + f" -> {start}"


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT, PACKAGE)


# ---------------------------------------------------------------------------------------- the rules
def test_no_import_cycle(graph):
    gone = [edge for edge in PENDING_EDGES if edge[1] not in graph.get(edge[0], {})]
    assert not gone, f"no longer imported, delete from PENDING_EDGES: {gone}"
    pruned = {m: {t: line for t, line in edges.items() if (m, t) not in PENDING_EDGES} for m, edges in graph.items()}
    found = [cycle_path(pruned, c) for c in cycles(pruned)]
    assert not found, "import cycles (break each, e.g. move what both sides need into a module both import):\n  " \
        + "\n  ".join(found)


def test_pending_edges_are_the_leads_files_only():
    others = [edge for edge in PENDING_EDGES if not edge[0].startswith(LEAD)]
    assert not others, f"PENDING_EDGES may only list imports made by the lead's files: {others}"


def test_lower_layers_import_no_recipe(graph):
    bad = []
    for mod, edges in sorted(graph.items()):
        parts = mod.split(".")
        if len(parts) < 2 or parts[1] not in LOWER_LAYERS:
            continue
        for target, line in sorted(edges.items()):
            tparts = target.split(".")
            if len(tparts) >= 2 and any(tparts[1] == r or tparts[1].startswith(r + "_") for r in RECIPES):
                bad.append(f"{mod} (line {line}) imports {target}")
    assert not bad, "normsurgeon/io and normsurgeon/graph must not import recipe packages:\n  " + "\n  ".join(bad)


def test_no_file_over_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for p in sorted((ROOT / PACKAGE).rglob("*.py"))}
    big = [f"{p}: {n} lines" for p, n in sizes.items() if n > MAX_LINES and p not in PENDING_SIZES]
    assert not big, f"files over {MAX_LINES} lines (split them by job):\n  " + "\n  ".join(big)
    gone = [p for p in PENDING_SIZES if sizes.get(p, 0) <= MAX_LINES]
    assert not gone, f"no longer over {MAX_LINES} lines, delete from PENDING_SIZES: {gone}"
    others = [p for p in PENDING_SIZES if not p.replace("/", ".").removesuffix(".py").startswith(LEAD)]
    assert not others, f"PENDING_SIZES may only list the lead's files: {others}"


def test_output_forms_are_installed():
    """Each form declared in pyproject.toml is an installed entry point that loads (else: run
    ``bash scripts/setup.sh``, which reinstalls the package when pyproject.toml changes)."""
    tomllib = pytest.importorskip("tomllib")
    from normsurgeon.io.forms import GROUP, _entry_points

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]
    installed = _entry_points()
    assert {k: installed[k].value for k in declared if k in installed} == declared, \
        f"installed {GROUP} entry points differ from pyproject.toml: reinstall (bash scripts/setup.sh)"
    for name, ep in installed.items():
        if name in declared:
            assert callable(ep.load()), name


# ---------------------------------------------------------------------------------------- the checker itself
def test_checker_sees_function_level_cycles_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import b\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n"
                              "else:\n    import pkg.e\n")
    (pkg / "e.py").write_text("")
    (pkg / "d.py").write_text("import pkg.c\n")
    g = import_graph(tmp_path, "pkg")
    assert g["pkg.sub"] == {"pkg.sub.b": 1} and g["pkg.sub.b"] == {"pkg.a": 1} and g["pkg.c"] == {"pkg.e": 5}
    assert cycles(g) == [["pkg.a", "pkg.sub.b"]]
    assert cycle_path(g, ["pkg.a", "pkg.sub.b"]) == "pkg.a (line 2) -> pkg.sub.b (line 1) -> pkg.a"
