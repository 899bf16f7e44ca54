"""Transformations of graphs as data."""

from __future__ import annotations

from raysight.graph.graph import Graph
from raysight.graph.node import Node, Op, map_nodes

EDIT_INVOKE = -1  # the target of an INVOKE node that wraps a persistent edit: it sees the whole batch


def with_edits(graph: Graph, edits: list[Graph]) -> Graph:
    """``graph`` preceded by a copy of each edit graph, each wrapped in an INVOKE(-1) node that runs first and sees
    the whole batch. ``graph``'s own nodes keep their indices (saved values are found by index)."""
    if not edits:
        return graph
    merged = Graph()
    merged.nodes.extend(graph.nodes)
    wrappers = copy_edits(edits, merged)
    merged.body[:] = wrappers + graph.body
    return merged


def copy_edits(edits: list[Graph], into: Graph) -> list[Node]:
    """Copy each edit graph into ``into`` (new indices after its nodes) inside an INVOKE(-1) wrapper each; return
    the wrappers (they are also appended to ``into.body``)."""
    wrappers = []
    for edit in edits:
        wrapper = into.add(Op.INVOKE, EDIT_INVOKE, source=None)
        into.enter(wrapper)
        _copy_body(_flatten_invokes(edit.body), into, {})
        into.exit()
        wrappers.append(wrapper)
    return wrappers


def _flatten_invokes(body: list[Node]) -> list[Node]:
    flat: list[Node] = []
    for node in body:
        if node.op is Op.INVOKE:
            flat.extend(node.body or [])
        else:
            flat.append(node)
    return flat


def _copy_body(body: list[Node], into: Graph, mapping: dict[int, Node]) -> None:
    for node in body:
        args = map_nodes(node.args, lambda n: mapping[n.index])
        kwargs = map_nodes(node.kwargs, lambda n: mapping[n.index])
        copy = into.add(node.op, node.target, args, kwargs, node.source)
        mapping[node.index] = copy
        if node.body is not None:
            into.enter(copy)
            _copy_body(node.body, into, mapping)
            into.exit()
