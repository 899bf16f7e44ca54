"""The interleaver: runs a graph in program order while the model's forward pass runs.

Each invoke's body (and the code outside invokes) is a *stream*: a generator that executes its nodes in order
and suspends on a node it cannot run yet — a read of a module that has not fired, or a value another stream has
not produced. Hooks deliver *events* (a module's input or output); on each event every stream runs as far as it
can. A stream that reaches a read whose module already fired in this pass raises :class:`OutOfOrderError`.

Values live in ``env`` (one slot per node) and are freed when the last node that uses them has run (reference
counts), unless saved. What each op computes (``ops.py``), gradients (``gradients.py``), session traces and loops and
the multi-call regions of ``.all()`` (``loops.py``) are mixins; the streams, events and sentinels they share are in
``state.py``.
"""

from __future__ import annotations

import logging
import math
import time
from operator import attrgetter
from types import MappingProxyType
from typing import Any, Callable, Iterator, Optional

import torch

from raysight.errors import InterventionError, MissedProviderError, OutOfOrderError, TimeLimitError
from raysight.graph.node import (
    CALL_FUNCTION, CALL_METHOD, CALL_MODULE, COND, GET_ATTR, GRAD, INVOKE, ITER, LOG, PARAM, READ, SET_GRAD, STOP,
    TRACE, WRITE, _NO_KWARGS, Calls, Location, map_nodes, Node
)
from raysight.graph.passes import changes_tensor_in_place, views_its_input
from raysight.runtime.batching import Rows, narrow
from raysight.runtime.gradients import Gradients
from raysight.runtime.loops import Loops
from raysight.runtime.ops import Ops, _first_input
from raysight.runtime.state import (  # noqa: F401 - re-exported: the runtime's public names live here
    FREED,
    INTERRUPT,
    SKIPPED,
    UNSET,
    EarlyStop,
    Event,
    RegionEnd,
    StopLoop,
    Stream,
    annotate,
    same_view,
)

logger = logging.getLogger(__name__)
_NUM_USERS = attrgetter("num_users")


