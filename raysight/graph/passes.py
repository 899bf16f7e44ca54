"""Transformations of graphs as data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

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


# -- splitting a session by its data dependencies (SPEC §7) ---------------------------------------------------------
@dataclass
class Part:
    """Top-level nodes of a session that run together, on one actor, in program order."""

    index: int
    label: Any  # where it runs (an opaque placement: the pool of its models)
    nodes: list[int] = field(default_factory=list)  # top-level node indices
    models: dict = field(default_factory=dict)  # the models its traces use, by id()
    needs: set[int] = field(default_factory=set)  # node indices it takes from earlier parts
    after: set[int] = field(default_factory=set)  # the parts those come from
    exports: set[int] = field(default_factory=set)  # node indices later parts take from it


def split_session(graph: Graph, place: Callable[[Any], Any]) -> list[Part]:
    """Cut a session into parts: top-level nodes that share no data (transitively) go to separate parts, which can
    run at once; connected nodes stay in one part, except where their traces' models are placed apart
    (``place(model)``: e.g. two models served by two pools), where they are cut into parts that run in order and
    pass values. A session that trains (``backward``, an optimizer) or stops itself outside a loop runs whole."""
    top = graph.body
    if not top or not _splittable(graph):
        return [_whole(graph, place)]
    owner: dict[int, int] = {}
    for t in top:
        for n in _subtree(t):
            owner[n.index] = t.index
    parent = {t.index: t.index for t in top}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for t in top:
        for n in _subtree(t):
            for d in n.deps:
                if owner[d.index] != t.index:
                    parent[root(t.index)] = root(owner[d.index])
    components: dict[int, list[Node]] = {}
    for t in top:
        components.setdefault(root(t.index), []).append(t)
    parts: list[Part] = []
    loose: list[Node] = []  # components that use no model: plain values, run with the first part
    for members in components.values():
        labels = [_label_of(t, place) for t in members]
        if all(label is _NONE for label in labels):
            loose.extend(members)
            continue
        _fill_labels(labels)
        current: Optional[Part] = None
        for t, label in zip(members, labels):
            if current is None or current.label != label:
                current = Part(len(parts), label)
                parts.append(current)
            current.nodes.append(t.index)
    if not parts:
        return [_whole(graph, place)]
    parts.sort(key=lambda p: p.nodes[0])
    parts[0].nodes = sorted(parts[0].nodes + [t.index for t in loose])
    for i, part in enumerate(parts):
        part.index = i
    part_of = {t: p.index for p in parts for t in p.nodes}
    holder: dict[int, int] = {}  # a value shared by parts -> the last part that had it (and may have changed it)
    for part in parts:
        taken: set[int] = set()
        for t in part.nodes:
            for n in _subtree(graph.nodes[t]):
                if n.op is Op.TRACE:
                    part.models[id(n.target.model)] = n.target.model
                for d in n.deps:
                    source = holder.get(d.index, part_of[owner[d.index]])
                    if source != part.index:
                        part.needs.add(d.index)
                        part.after.add(source)
                        parts[source].exports.add(d.index)
                        taken.add(d.index)
        for index in taken:  # a list appended to, a tensor edited in place: later parts take this part's version
            holder[index] = part.index
    return parts


_NONE = object()  # the label of a node that runs no model


def _whole(graph: Graph, place: Callable[[Any], Any]) -> Part:
    traces = [n for n in graph.walk() if n.op is Op.TRACE]
    part = Part(0, place(traces[0].target.model) if traces else None, [t.index for t in graph.body])
    part.models = {id(n.target.model): n.target.model for n in traces}
    return part


def _splittable(graph: Graph) -> bool:
    for node in _walk_outside_loops(graph.body):
        if node.op is Op.STOP:  # session.stop() outside loops ends everything after it
            return False
    for node in graph.walk():
        if _changes_a_constant(node):  # each part gets its own copy of the client's objects: keep one
            return False
        if node.op is Op.CALL_METHOD and node.target in ("backward", "step", "zero_grad"):
            return False  # training: the parameters it changes are shared state, kept on one actor
        target = node.target
        if node.op is Op.CALL_FUNCTION and getattr(target, "__module__", "").startswith("torch.optim"):
            return False
        if node.op is Op.CALL_FUNCTION and any(target is m for m in _MODULE_STATE_METHODS):
            return False  # `model.train()`, `model.layer.requires_grad_(False)`: the served model's state
    return True


_MODULE_STATE_METHODS = (torch.nn.Module.train, torch.nn.Module.eval, torch.nn.Module.requires_grad_,
                         torch.nn.Module.zero_grad)  # fmt: skip
_IN_PLACE_OPERATORS = {"setitem", "delitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow",
                       "iand", "ior", "ixor", "ilshift", "irshift", "imatmul"}  # fmt: skip


def _changes_a_constant(node: Node) -> bool:
    """An in-place change (``add_``, ``append``, ``x[i] = v``) of an object the client put into the graph."""
    if node.op not in (Op.CALL_METHOD, Op.CALL_FUNCTION) or not node.args or isinstance(node.args[0], Node):
        return False
    first = node.args[0]
    if not isinstance(first, (list, dict, set)) and not hasattr(first, "data_ptr"):
        return False
    return changes_in_place(node)


def changes_in_place(node: Node) -> bool:
    """Whether a call changes its first argument in place (``add_``, ``x[i] = v``, ``+=``, ``append``)."""
    if node.op is not Op.CALL_METHOD and node.op is not Op.CALL_FUNCTION:
        return False
    name = _name(node.target)
    return (name.endswith("_") and not name.startswith("__")) or name in _IN_PLACE_OPERATORS or name in (
        "append", "extend", "insert", "pop", "remove", "clear", "update", "add", "discard")  # fmt: skip


def changes_tensor_in_place(node: Node) -> bool:
    """Whether a call changes the tensor it is given first in place (``zero_``, ``x[i] = v``, ``+=``); ``add``,
    ``torch.add`` and ``x + 1`` make new tensors."""
    if node.op is not Op.CALL_METHOD and node.op is not Op.CALL_FUNCTION:
        return False
    name = _name(node.target)
    return (name.endswith("_") and not name.startswith("__")) or name in _IN_PLACE_OPERATORS


def views_its_input(node: Node) -> bool:
    """Whether a node's value may share memory with its first argument (indexing, ``view``, ``transpose``,
    ``detach``, ``.data``, ...): an in-place change of it changes that argument too. ``clone`` and arithmetic make
    new tensors."""
    if node.op is Op.GET_ATTR:
        return node.target in _VIEW_ATTRIBUTES
    if node.op is not Op.CALL_METHOD and node.op is not Op.CALL_FUNCTION:
        return False
    return _name(node.target) in _VIEWS


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "") or ""


_VIEWS = frozenset({
    "getitem", "__getitem__", "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "narrow", "select",
    "expand", "expand_as", "t", "unsqueeze", "squeeze", "flatten", "unflatten", "unbind", "split", "chunk",
    "tensor_split", "split_with_sizes", "detach", "contiguous", "as_strided", "diagonal", "movedim", "moveaxis",
    "swapaxes", "swapdims", "unfold", "view_as_real", "view_as_complex", "real", "imag", "to", "type", "type_as",
    "float", "half", "double", "bfloat16", "cpu", "cuda", "rename", "align_to",
})  # fmt: skip
_VIEW_ATTRIBUTES = frozenset({"data", "T", "mT", "H", "mH", "real", "imag"})


def _walk_outside_loops(body: list[Node]) -> Any:
    for node in body:
        yield node
        if node.body is not None and node.op is not Op.ITER and node.op is not Op.TRACE:
            yield from _walk_outside_loops(node.body)


def _subtree(node: Node) -> Any:
    yield node
    if node.body is not None:
        for child in node.body:
            yield from _subtree(child)


def _label_of(top: Node, place: Callable[[Any], Any]) -> Any:
    for n in _subtree(top):
        if n.op is Op.TRACE:
            return place(n.target.model)
    return _NONE


def _fill_labels(labels: list) -> None:
    """A node that runs no model goes with the model-running node before it (or, at the start, after it)."""
    last = next(label for label in labels if label is not _NONE)
    for i, label in enumerate(labels):
        if label is _NONE:
            labels[i] = last
        else:
            last = label
