"""An extraction's plan: the user's ``fn(model, batch)`` traced once, and what each batch changes in it.

``fn`` runs once, on the first batch, under a backend that records the trace instead of running it. The graph it
made is the job's graph for every batch; what changes per batch is the trace's input. The input the user passed
is searched for the batch's own column objects (``model.trace(batch["text"])``), which become :class:`Column`
placeholders, so a batch fills them in and is prepared (tokenized) where it runs. ``fn``'s returned proxies name
the output columns.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from raysight.backends.base import Request, using
from raysight.errors import TraceError
from raysight.graph.node import Node, Op
from raysight.graph.proxy import Proxy


@dataclass(frozen=True)
class Column:
    """Where a batch column goes in the trace's input."""

    name: str


@dataclass
class Plan:
    """What runs for every batch: the recorded request, the input with its column placeholders, and the outputs."""

    model: Any
    request: Request
    inputs: tuple  # (args, kwargs) of the trace's one invoke, with Column placeholders
    outputs: dict[str, int]  # output column -> the saved node's index
    preprocess: Optional[Callable[[dict], dict]] = None
    strip_padding: bool = True
    keep_columns: tuple = ()
    digest: str = field(default="")


class _Recorder:
    """A backend that keeps the request instead of running it."""

    def __init__(self) -> None:
        self.requests: list[tuple[Any, Request]] = []

    def __call__(self, model: Any, request: Request) -> dict[int, Any]:
        self.requests.append((model, request))
        return {}


def plan_extraction(model: Any, fn: Callable, batch: dict, *, preprocess: Optional[Callable] = None,
                    strip_padding: bool = True, keep_columns: tuple = ()) -> Plan:  # fmt: skip
    """Trace ``fn(model, batch)`` once (nothing runs) and turn it into a :class:`Plan`."""
    given = preprocess(dict(batch)) if preprocess is not None else batch
    if not isinstance(given, dict):
        raise TypeError(f"preprocess must return a dict of columns, got {type(given).__name__}")
    recorder = _Recorder()
    with using(recorder):
        returned = fn(model, given)
    if len(recorder.requests) != 1 or recorder.requests[0][1].method == "session":
        raise TraceError(
            f"an extraction's fn must open exactly one `model.trace(batch[...])` (or `model.generate`), and no "
            f"session; it opened {len(recorder.requests)} trace(s). Where it runs is extract(..., remote=); do not "
            "pass remote= or backend= to the trace inside fn"
        )
    traced, request = recorder.requests[0]
    if traced is not model and getattr(traced, "_module", None) is not getattr(model, "_module", None):
        raise TraceError("an extraction's fn traced another model than the one given to extract(); trace `model`")
    if len(request.invokes) != 1 or request.invokes[0].raw is None:
        raise TraceError(
            f"an extraction's trace takes the batch as its one input (`model.trace(batch['text'])`); it had "
            f"{len(request.invokes)} invokes. Run other inputs as a separate extraction"
        )
    inputs, found = _bind(request.invokes[0].raw, given)
    if not found:
        raise TraceError(
            f"the trace's input does not come from the batch: pass a column as it is, e.g. "
            f"`model.trace(batch[{next(iter(given), 'text')!r}])` (to transform inputs, give extract(preprocess=))"
        )
    outputs = _outputs(returned, request)
    for column in keep_columns:
        if column not in batch:
            raise KeyError(f"keep_columns names {column!r}, which the input does not have; it has {list(batch)}")
    clash = set(outputs) & ({"id", "tokens"} | set(keep_columns))
    if clash:
        raise ValueError(f"fn returns {sorted(clash)}, a name extraction uses for its own columns; rename it")
    _stop_after_outputs(request)
    digest = _digest(model, request, outputs, inputs, preprocess, strip_padding, keep_columns)
    return Plan(model, request, inputs, outputs, preprocess, strip_padding, tuple(keep_columns), digest)


def _digest(model: Any, request: Request, outputs: dict, inputs: Any, preprocess: Any, strip_padding: bool,
            keep_columns: tuple) -> str:  # fmt: skip
    """What makes two runs the same job (a resume must not mix rows of two): the graph (without source lines, so
    editing the script elsewhere does not matter), the model and its edits, the outputs, the input template,
    preprocess and the output options."""
    edits = [[n.format() for n in g.nodes] for g in model.__dict__.get("_edits", [])]
    module = model.__dict__.get("_module")
    what = [
        [n.format() for n in request.graph.nodes], request.method, sorted(outputs.items()), repr(inputs), edits,
        str(model.__dict__.get("_source") or type(module).__qualname__), _callable_name(preprocess),
        strip_padding, list(keep_columns),
    ]  # fmt: skip
    return hashlib.sha256(repr(what).encode()).hexdigest()[:16]


def _callable_name(fn: Any) -> str:
    if fn is None:
        return ""
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _stop_after_outputs(request: Request) -> None:
    """End each batch's forward pass once every output is computed (``tracer.stop()`` as the trace's last line):
    blocks after the last one read do not run. Only for a plain forward whose code is all in its one invoke."""
    body = request.graph.body
    if request.method != "forward" or len(body) != 1 or body[0].op is not Op.INVOKE:
        return
    nodes = request.graph.nodes
    stop = Node(len(nodes), Op.STOP, None, (), None, None, None)
    nodes.append(stop)
    body[0].body.append(stop)


def fill(template: Any, batch: dict) -> Any:
    """``template`` with each :class:`Column` replaced by that column of ``batch``."""
    if isinstance(template, Column):
        return batch[template.name]
    if isinstance(template, tuple):
        return tuple(fill(v, batch) for v in template)
    if isinstance(template, list):
        return [fill(v, batch) for v in template]
    if isinstance(template, dict):
        return {k: fill(v, batch) for k, v in template.items()}
    return template


def _bind(value: Any, batch: dict) -> tuple[Any, bool]:
    for name, column in batch.items():
        if value is column:
            return Column(name), True
    if isinstance(value, (tuple, list)):
        parts = [_bind(v, batch) for v in value]
        return type(value)(p for p, _ in parts), any(f for _, f in parts)
    if isinstance(value, dict):
        parts_d = {k: _bind(v, batch) for k, v in value.items()}
        return {k: p for k, (p, _) in parts_d.items()}, any(f for _, f in parts_d.values())
    return value, False


def _outputs(returned: Any, request: Request) -> dict[str, int]:
    if not isinstance(returned, dict) or not returned:
        raise TypeError(
            f"an extraction's fn returns a dict of output name -> proxy, e.g. "
            f"`return {{'h3': model.layers[3].output[0]}}`; it returned {type(returned).__name__}"
        )
    nodes = request.graph.nodes
    outputs: dict[str, int] = {}
    for name, proxy in returned.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"output names must be non-empty strings, got {name!r}")
        if not isinstance(proxy, Proxy):
            raise TypeError(f"output {name!r} is a {type(proxy).__name__}, not a value of the trace; return proxies")
        node = proxy.node
        if node.index >= len(nodes) or nodes[node.index] is not node:
            raise TraceError(f"output {name!r} is not a value of fn's trace")
        node.saved = True  # returned means wanted, saved or not
        outputs[name] = node.index
    return outputs
