"""Loops: a session's traces and ``session.iter`` loops, and the regions of ``.all()`` / ``.iter[...]`` that run
once per call of a module. A mixin of :class:`~raysight.runtime.interpreter.Interleaver`.
"""

from __future__ import annotations

from typing import Iterator

from raysight.graph.node import READ, WRITE, Calls, Node
from raysight.runtime.state import FREED, SKIPPED, UNSET, RegionEnd, StopLoop, Stream, annotate, walk


class Loops:
    """Loop methods of the Interleaver (it supplies env, streams, _set, _load, _run_body)."""

    # -- sessions: traces and loops ---------------------------------------------------------------------------
    def _run_trace(self, node: Node) -> None:
        from raysight.runtime.execute import run_trace

        spec = node.target
        invokes = [spec.model._prepare_deferred(inv, self._load) for inv in spec.invokes]
        forward_kwargs = self._load(spec.forward_kwargs)
        try:
            run_trace(spec.model, node.body, self.nodes, invokes, forward_kwargs, spec.method, parent=self)
        except Exception as exc:  # the model itself failed (an intervention's error names its own node already)
            raise annotate(exc, node)

    def _run_loop(self, node: Node, stream: Stream) -> Iterator[None]:
        collection = self._load(node.args[0])
        if not hasattr(collection, "__len__") or not hasattr(collection, "__iter__"):
            raise annotate(
                TypeError(
                    f"session.iter() needs a collection with a length (list, tuple, tensor, DataLoader, "
                    f"raysight.list()), got {type(collection).__name__}; wrap a generator in list(...)"
                ),
                node,
            )
        if type(collection) is list:  # the items it has now (as nnsight 0.4): a body that appends to it ends
            collection = list(collection)
        inner = [n for n in walk(node.body)]
        inside = {n.index for n in inner}
        env, remaining = self.env, self.remaining
        # Outer values the body uses (and the loop's element) must survive every iteration: pin them, counting
        # the body's uses, and release those uses once the loop is over.
        uses: dict[int, int] = {node.index: 0}
        for n in inner:
            for dep in n.deps:
                if dep.index not in inside:
                    uses[dep.index] = uses.get(dep.index, 0) + 1
        before = {i: remaining[i] for i in uses}
        pinned = 1 << 40
        for i in uses:
            remaining[i] = pinned
        try:
            for item in collection:
                for n in inner:  # a fresh iteration: what the body computed last time is gone
                    env[n.index] = UNSET
                    remaining[n.index] = n.num_users
                env[node.index] = item
                self.executed += 1
                try:
                    yield from self._run_body(node.body, stream)
                except StopLoop:
                    break
        finally:
            for i, count in uses.items():
                remaining[i] = before[i] - count
                if remaining[i] <= 0 and not self.nodes[i].saved and env[i] is not SKIPPED:
                    env[i] = FREED
            self._release(node)  # the collection

    # -- several calls of a module (.all(), .iter[...]) -------------------------------------------------------
    def _arm_region(self, first: Node, body: list[Node], stream: Stream) -> None:
        """Move the multi-call reads of ``first``'s scope, and every later node of ``body`` that depends on them,
        into a stream that runs once per selected call; the rest of ``body`` stays here and runs once."""
        calls: Calls = first.target.call
        members: set[int] = set()
        closure: list[Node] = []
        for node in body[body.index(first) :]:
            if node.index in stream.moved:
                continue
            loc = node.target if node.op is READ or node.op is WRITE else None
            in_scope = loc is not None and type(loc.call) is Calls and loc.call.scope == calls.scope
            if in_scope or any(d.index in members for d in node.deps):
                members.add(node.index)
                closure.append(node)
        stream.moved |= members
        pinned = 1 << 40  # values a region uses must survive every iteration
        for node in closure:
            self.remaining[node.index] = pinned
            for dep in node.deps:
                self.remaining[dep.index] = pinned
        region = Stream(f"{stream.label} ({calls})", stream.rows, open_ended=calls.items is None
                        and calls.stop is None, body=closure)  # fmt: skip
        region.captures = []
        region.gen = self._run_region(closure, calls, region)
        self.streams.append(region)

    def _run_region(self, closure: list[Node], calls: Calls, stream: Stream) -> Iterator[None]:
        env = self.env
        for step in calls.indices():
            stream.moved = frozenset()  # gradient streams armed in the last iteration took their nodes with them
            for node in closure:  # a fresh iteration: nothing of the last one counts as done
                env[node.index] = UNSET
            try:
                yield from self._run_body(closure, stream, step)
            except RegionEnd:
                _seal(stream.captures, env)
                for node in closure:
                    if env[node.index] is UNSET:
                        env[node.index] = SKIPPED
                return
            _seal(stream.captures, env)


def _seal(captures: list, env: list) -> None:
    """A region's step is over: gradient streams armed in it take the step's values they had not seen yet (the
    next step rebinds them; the backward pass reaches this call later)."""
    for pair in captures:
        if pair[1] is UNSET:
            pair[1] = env[pair[0]]
    captures.clear()
