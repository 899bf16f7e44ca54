"""The interleaver's state: value sentinels, streams, events, the control-flow exceptions, and error notes."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable, Iterator, Optional

import torch

from raysight.graph.node import INVOKE, READ, WRITE, Location, Node
from raysight.runtime.batching import Rows

class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


UNSET: Any = _Sentinel("unset")
SKIPPED: Any = _Sentinel("skipped")
FREED: Any = _Sentinel("freed")


class RegionEnd(Exception):
    """An open-ended region (``.all()``) found no further call of its module: it is over."""


# A check a run calls between its nodes, which raises to stop it: a model actor sets one that raises once the client
# cancelled the request (and itself limits how often it asks Ray).
INTERRUPT: ContextVar[Optional[Callable[[], None]]] = ContextVar("raysight_interrupt", default=None)


class StopLoop(Exception):
    """``session.stop()`` was reached: ends the innermost ``session.iter`` loop, or the session outside loops."""


class EarlyStop(Exception):
    """Raised inside the forward pass to end it when a STOP node runs (caught by the backend)."""


class Event:
    """A module's value as a hook delivers it; writes replace ``value`` and set ``modified``."""

    __slots__ = ("key", "call", "value", "modified", "skips")

    def __init__(self, key: tuple, call: int, value: Any) -> None:
        self.key = key  # (module path, is_input)
        self.call = call
        self.value = value
        self.modified = False
        self.skips: Optional[list] = None  # `envoy.skip(value)` at this input event: [(rows, value, where)]


class Stream:
    """One invoke's body (or the code outside invokes), run as a generator."""

    # Defaults live on the class (a stream is made per invoke per trace: only what differs is set per instance).
    gen: Optional[Iterator] = None
    waiting: Optional[Node] = None
    wait_key: Optional[tuple] = None  # the event a blocked read waits for (None: waits on a value)
    last_read: Optional[Location] = None
    pending: Optional[dict] = None  # events that fired while this stream was busy (ad-hoc hook=True)
    done = False
    wants: Optional[dict] = None  # see last_access (built only when a stream waits through an event)
    missed: Optional[dict] = None  # events it wanted that fired while it waited on something else
    moved: frozenset = frozenset()  # nodes of its body handed to a gradient or multi-call stream (`|=` rebinds)
    last_event: Optional[Event] = None  # the last event a read or write of this stream used
    last_input: Optional[Event] = None  # the last input event a read of this stream used (`.inputs` after `.output`)
    stop_at: Optional[Event] = None  # the event at which a later `envoy.output.stop()` ends the pass (Node.stops)
    captures: Optional[list] = None  # a region's: [node index, value] pairs gradient streams take at each step's end

    def __init__(self, label: str, rows: Optional[Rows], open_ended: bool = False, body: Optional[list] = None):
        self.label = label
        self.rows = rows
        self.open_ended = open_ended  # a region over every call: ends quietly when the module stops firing
        self.body = body if body is not None else []

    def last_access(self) -> dict:
        """(event key, call) -> the index of the last single-call read or write of it in this stream's body; a
        multi-call read (a region's, ``.all()``) counts for every call, as (event key, None)."""
        if self.wants is None:
            wants: dict[tuple, int] = {}
            stack = list(self.body)
            while stack:
                node = stack.pop()
                if node.op is READ or node.op is WRITE:
                    loc = node.target
                    want = ((loc.path, loc.is_input), loc.call if type(loc.call) is int else None)
                    wants[want] = max(wants.get(want, -1), node.index)
                elif node.body is not None and node.op is not INVOKE:
                    stack.extend(node.body)
            self.wants = wants
        return self.wants



def walk(body: list[Node]) -> Iterator[Node]:
    for node in body:
        yield node
        if node.body is not None:
            yield from walk(node.body)


def same_view(a: Any, b: Any) -> bool:
    if a is b:
        return True
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def annotate(exc: BaseException, node: Node) -> BaseException:
    """Attach the failing node and the user's line that created it to ``exc`` (keeping its type)."""
    if getattr(exc, "_raysight_node", None) is not None:
        return exc
    where = f"\n    {node.source}: {node.source.text()}" if node.source else ""
    note = f"raysight: while running {node.format()}, created at{where or ' <unknown>'}"
    exc._raysight_node = node.index  # type: ignore[attr-defined]
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    elif exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}\n{note}", *exc.args[1:])
    return exc
