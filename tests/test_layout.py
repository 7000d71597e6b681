"""The package's layers: imports follow the architecture and form no cycle (read from the source,
function-level imports included, so a lazy import cannot hide a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distill"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> the distill modules it imports`` (``from distill.x import y`` counts
    ``distill.x.y`` when that is a module, else ``distill.x``)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def owner(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("distill"):
                deps.add(owner(node.module))
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
            elif isinstance(node, ast.Import):
                deps.update(owner(a.name) for a in node.names if a.name.startswith("distill"))
        graph[name] = deps - {name}
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path ``start -> ... -> start`` in ``graph``, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for dep in graph.get(node, ()):
            if dep == start:
                return [*path, start]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, [*path, dep]))
    return None


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle_through(graph, "a") == ["a", "b", "c", "a"]
    assert cycle_through(graph, "d") is None


def test_no_import_cycles():
    graph = import_graph()
    assert "distill.run" in graph and "distill.explain.maps" in graph["distill.explain.network"]
    cycles = {name: cycle for name in graph if (cycle := cycle_through(graph, name))}
    assert not cycles, next(iter(cycles.values()))


def test_layers_import_downwards_only():
    graph = import_graph()

    def imports(prefix: str) -> set[str]:
        return {dep for name, deps in graph.items() if name == prefix or name.startswith(prefix + ".") for dep in deps}

    assert not {d for d in imports("distill.data") if d.startswith(("distill.explain", "distill.evaluation"))}
    assert not {d for d in imports("distill.explain") if d.startswith(("distill.data", "distill.evaluation",
                                                                        "distill.module", "distill.callbacks"))}
    assert not {d for d in imports("distill.evaluation") if d in ("distill.run", "distill.callbacks",
                                                                   "distill.callbacks_localization")}
    # a training metric (the VOC mAP) is not evaluation code
    assert not {d for d in imports("distill.tasks") if d.startswith("distill.evaluation")}


def private_lightning_reads(source: str) -> list[str]:
    """``trainer.fit_loop._x`` / ``epoch_loop._x`` / ``_combined_loader`` style reads of Lightning's private
    loop attributes in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if any(part in owner for part in ("fit_loop", "epoch_loop", "_combined_loader", "_data_fetcher")):
                found.append(ast.unparse(node))
    return found


def test_private_lightning_reads_live_only_in_the_adapter():
    assert private_lightning_reads("trainer.fit_loop.epoch_loop._should_accumulate()")  # the finder finds one
    adapter = {"inside_accumulation", "load_pending_loader_states"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not (path.name == "mid_epoch.py" and node.name in adapter):
                offenders += [f"{path.name}:{node.name}: {r}" for r in private_lightning_reads(ast.unparse(node))]
    # (reads inside the adapter's functions are fine; nested functions are walked twice, which only repeats names)
    assert not offenders, offenders
