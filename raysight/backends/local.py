"""LocalBackend: run a request in this process, interleaved with the model's forward pass."""

from __future__ import annotations

from typing import Any, Optional

from raysight.backends.base import Request
from raysight.graph.node import Op
from raysight.graph.passes import EDIT_INVOKE
from raysight.runtime.batching import Rows
from raysight.runtime.hooks import HookSet
from raysight.runtime.interpreter import EarlyStop, Interleaver


class LocalBackend:
    """Runs the graph here: batch the invokes, install hooks, run the model, remove the hooks, collect values."""

    def __call__(self, model: Any, request: Request) -> dict[int, Any]:
        graph = request.graph
        model._ensure_dispatched()
        streams = _streams(graph.body, request)
        interleaver = Interleaver(graph.nodes, streams, model._module_at)
        interleaver.edit_start = request.graph_size if request.graph_size is not None else len(graph.nodes)
        args, kwargs = model._batch_inputs(request.invokes)
        if request.forward_kwargs:
            kwargs = {**kwargs, **request.forward_kwargs}
        with HookSet(model._module_at, graph.locations(), interleaver):
            interleaver.start()
            try:
                model._execute(request.method, args, kwargs)
            except EarlyStop:
                return interleaver.results()
            interleaver.finish()
        return interleaver.results()


def _streams(body: list, request: Request) -> list[tuple[list, Optional[Rows], str]]:
    sizes = [inv.batch_size for inv in request.invokes]
    total = sum(sizes)
    streams: list[tuple[list, Optional[Rows], str]] = []
    for node in body:
        if node.op is Op.INVOKE and node.target == EDIT_INVOKE:
            streams.append((node.body, None, "an edit of the model"))
        elif node.op is Op.INVOKE:
            i = node.target
            whole = sizes[i] == total or sizes[i] == 0  # an invoke without input sees the whole batch
            rows = None if whole else Rows(sum(sizes[:i]), sizes[i], total)
            streams.append((node.body, rows, f"invoke {i}"))
    if len(streams) < len(body):  # there is code outside the invokes
        streams.append((body, None, "the code outside invokes"))
    return streams
