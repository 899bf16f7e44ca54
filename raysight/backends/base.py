"""The boundary between recording a graph and running it: plain data in (:class:`Request`), saved values out."""

from __future__ import annotations

from dataclasses import dataclass, field
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Optional, Protocol

from raysight.graph.graph import Graph


class InvokeInputs:
    """One invoke's prepared inputs and how many batch rows they are."""

    __slots__ = ("args", "kwargs", "batch_size", "raw")

    def __init__(self, args: tuple, kwargs: dict, batch_size: int, raw: Optional[tuple] = None) -> None:
        self.args = args
        self.kwargs = kwargs
        self.batch_size = batch_size
        self.raw = raw  # what the user gave (inputs, kwargs) before preparation; extraction rebinds it per batch

    def __repr__(self) -> str:
        return f"InvokeInputs(batch_size={self.batch_size}, {len(self.args)} args, keys {list(self.kwargs)})"


@dataclass
class Request:
    """Everything needed to run one trace: the graph, each invoke's inputs, and forward keyword arguments."""

    graph: Graph
    invokes: list[InvokeInputs]
    forward_kwargs: dict = field(default_factory=dict)
    method: str = "forward"  # "forward", "generate", or "session" (graph is a session; model and invokes unused)


class Backend(Protocol):
    def __call__(self, model: Any, request: Request) -> dict[int, Any]:
        """Run ``request`` against ``model``; return the saved values by node index."""
        ...


_DEFAULT: ContextVar[Optional[Backend]] = ContextVar("raysight_default_backend", default=None)


def current_default() -> Optional[Backend]:
    """The backend traces use when given none (set by :func:`using`; None means the local backend)."""
    return _DEFAULT.get()


@contextmanager
def using(backend: Backend) -> Iterator[Backend]:
    """``with raysight.backends.using(WireBackend()):`` — traces and sessions in this block that name no backend
    run on ``backend`` (scoped to the block and the current context, not a process-wide setting)."""
    token = _DEFAULT.set(backend)
    try:
        yield backend
    finally:
        _DEFAULT.reset(token)
