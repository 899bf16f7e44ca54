"""Graph-level helpers usable in any trace or session: apply, log, stop, cond, iter, the ``trace`` decorator, and
builtins as nodes (nnsight 0.4's module-level API).

Outside a recording block each helper just does the plain thing (``raysight.list()`` is ``[]``).
"""

from __future__ import annotations

import builtins
import functools
from typing import Any, Callable

from raysight.errors import TraceError
from raysight.graph.node import CALL_FUNCTION, COND, LOG
from raysight.graph.proxy import Proxy, current_recorder


def _recording(what: str) -> Any:
    rec = current_recorder()
    if rec is None or not rec.recording:
        raise TraceError(f"raysight.{what} can only be used inside a `with model.trace(...)` or session block")
    return rec


def else_taken(condition: Any, *earlier: bool) -> bool:
    """The predicate of ``cond.else_(condition)``: no earlier branch of the chain was taken and ``condition`` holds."""
    return not builtins.any(earlier) and builtins.bool(condition)


def apply(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` as one node when the graph runs (plain call outside a trace)."""
    rec = current_recorder()
    if rec is None or not rec.recording:
        return fn(*args, **kwargs)
    return rec.record(CALL_FUNCTION, fn, args, kwargs)


def log(*values: Any, **print_kwargs: Any) -> None:
    """Print the real values when the graph runs."""
    _recording("log()").record(LOG, None, values, print_kwargs)


def stop() -> None:
    """``tracer.stop()`` in a trace (end the forward pass once everything recorded before this line has run);
    ``session.stop()`` in a session (end it, or inside a ``session.iter`` body end that loop)."""
    _recording("stop()").stop()


def cond(predicate: Any) -> Any:
    """``with raysight.cond(pred):`` — the same as ``tracer.cond(pred)``."""
    from raysight.tracing.tracer import Block

    rec = _recording("cond()")
    return Block(rec, rec.record(COND, None, (predicate,)).node)


def iter(collection: Any, return_context: bool = False) -> Any:  # noqa: A001 - nnsight's name
    """``with raysight.iter(collection) as item:`` — the same as ``session.iter(...)`` / ``tracer.iter(...)`` of the
    session or trace being recorded: the body is recorded once and runs once per element."""
    from raysight.tracing.session import loop_over

    return loop_over(_recording("iter()"), collection, return_context)


def trace(fn: Callable) -> Callable:
    """Decorator: ``@raysight.trace def f(...)`` makes every call of ``f`` inside a trace one node (as
    ``raysight.apply(f, ...)``) instead of tracing through its body; outside a trace ``f`` runs as usual."""
    if not callable(fn):
        raise TypeError(f"raysight.trace decorates a function (`@raysight.trace`), got {type(fn).__name__}; to run a "
                        "model use `model.trace(...)`")  # fmt: skip

    @functools.wraps(fn)
    def applied(*args: Any, **kwargs: Any) -> Any:
        return apply(fn, *args, **kwargs)

    return applied


class _Local:
    """The context of ``with raysight.local():``; see :func:`local`."""

    def __enter__(self) -> None:
        _recording("local()")

    def __exit__(self, *exc: Any) -> bool:
        return False


def local(fn: Any = None) -> Any:
    """nnsight 0.4's ``with nnsight.local():`` / ``@nnsight.local``. nnsight runs such a body on the client while the
    rest runs on NDIF, and inline when the trace is not remote. raysight records the body with the graph, as that
    non-remote case: on a Ray pool it runs on the actor next to the model (what it prints goes to the driver's log
    through Ray). ``raysight.local(fn)`` is :func:`trace`: each call of ``fn`` is one node."""
    if fn is None:
        return _Local()
    if not callable(fn):
        raise TypeError(f"raysight.local is `with raysight.local():` or decorates a function (`@raysight.local`), got "
                        f"{type(fn).__name__}")  # fmt: skip
    return trace(fn)


def _builtin(kind: type) -> Any:
    def make(*args: Any, **kwargs: Any) -> Any:
        rec = current_recorder()
        if rec is None or not rec.recording:
            return kind(*args, **kwargs)
        return rec.record(CALL_FUNCTION, kind, args, kwargs)

    make.__name__ = make.__qualname__ = kind.__name__
    make.__doc__ = f"``raysight.{kind.__name__}(...)``: ``{kind.__name__}(...)`` as a node inside a trace."
    return make


list = _builtin(builtins.list)  # noqa: A001 - deliberately the builtin's name, as in nnsight
dict = _builtin(builtins.dict)  # noqa: A001
tuple = _builtin(builtins.tuple)  # noqa: A001
set = _builtin(builtins.set)  # noqa: A001
int = _builtin(builtins.int)  # noqa: A001
float = _builtin(builtins.float)  # noqa: A001
str = _builtin(builtins.str)  # noqa: A001
bool = _builtin(builtins.bool)  # noqa: A001
bytes = _builtin(builtins.bytes)  # noqa: A001
bytearray = _builtin(builtins.bytearray)  # noqa: A001
complex = _builtin(builtins.complex)  # noqa: A001

__all__ = ["Proxy", "apply", "log", "stop", "cond", "iter", "trace", "local", "list", "dict", "tuple", "set", "int",
           "float", "str", "bool", "bytes", "bytearray", "complex"]  # fmt: skip
