"""The layout's one rule: `pipeline` (the library) never imports `workers` (the
process entry points), and no modules import each other in a circle."""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("imgpipe", "pipeline", "workers")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # Function-local imports count: they hide a circle, they do not break it.
    return grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)


def test_the_library_never_imports_the_entry_points(graph: grimp.ImportGraph) -> None:
    chains = graph.find_shortest_chains(importer="pipeline", imported="workers")
    assert not chains, f"pipeline imports workers: {sorted(chains)}"


def test_no_modules_import_each_other_in_a_circle(graph: grimp.ImportGraph) -> None:
    circles = [sorted(group) for group in strongly_connected(graph) if len(group) > 1]
    assert not circles, f"import circles: {circles}"


def test_a_circle_is_found_when_there_is_one() -> None:
    # The check itself, on a graph with a known circle a -> b -> c -> a.
    graph = grimp.ImportGraph()
    for importer, imported in (("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")):
        graph.add_import(importer=importer, imported=imported)
    assert [sorted(group) for group in strongly_connected(graph) if len(group) > 1] == [
        ["a", "b", "c"]]


def strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """Tarjan's strongly connected components of the module import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == module:
                    break
            groups.append(group)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups
