"""LocalBackend: run a request in this process, interleaved with the model's forward pass."""

from __future__ import annotations

from typing import Any

from raysight.backends.base import Request
from raysight.graph.graph import Graph
from raysight.runtime.execute import run_session, run_trace


class LocalBackend:
    """Runs the graph here: batch the invokes, install hooks, run the model, remove the hooks, collect values."""

    def __call__(self, model: Any, request: Request) -> dict[int, Any]:
        if request.method == "session":
            return run_session(request.graph)
        return self.run(model, request.graph, request.invokes, request.forward_kwargs, request.method)

    def run(self, model: Any, graph: Graph, invokes: list, forward_kwargs: dict, method: str) -> dict[int, Any]:
        """A trace's request given as its parts (what a tracer calls directly, without building a Request)."""
        return run_trace(model, graph.body, graph.nodes, invokes, forward_kwargs, method,
                         locations=graph.locations()).results()  # fmt: skip
