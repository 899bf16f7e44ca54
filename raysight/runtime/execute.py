"""Running requests: one trace against one forward pass, or a session (traces, loops and plain nodes).

``run_trace`` batches the invokes, installs the hooks the graph needs, runs the model and removes the hooks. In a
session the same happens for each TRACE node, with the session's values shared: a trace reads what earlier nodes
computed and leaves what later nodes need.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Optional

from raysight.graph.graph import Graph
from raysight.graph.node import INVOKE, READ, WRITE, Node
from raysight.graph.passes import EDIT_INVOKE, copy_edits
from raysight.runtime.batching import Rows
from raysight.runtime.hooks import HookSet
from raysight.runtime.interpreter import UNSET, EarlyStop, Interleaver, StopLoop, check_gradients_ran


def run_trace(
    model: Any,
    body: list[Node],
    nodes: list[Node],
    invokes: list[Any],
    forward_kwargs: dict,
    method: str,
    parent: Optional[Interleaver] = None,
    locations: Optional[set] = None,
    deadline: Optional[float] = None,
    log_to: Any = None,
) -> Interleaver:
    """Run the nodes of ``body`` (a trace) interleaved with one run of ``model``; return the interleaver."""
    model._ensure_dispatched()
    key, me = id(model.__dict__["_module"]), _get_ident()
    owner = _RUNNING.get(key)
    if owner != me:  # (owner == me: a trace inside this thread's own run, e.g. a session's trace or ad-hoc call)
        if _RUNNING.setdefault(key, me) != me:  # (setdefault: one atomic step) its hooks would see the other's pass
            raise RuntimeError(
                f"this {type(model).__name__} is running a trace in another thread; traces of one model in one "
                "process run one at a time (hooks are per module): run them in turn, or in parallel on Ray "
                "(remote=True with raysight.serve(model, replicas=N))"
            )
    try:
        edits, module_at = model._edits, model._module_at  # (an envoy's attributes are slow to look up: once each)
        edit_start = len(nodes)
        if edits:  # persistent edits: copies with their own indices, run first, see the whole batch
            wrappers, copies, edit_locations = _edit_copies(model, edits, edit_start)
            if locations is None:
                locations = {n.target for n in _walk(body) if n.op is READ or n.op is WRITE}
            locations = locations | edit_locations
            body = wrappers + list(body)
            nodes = nodes + copies
        streams = _streams(body, invokes, lambda: model._batch_factors(method, forward_kwargs))
        interleaver = Interleaver(nodes, streams, module_at, parent=parent)
        if edits:
            interleaver.edit_start = edit_start
        if deadline is not None:
            interleaver.deadline = deadline
        if log_to is not None:
            interleaver.log_to = log_to
        args, kwargs = model._batch_inputs(invokes)
        if forward_kwargs:
            kwargs = {**kwargs, **forward_kwargs}
        if locations is None:
            locations = {n.target for n in _walk(body) if n.op is READ or n.op is WRITE}
        # the root runs once in a forward pass (or a call of the method named with trace(method=)): its events come
        # around that call, not from hooks (when the model's _execute takes the caller; a subclass written against
        # the older signature keeps the hooks). Generation calls the root once per step: hooks.
        direct_root = False
        if method != "generate":
            kind = type(model)
            direct_root = _TAKES_CALL.get(kind)
            if direct_root is None:
                direct_root = _takes_root_caller(kind)
        relays = model.__dict__.get("_relays")
        if relays is None:
            relays = model.__dict__["_relays"] = {}  # (see hooks._relay; an edited copy shares its model's)
        with HookSet(module_at, locations, interleaver, direct_root, relays) as hooks:
            if direct_root:
                interleaver.call_root = hooks.call_root
            try:
                interleaver.start()
                try:
                    if direct_root:
                        output = model._execute(method, args, kwargs, call=hooks.call_root)
                    else:
                        output = model._execute(method, args, kwargs)
                except EarlyStop:
                    return interleaver
                except Exception as exc:
                    if interleaver.reshaped is not None and getattr(exc, "_raysight_node", None) is None:
                        _note_reshape(exc, *interleaver.reshaped)  # the model failed after a write changed a shape
                    raise
                if method != "forward":  # (a forward pass always runs to its end)
                    interleaver.ended_early = model._ended_early(method, kwargs, output)
                interleaver.finish()
            finally:
                interleaver.call_root = None  # it points back at the interleaver: no cycle left for the collector
        return interleaver
    finally:
        if owner != me:
            del _RUNNING[key]


def _note_reshape(exc: BaseException, node: Node, old: Any, new: Any) -> None:
    where = f", at {node.source}: {node.source.text()}" if node.source else ""
    note = (f"raysight: the model failed after {node.target} was set to a value of shape {_shape_text(new)} where "
            f"the module gave {_shape_text(old)}{where}; the modules after it get that shape. Keep the shape, or "
            "trace with validate=True to check every write before the model runs")
    if hasattr(exc, "add_note"):
        exc.add_note(note)


def _shape_text(shapes: Any) -> str:
    if isinstance(shapes, tuple) and all(type(s) is int for s in shapes):
        return str(shapes)
    return str(shapes).replace("None", "-")


_RUNNING: dict[int, int] = {}  # id of a root module running a trace -> the thread running it
_get_ident = threading.get_ident


def _edit_copies(model: Any, edits: list[Graph], offset: int) -> tuple[list[Node], list[Node], frozenset]:
    """The copies of a model's persistent edits for a run whose own nodes end at ``offset``: their INVOKE wrappers,
    all their nodes, and the locations they use. The runtime never changes a node, so the copies of the last run
    serve the next one while the edits and the offset are the same (a loop of traces of one shape): copying is paid
    once, not per trace."""
    cached = model.__dict__.get("_edit_copies")
    if cached is not None and cached[1] == offset and len(cached[0]) == len(edits) and all(
        a is b for a, b in zip(cached[0], edits)
    ):
        return cached[2]
    scratch = Graph()
    scratch.nodes.extend([None] * offset)  # (placeholders: the copies take the indices after the run's nodes)
    wrappers = copy_edits(edits, scratch)
    copies = scratch.nodes[offset:]
    locations = frozenset(n.target for n in copies if n.op is READ or n.op is WRITE)
    result = (wrappers, copies, locations)
    model.__dict__["_edit_copies"] = (tuple(edits), offset, result)
    return result


def run_session(graph: Graph, deadline: Optional[float] = None, log_to: Any = None,
                body: Optional[list[Node]] = None, given: Optional[dict[int, Any]] = None) -> dict[int, Any]:
    """Run a session graph from top to bottom; return the saved values by node index. A part of a split session
    runs only ``body`` (some of the top-level nodes), with the values of earlier parts ``given`` by node index."""
    interleaver = Interleaver(graph.nodes, [(graph.body if body is None else body, None, "the session")], _no_module)
    if deadline is not None:
        interleaver.deadline = deadline
    interleaver.log_to = log_to
    if given:
        for index, value in given.items():
            interleaver.env[index] = value
    try:
        interleaver.start()
    except StopLoop:
        return interleaver.results()  # session.stop() outside any loop: the session ends here
    check_gradients_ran(interleaver.armed)  # (a trace's `.grad` whose backward() came later in the session)
    stream = interleaver.streams[0]
    if not stream.done and stream.waiting is not None:
        node = stream.waiting
        missing = [d.name for d in node.deps if interleaver.env[d.index] is UNSET]
        raise RuntimeError(
            f"the session cannot go on: {node.format()} (created at {node.source}) waits for "
            f"{', '.join(missing) or 'a value'}, which is computed inside it or never; compute trace inputs before "
            "the trace opens"
        )
    return interleaver.results()


def _streams(body: list, invokes: list, batch_factors: Any = tuple) -> list[tuple[list, Optional[Rows], str]]:
    """The streams of a trace: one per invoke (with its rows; ``batch_factors()`` gives the expansions of the run,
    see Rows), one per persistent edit, and one for the code outside invokes."""
    if len(body) == 1 and len(invokes) == 1 and body[0].op is INVOKE:  # the common `model.trace(x)`
        return [(body[0].body, None, "invoke 0")]
    sizes = [inv.batch_size for inv in invokes]
    total = sum(sizes)
    streams: list[tuple[list, Optional[Rows], str]] = []
    factors = batch_factors() if len(invokes) > 1 else ()
    for node in body:
        if node.op is INVOKE and node.target == EDIT_INVOKE:
            streams.append((node.body, None, "an edit of the model"))
        elif node.op is INVOKE:
            i = node.target
            whole = sizes[i] == total or sizes[i] == 0  # an invoke without input sees the whole batch
            rows = None if whole else Rows(sum(sizes[:i]), sizes[i], total, factors)
            streams.append((node.body, rows, f"invoke {i}"))
    if len(streams) < len(body):  # there is code outside the invokes
        streams.append((body, None, "the code outside invokes"))
    return streams


_TAKES_CALL: dict[type, bool] = {}


def _takes_root_caller(kind: type) -> bool:
    takes = _TAKES_CALL.get(kind)
    if takes is None:
        takes = _TAKES_CALL[kind] = "call" in inspect.signature(kind._execute).parameters
    return takes


def _walk(body: list[Node]) -> Any:
    for node in body:
        yield node
        if node.body is not None:
            yield from _walk(node.body)


def _no_module(path: str) -> Any:
    raise RuntimeError(f"module {path!r} was accessed outside any trace of the session")