class Interleaver(Gradients, Loops, Ops):
    """Executes one graph against one forward pass; hooks call :meth:`on_event`."""

    # Defaults live on the class (an interleaver is made per trace): only what differs is set per instance.
    call_root: Optional[Callable] = None  # calls the root module with its events when no hook delivers them
    deadline: Optional[float] = None  # time.monotonic() past which the run stops (Limits.max_seconds)
    log_to: Any = None  # where tracer.log lines go (a server collects them for the client); None: stdout
    event: Optional[Event] = None  # the event being delivered now
    finished = False  # the forward pass is over
    executed = 0  # nodes run or skipped so far
    _backwards: Optional[list[int]] = None
    interrupt: Optional[Callable[[], None]] = None  # raises to stop the run (a cancelled actor request), see INTERRUPT
    # gradient streams waiting for their backward pass, and tensor -> gradient set while its hook runs (made by
    # the first `.grad` of a run; these empty ones are read-only)
    armed: Any = ()
    grad_overrides: Any = MappingProxyType({})

    reshaped: Optional[tuple] = None  # (node, old shape, new shape) of the last write that changed a shape
    # why the model made fewer calls than it was asked to (a generation whose every sequence ended before
    # max_new_tokens): reads of the calls that never came are then skipped, not errors
    ended_early: Optional[str] = None
    _parent: Optional["Interleaver"] = None  # the session's interleaver, for a trace of a session

    def __init__(
        self,
        nodes: list[Node],
        streams: list[tuple[list[Node], Optional[Rows], str]],
        module_at: Callable[[str], torch.nn.Module],
        parent: Optional["Interleaver"] = None,
    ) -> None:
        self.nodes = nodes
        if parent is None:
            self.env: list[Any] = [UNSET] * len(nodes)
            self.remaining = list(map(_NUM_USERS, nodes))
            self.saved_values: dict[int, Any] = {}
        else:  # a trace inside a session: one set of values for the whole session
            self._parent = parent
            self.env, self.remaining, self.saved_values = parent.env, parent.remaining, parent.saved_values
            missing = len(nodes) - len(self.env)
            if missing > 0:  # copies of persistent edits
                self.env.extend([UNSET] * missing)
                self.remaining.extend(n.num_users for n in nodes[-missing:])
            if parent.deadline is not None:
                self.deadline = parent.deadline
            if parent.log_to is not None:
                self.log_to = parent.log_to
        interrupt = INTERRUPT.get()
        if interrupt is not None:  # polled where the deadline is checked: give the run one if it has none
            self.interrupt = interrupt
            if self.deadline is None:
                self.deadline = math.inf
        self.module_at = module_at
        self.counts: dict[tuple, int] = {}
        self.edit_start = len(nodes)  # nodes from this index on come from persistent edits and run first
        self.streams: list[Stream] = []
        for body, rows, label in streams:
            stream = Stream(label, rows, body=body)
            stream.gen = self._run_body(body, stream)
            self.streams.append(stream)

    # -- driving --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run everything that needs no module before the forward pass."""
        streams = self.streams
        if len(streams) == 1:  # the common case: run the one stream up to its first read (or to its end)
            stream = streams[0]
            try:
                next(stream.gen)
            except StopIteration:
                stream.done = True
                return
            if stream.wait_key is not None and len(streams) == 1:
                return  # it waits for a module; nothing else can run before the pass
        self._advance()

    def on_event(self, key: tuple, value: Any) -> Event:
        """A module's input or output (``key``: (path, is_input)) is here: run what can use it."""
        counts = self.counts
        call = counts.get(key, 0)
        counts[key] = call + 1
        event = Event(key, call, value)
        streams = self.streams
        if self.event is None and len(streams) == 1:  # the common case: one stream, no reentrant call in flight
            stream = streams[0]
            if stream.wait_key == key and not stream.done:
                self.event = event
                try:
                    next(stream.gen)
                except StopIteration:
                    stream.done = True
                finally:
                    self.event = None
                if stream.stop_at is event and stream.wait_key is not None:
                    raise EarlyStop()  # (see Node.stops)
                if len(streams) == 1 and (stream.done or stream.wait_key is not None):
                    return event  # nothing else can have become runnable
        self._deliver(event)
        return event

    def _deliver(self, event: Event) -> None:
        """The general case of :meth:`on_event`: several streams, reentrant calls, events nobody waits for yet."""
        key, call = event.key, event.call
        outer, self.event = self.event, event
        try:
            for stream in self.streams:
                if not stream.done and stream.gen.gi_running:  # reentrant: an ad-hoc module call with hook=True
                    if stream.pending is None:
                        stream.pending = {}
                    stream.pending[(key, call)] = event
            self._advance()
            stop = False
            for stream in self.streams:  # kept in case what a stream waits on never comes (see finish)
                waiting = stream.waiting
                if waiting is None or stream.last_event is event:
                    continue  # not waiting, or it used this event itself
                wants = stream.last_access()
                if max(wants.get((key, call), -1), wants.get((key, None), -1)) > waiting.index:
                    if stream.missed is None:
                        stream.missed = {}
                    stream.missed[(key, call)] = event
                    stop = stop or (key, call) in _stops_of(stream)
            for stream in self.streams:
                if stream.stop_at is event and not stream.done and stream.wait_key is not None:
                    stop = True  # (see Node.stops)
            if stop:  # `envoy.output.stop()` written after a read of a later module: stop at this module, as
                raise EarlyStop()  # nnsight 0.4 did (that read never gets its value), not OutOfOrderError later
        finally:
            self.event = outer

    def finish(self) -> None:
        """After the forward pass: run what is left. Reads of modules that never fired are skipped, and reads
        after them are served from the events their stream missed while it waited."""
        self.finished = True
        self.event = None
        self._advance()
        if self.armed and self._parent is not None and self._backward_after_trace():
            # a trace of a session whose backward() comes later in the session: its hooks wait for that pass
            parent = self._parent
            if type(parent.armed) is tuple:
                parent.armed, parent.grad_overrides = [], {}
            parent.armed.extend(self.armed)
            self.armed = parent.armed
            return
        check_gradients_ran(self.armed)

    def results(self) -> dict[int, Any]:
        return self.saved_values

    def _advance(self) -> None:
        """Resume every stream that can use the current event (or that waits on a value), until none progresses.
        Another pass is needed only when a stream that waits on a value from another stream is still waiting."""
        streams = self.streams
        if len(streams) == 1 and streams[0].done:  # (the common end of a run: nothing is left to resume)
            return
        event = self.event
        key = event.key if event is not None else None
        while True:
            progressed = waiting_on_values = False
            for stream in self.streams:  # regions armed during the pass are appended, and run in this pass
                if stream.done or stream.gen.gi_running:
                    continue
                wait_key = stream.wait_key
                if wait_key is not None and wait_key != key and not self.finished:
                    continue  # blocked on another module's event
                before = self.executed
                try:
                    next(stream.gen)
                except StopIteration:
                    stream.done = True
                if self.executed != before:
                    progressed = True
                if not stream.done and stream.wait_key is None:
                    waiting_on_values = True
            if not (progressed and waiting_on_values):
                return

    # -- the stream body ------------------------------------------------------------------------------------
    def _run_body(self, body: list[Node], stream: Stream, step: Optional[int] = None) -> Iterator[None]:
        """Run ``body`` in order; ``step`` is the call index of multi-call reads in a region's iteration."""
        for node in body:
            if node.index in stream.moved:  # rebound (not mutated) when nodes move out: read it each time
                continue
            op = node.op
            if op is INVOKE:
                continue  # its body is a stream of its own
            ready = True
            if node.deps:  # (what _deps_ready does, inline)
                env = self.env
                for dep in node.deps:
                    value = env[dep.index]
                    if value is UNSET:
                        ready = None
                        break
                    if value is SKIPPED:
                        ready = False
                        break
            while ready is None:
                stream.waiting = node
                stream.wait_key = None
                yield
                ready = self._deps_ready(node)
            if not ready:
                self._skip(node)
                continue
            event = None
            if op is READ or op is WRITE:
                target = node.target
                call = target.call
                if type(call) is Calls:
                    if step is None:
                        self._arm_region(node, body, stream)
                        continue
                    call = step
                key = node.event_key
                if key is None:
                    key = node.event_key = (target.path, target.key != "output")
                event = self.event
                if event is None or event.call != call or event.key != key:
                    if stream.pending is None and stream.missed is None and self.counts.get(key, 0) <= call:
                        event = None  # the module has not run that call yet: wait (what _event_for finds, inline)
                    else:
                        event = self._event_for(node, stream, key, call)
                    while event is None:
                        if self.finished:
                            break
                        stream.waiting = node
                        stream.wait_key = key
                        yield
                        event = self.event
                        if event is None or event.call != call or event.key != key:
                            event = self._event_for(node, stream, key, call)
                    if event is None:
                        self._unreached(node, stream, call)
                        continue
                stream.last_event = event
                if op is READ:  # inline: the most frequent node of all
                    stream.waiting = stream.wait_key = None
                    value = event.value
                    if type(event) is _Reread:  # (its value was narrowed when it was first read)
                        self._set(node, value)
                        continue
                    stream.last_read = target
                    if node.stops:  # a stop of this location comes later: the pass ends at this event
                        stream.stop_at = event
                    try:
                        if target.key != "output":
                            stream.last_input = event
                            if target.key != "inputs":
                                value = _first_input(value)
                        if stream.rows is not None:
                            value = narrow(value, stream.rows)
                    except Exception as exc:
                        raise annotate(exc, node) from None
                    self._set(node, value)
                    continue
            elif op is CALL_FUNCTION or op is CALL_METHOD or op is GET_ATTR:
                pass  # the most frequent computations: straight to the op below
            elif op is COND:
                try:
                    taken = bool(self._load(node.args[0]))
                except Exception as exc:
                    raise annotate(exc, node) from None
                if taken:
                    self._set(node, True)
                    yield from self._run_body(node.body, stream, step)
                else:
                    self._set(node, False)
                    for inner in node.body:
                        self._skip(inner)
                continue
            elif op is TRACE:
                self._run_trace(node)
                self._set(node, None)
                continue
            elif op is ITER:
                yield from self._run_loop(node, stream)
                continue
            elif op is STOP and node.target == "session":
                raise StopLoop()
            elif op is STOP:
                while not self._stop_barrier(node, stream):
                    stream.waiting = node
                    stream.wait_key = None
                    yield
                raise EarlyStop()
            elif op is GRAD:
                self._arm_grad(node, body, stream)
                continue
            stream.waiting = stream.wait_key = None
            try:
                if op is CALL_FUNCTION and node.flat and node.kwargs is _NO_KWARGS:  # Ops.call_function, inline
                    env = self.env
                    value = node.target(*[env[a.index] if type(a) is Node else a for a in node.args])
                else:
                    value = _OPS[op](self, node, stream, event)
            except EarlyStop:
                raise
            except Exception as exc:
                raise annotate(exc, node) from None
            self._set(node, value)

    def _deps_ready(self, node: Node) -> Optional[bool]:
        """True: run it; None: wait for another stream; False: a dependency was skipped, so skip it too."""
        env = self.env
        for dep in node.deps:
            value = env[dep.index]
            if value is UNSET:
                return None
            if value is SKIPPED:
                return False
        return True

    def _event_for(self, node: Node, stream: Stream, key: tuple, call: int) -> Optional[Event]:
        """The event a read or write of ``node`` uses, or None while it has not happened yet (the current event
        was checked by the caller)."""
        loc: Location = node.target
        if stream.pending is not None:
            event = stream.pending.pop((key, call), None)
            if event is not None:
                return event
        if self.finished and stream.missed is not None and (key, call) in stream.missed:
            if node.op is WRITE:
                raise annotate(
                    OutOfOrderError(
                        f"{loc} cannot be written in {stream.label}: the forward pass is over, because a read before "
                        "it in this invoke waited for a module that never ran"
                    ),
                    node,
                )
            return stream.missed[(key, call)]
        if self.counts.get(key, 0) > call:
            last = stream.last_read
            if node.op is READ and node.args:  # read again after a later module: the earlier read's value
                earlier = node.args[0]
                value = self.env[earlier.index]
                if value is not FREED and value is not UNSET and value is not SKIPPED and not self._changed_later(node):
                    return _Reread(key, call, value)
            if node.op is READ and last is not None and last.path == loc.path and loc.key != "output":
                # a module's input read after its own output (nnsight 0.4's test_save): the input fired while the
                # stream waited on that output, or an earlier read of this stream used it (`.input` then `.output`
                # then `.inputs`); a read that is then edited cannot take effect
                event = stream.missed.get((key, call)) if stream.missed is not None else None
                if event is None:
                    seen = stream.last_input
                    if seen is not None and seen.key == key and seen.call == call:
                        event = seen
                if event is not None and not self._changed_later(node):
                    return event
            after = f" after {_at_call(last, call)}" if last else ""
            raise annotate(
                OutOfOrderError(
                    f"{_at_call(loc, call)} was read{after} in {stream.label}, but that call of the module had "
                    "already run; read modules in forward order or use a second invoke"
                ),
                node,
            )
        return None

    def _changed_later(self, read: Node) -> bool:
        """Whether any later node changes the value of ``read`` (or a view of it) in place: such a change comes too
        late to take effect when the module has already run. (A clone, an arithmetic result or a gradient is a value
        of its own.)"""
        views = {read.index}
        for node in self.nodes[read.index + 1:]:
            if node is None or not node.args or type(node.args[0]) is not Node or node.args[0].index not in views:
                continue
            if changes_tensor_in_place(node):
                return True
            if views_its_input(node):
                views.add(node.index)
        return False

    def _unreached(self, node: Node, stream: Stream, call: int) -> None:
        loc: Location = node.target
        fired = self.counts.get((loc.path, loc.is_input), 0)
        if stream.open_ended:
            raise RegionEnd()
        if fired and call >= fired and self.ended_early is not None:
            logger.warning("%s was not reached in %s: %s; its value is not set", loc, stream.label,
                           self.ended_early)  # fmt: skip
            self._skip(node)
            return
        if fired and call >= fired:
            module = loc.describe().rsplit(".", 1)[0]
            raise annotate(
                MissedProviderError(
                    f"{loc} asks for call {call} of {module} in {stream.label}, but {module} ran only {fired} "
                    f"time(s) in this run (calls 0..{fired - 1}); use fewer .next() steps or valid .iter indices"
                ),
                node,
            )
        logger.warning("%s was never reached in %s: the module did not run, so its value is not set", loc,
                       stream.label)  # fmt: skip
        self._skip(node)

    def _stop_barrier(self, node: Node, stream: Stream) -> bool:
        """A stop ends the pass only once every other stream has run all its nodes recorded before it."""
        for other in self.streams:
            if other is stream or other.done:
                continue
            if other.waiting is not None and other.waiting.index < node.index:
                return False
        return True

    # -- values ---------------------------------------------------------------------------------------------
    def _set(self, node: Node, value: Any) -> None:
        self.executed += 1
        if self.deadline is not None:
            self._check_deadline(node)
        env = self.env
        if node.saved:
            self.saved_values[node.index] = value
            env[node.index] = value
        else:
            env[node.index] = value if node.num_users else FREED
        if node.deps:  # (what _release does, inline)
            remaining = self.remaining
            for dep in node.deps:
                i = dep.index
                left = remaining[i] = remaining[i] - 1
                if left == 0 and not dep.saved and env[i] is not SKIPPED:
                    env[i] = FREED

    def _check_deadline(self, node: Node) -> None:
        if self.interrupt is not None:
            self.interrupt()  # (it limits how often it really checks)
        if time.monotonic() > self.deadline:
            raise annotate(TimeLimitError("the run went past its time limit (Limits.max_seconds); it was stopped "
                                          "after this node"), node)  # fmt: skip

    def _release(self, node: Node) -> None:
        env, remaining = self.env, self.remaining
        for dep in node.deps:
            i = dep.index
            remaining[i] -= 1
            if remaining[i] == 0 and not dep.saved and env[i] is not SKIPPED:
                env[i] = FREED

    def _skip(self, node: Node) -> None:
        if self.env[node.index] is not UNSET:
            return
        self.env[node.index] = SKIPPED
        self.executed += 1
        self._release(node)
        if node.body is not None:
            for inner in node.body:
                self._skip(inner)

    def _load(self, a: Any) -> Any:
        if type(a) is Node:
            return self.env[a.index]
        if type(a) in (int, float, str, bool) or a is None:
            return a
        env = self.env
        return map_nodes(a, lambda n: env[n.index])


