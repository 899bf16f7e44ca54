"""Session: several traces, loops, conditions and plain operations recorded as one graph and run at exit.

A session is a graph like a trace's: each trace in it becomes a TRACE node whose body holds the trace's nodes,
``session.iter`` an ITER node, ``session.cond`` a COND node. Values flow between traces without ``.save()``
(they share the session's values), including as a later trace's input. While a session records, constructing
``torch.nn.Parameter``, ``torch.nn.Linear``, ``torch.optim`` optimizers and ``DataLoader``s records nodes too
(:mod:`raysight.tracing.creation`), so a training loop runs where the model runs.
"""

from __future__ import annotations

from typing import Any

from raysight.backends.base import Request, current_default
from raysight.errors import TraceError
from raysight.graph.graph import Graph
from raysight.graph.node import CALL_FUNCTION, COND, ITER, LOG, STOP, Node, user_source
from raysight.graph.proxy import _CURRENT, Proxy, current_recorder, set_value
from raysight.tracing import control, creation
from raysight.tracing.tracer import Block, Tracer


class Session:
    """``with model.session() as session:`` — see the module docstring."""

    is_session = True
    hook_calls = False

    def __init__(self, backend: Any = None, validate: bool = False) -> None:
        self.validate = validate  # traces opened in it validate their operations on fake values
        self._reads: dict = {}  # see Tracer.record_read
        self.graph = Graph()
        self.recording = False
        self._backend = backend
        self._saved: list[Proxy] = []
        self._token: Any = None

    # -- the recorder protocol (shared with Tracer) ---------------------------------------------------------
    record = Tracer.record
    record_call = Tracer.record_call
    record_read = Tracer.record_read
    record_write = Tracer.record_write
    _to_arg = Tracer._to_arg
    _mode = None
    _calls: dict = {}  # never written: .next() positions belong to traces
    model = None
    root_module = None

    def mark_saved(self, proxy: Proxy) -> None:
        proxy.node.saved = True
        self._saved.append(proxy)

    def adopt(self, saved: list[Proxy]) -> None:
        """A trace of this session hands over the proxies it saved."""
        self._saved.extend(saved)

    # -- the user's API -------------------------------------------------------------------------------------
    def iter(self, collection: Any, return_context: bool = False) -> "Loop":
        """``with session.iter(collection) as item:`` runs the body once per element when the session runs
        (``for item in session.iter(collection):`` records the same loop)."""
        return loop_over(self, collection, return_context)

    def cond(self, predicate: Any) -> Block:
        """``with session.cond(pred):`` runs its body (traces or plain operations) only if ``pred`` is true."""
        return Block(self, self.record(COND, None, (predicate,)).node)

    def stop(self) -> None:
        """End the session here; inside a ``session.iter`` body, end that loop only."""
        self.record(STOP, "session")

    exit = stop

    def log(self, *values: Any, **print_kwargs: Any) -> None:
        """Print the real values when the session runs."""
        self.record(LOG, None, values, print_kwargs)

    def apply(self, fn: Any, *args: Any, **kwargs: Any) -> Proxy:
        """Call ``fn(*args, **kwargs)`` as one node when the session runs."""
        return self.record(CALL_FUNCTION, fn, args, kwargs)

    local = staticmethod(control.local)  # nnsight 0.4's ``session.local()``: see :func:`raysight.local`

    # -- context --------------------------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        active = current_recorder()
        if active is not None and active.recording:
            kind = "session" if getattr(active, "is_session", False) else "trace"
            raise TraceError(f"a session was opened inside a {kind}; sessions cannot be nested")
        self._token = _CURRENT.set(self)
        self.recording = True
        creation.enable()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.recording = False
        creation.disable()
        _CURRENT.reset(self._token)
        if exc_type is not None:
            return False
        backend = self._backend or current_default()
        if backend is None:
            from raysight.tracing.tracer import _local_backend

            backend = _local_backend()
        results = backend(None, Request(self.graph, [], {}, "session"))
        for proxy in self._saved:
            index = proxy.node.index
            if index in results:
                set_value(proxy, results[index])
        self._saved = []
        return False

    def __repr__(self) -> str:
        return f"<Session: {len(self.graph)} nodes>"


def loop_over(recorder: Any, collection: Any, return_context: bool = False) -> "Loop":
    """An ITER node over ``collection`` in the graph ``recorder`` (a session or a trace) records now."""
    if not isinstance(collection, Proxy) and not hasattr(collection, "__len__"):
        what = "session.iter()" if getattr(recorder, "is_session", False) else "tracer.iter()"
        raise TypeError(
            f"{what} needs a collection with a length (list, tuple, tensor, DataLoader, raysight.list()), "
            f"got {type(collection).__name__}; wrap a generator in list(...)"
        )
    node = recorder.graph.add(ITER, None, recorder._to_arg((collection,)), None, user_source(1))
    return Loop(recorder, node, return_context)


class Loop(Block):
    """The context of ``session.iter``: yields the element proxy (and, with ``return_context``, the loop). As a
    ``for`` loop it runs its body once, while recording, and records that body as the loop's."""

    def __init__(self, session: Session, node: Node, return_context: bool) -> None:
        super().__init__(session, node)
        self._return_context = return_context

    def __enter__(self) -> Any:  # type: ignore[override]
        super().__enter__()
        item = Proxy(self.node, self.recorder)
        return (item, self) if self._return_context else item

    def __iter__(self) -> Any:
        entered = self.__enter__()
        try:
            yield entered
        finally:  # the body ended (or broke out, or raised: the recording is then abandoned anyway)
            self.__exit__(None, None, None)

    def cond(self, predicate: Any) -> Block:
        return Block(self.recorder, self.recorder.record(COND, None, (predicate,)).node)

    def stop(self) -> None:
        """End this loop when reached."""
        self.recorder.record(STOP, "session")

    exit = stop

    def log(self, *values: Any, **print_kwargs: Any) -> None:
        self.recorder.record(LOG, None, values, print_kwargs)


