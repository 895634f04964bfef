"""Imports run one way (docs/architecture.md): the core imports neither the channels
(``intake``) nor the kinds and worker (``workers``); those two never import each other;
only the composition roots — the processes — import everything. No module imports
itself back through others. Function-level imports count like any other."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("daemon", "intake", "workers")
# The processes: each wires channels, kinds and the core together.
ROOTS = {"daemon.cli", "daemon.compose", "daemon.service", "daemon.doctor",
         "daemon.supervisor"}
# Which layer may import which (a layer may always import itself).
ALLOWED = {"root": {"root", "core", "intake", "workers"}, "intake": {"core"},
           "workers": {"core"}, "core": set()}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the project modules it imports, anywhere in its body."""
    modules = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def layer(module: str) -> str:
    if module in ROOTS:
        return "root"
    package = module.partition(".")[0]
    return "core" if package == "daemon" else package


def backward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} -> {target}" for source, targets in graph.items()
                  for target in targets
                  if layer(target) != layer(source)
                  and layer(target) not in ALLOWED[layer(source)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
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
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_imports_run_one_way():
    graph = import_graph(REPO)
    assert backward_edges(graph) == []
    assert cycles(graph) == []


def test_a_backward_import_is_caught(tmp_path):
    """The check above can fail: the core importing a kind, and a channel importing the
    worker, are both reported, and so is the circle the first one closes."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package)
    jobs = tmp_path / "daemon" / "jobs.py"
    jobs.write_text(jobs.read_text() + "\n\ndef late():\n    from workers import gpu\n")
    folder = tmp_path / "intake" / "folder.py"
    folder.write_text(folder.read_text() + "\nimport workers.runner\n")
    graph = import_graph(tmp_path)
    added = set(backward_edges(graph)) - set(backward_edges(import_graph(REPO)))
    assert {"daemon.jobs -> workers.gpu", "intake.folder -> workers.runner"} <= added
    assert {edge.partition(" -> ")[0] for edge in added} == {"daemon.jobs", "intake.folder"}
    assert any({"daemon.jobs", "workers.gpu"} <= set(group) for group in cycles(graph))
