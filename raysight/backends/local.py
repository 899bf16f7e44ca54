"""LocalBackend: run a request in this process, interleaved with the model's forward pass."""

from __future__ import annotations

from typing import Any

from raysight.backends.base import Request
from raysight.runtime.execute import run_session, run_trace


class LocalBackend:
    """Runs the graph here: batch the invokes, install hooks, run the model, remove the hooks, collect values."""

    def __call__(self, model: Any, request: Request) -> dict[int, Any]:
        graph = request.graph
        if request.method == "session":
            return run_session(graph)
        interleaver = run_trace(model, graph.body, graph.nodes, request.invokes, request.forward_kwargs,
                                request.method, locations=graph.locations())  # fmt: skip
        return interleaver.results()