def _at_call(loc: Location, call: int) -> str:
    """A location in a message about one call: a multi-call read (``.all()``) names the call it was at."""
    return str(loc._replace(call=call)) if type(loc.call) is Calls else str(loc)


def _stops_of(stream: Stream) -> frozenset:
    """The events at which an ``envoy.output.stop()`` (a STOP of a single-call READ) in the top level of this
    stream's body stops the pass."""
    stops = stream.__dict__.get("stops")
    if stops is None:
        found = set()
        for node in stream.body:
            if node.op is STOP and node.args and type(node.args[0]) is Node and node.args[0].op is READ:
                loc = node.args[0].target
                if type(loc.call) is int:
                    found.add(((loc.path, loc.key != "output"), loc.call))
        stops = stream.__dict__["stops"] = frozenset(found)
    return stops


class _Reread(Event):
    """What a read of a module that already fired gets when the same stream read it earlier: that read's value."""

    __slots__ = ()


_OPS = {
    CALL_FUNCTION: Interleaver.call_function,
    CALL_METHOD: Interleaver.call_method,
    GET_ATTR: Interleaver.get_attr,
    WRITE: Interleaver.write,
    CALL_MODULE: Interleaver.call_module,
    PARAM: Interleaver.param,
    SET_GRAD: Interleaver.set_grad,
    LOG: Interleaver.log,
}  # one interpreter method per op (READ is inlined in _run_body; COND, INVOKE, STOP, GRAD, TRACE and ITER are
# handled by the stream itself)


def check_gradients_ran(armed: Any) -> None:
    """After a run: a `.grad` whose backward pass never reached its tensor is an error naming it."""
    for node, _ in armed:
        raise annotate(
            InterventionError(
                f"{node.name} reads `.grad` of {node.args[0].name} (created at {node.args[0].source}), which took "
                "no part in the backward pass recorded after it; read .grad only of tensors the loss depends on"
            ),
            node,
        )
