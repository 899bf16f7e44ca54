"""WireBackend: the whole remote path in this process (``remote="local"``).

The request is encoded to bytes, decoded against the *server's* copy of each model (a deep copy built once per
client model, so nothing the client holds is touched and weights the client never loaded stay unloaded there),
run by the local runtime, and the saved values come back encoded the same way. ``serve`` is the server half, the
part a model actor runs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import sys
import time
import logging
import weakref
from typing import Any, Callable, Iterator, Optional

import torch

from raysight.backends.base import Request
from raysight.config import CONFIG
from raysight.errors import RaysightError, RemoteExecutionError
from raysight.graph.serialize import Limits, WireError, decode_request, decode_result, encode_request, encode_result
from raysight.runtime.execute import run_session, run_trace
from raysight.runtime.state import SKIPPED

logger = logging.getLogger(__name__)


def serve(payload: bytes, resolve_model: Callable[[int], Any], limits: Limits, trusted: bool) -> bytes:
    """Decode a request, run it on the server's models, return the encoded saved values and ``tracer.log`` lines.
    An error raised here carries the lines logged before it as ``error._raysight_logs``."""
    logs = io.StringIO()
    try:
        return _serve(payload, resolve_model, limits, trusted, logs)
    except BaseException as exc:
        exc._raysight_logs = logs.getvalue()  # type: ignore[attr-defined]
        raise


@contextlib.contextmanager
def edits_set_aside(model: Any) -> Iterator[Any]:
    """``model`` without its persistent edits inside the block: a copy sent to a server leaves them behind, because
    they travel with each request."""
    edits = model.__dict__.get("_edits", [])
    model.__dict__["_edits"] = []
    try:
        yield model
    finally:
        model.__dict__["_edits"] = edits


@contextlib.contextmanager
def served_models_kept(live: list, models: list[tuple[Any, Any]]) -> Iterator[None]:
    """Run a request on ``models`` (``(model, its WireModel)`` pairs) as the client has them, without changing what
    the server serves. Inside, each model's modules are in the client's training modes and its parameters require
    grad as there (a field that is None: as served). When the request ends, the parameters it references (``live``,
    an optimizer stepping ``model.layer.parameters()``) get their values back, every parameter of ``models`` its
    ``.grad`` and ``requires_grad``, every module its mode, and a model that ran with a module in training mode its
    buffers (BatchNorm's running statistics). Within the request the changes show (later traces of a training
    session see the trained weights); the next caller of the pool gets the model as it was served. The values are
    kept on the CPU. A run that wants its trained weights saves them (they come back as values)."""
    kept: dict[int, tuple[torch.nn.Parameter, torch.Tensor, bool]] = {}
    for param in live:
        if id(param) not in kept:
            kept[id(param)] = (param, param.detach().to("cpu", copy=True), param.requires_grad)
    params = [(p, p.grad, p.requires_grad) for model, _ in models for p in model._module.parameters()]
    modes: list[tuple[torch.nn.Module, bool]] = []
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for model, wire in models:
            _take_client_state(model, wire, modes, buffers)
        yield
    finally:
        changed = 0
        with torch.no_grad():
            for param, value, requires_grad in kept.values():
                if not torch.equal(param.detach().cpu(), value):
                    param.copy_(value)
                    changed += 1
                param.requires_grad_(requires_grad)
            for buffer, value in buffers:
                if not torch.equal(buffer.detach().cpu(), value):
                    buffer.copy_(value)
        for param, grad, requires_grad in params:
            param.grad = grad
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)
        for module, flag in modes:
            module.training = flag
        if changed:
            logger.info("restored %d parameter(s) of the served model that the request changed", changed)


def _take_client_state(model: Any, wire: Any, modes: list, buffers: list) -> None:
    """Give ``model`` the client's ``frozen`` parameters and ``training`` modes of ``wire``; the modules whose mode
    changes go to ``modes`` (with their mode as served), and, when some module trains, the model's buffers to
    ``buffers`` (with a copy of their values)."""
    module = model._module
    if wire.frozen is not None:
        params = dict(module.named_parameters())
        unknown = sorted(set(wire.frozen) - params.keys())
        if unknown:
            raise WireError(f"the request freezes parameter(s) {unknown[:3]}, but the served {type(module).__name__} "
                            "has no such parameter; is the pool serving this model?")  # fmt: skip
        frozen = set(wire.frozen)
        for name, param in params.items():
            if param.requires_grad != (name not in frozen):
                param.requires_grad_(name not in frozen)
    if wire.training is not None:
        modules = dict(module.named_modules())
        unknown = sorted(set(wire.training) - modules.keys())
        if unknown:
            raise WireError(f"the request puts module(s) {unknown[:3]} in training mode, but the served "
                            f"{type(module).__name__} has no such module; is the pool serving this model?")
        training = set(wire.training)
        for name, m in modules.items():
            if m.training != (name in training):
                modes.append((m, m.training))
                m.training = name in training
        if training:
            buffers.extend((b, b.detach().to("cpu", copy=True)) for b in module.buffers())


def relay_logs(logs: Any) -> None:
    """Print on the client what ``tracer.log`` printed where the graph ran (as a local run prints it), unless
    ``raysight.CONFIG.APP.REMOTE_LOGGING`` is off."""
    if not CONFIG.APP.REMOTE_LOGGING:
        return
    for text in [logs] if isinstance(logs, str) else logs:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()


def _serve(payload: bytes, resolve_model: Callable[[int], Any], limits: Limits, trusted: bool, logs: Any) -> bytes:
    decoded = decode_request(payload, limits, trusted, resolve_model)
    models = {i: resolve_model(i) for i in range(len(decoded.models))}
    for i, model in models.items():
        model.__dict__["_edits"] = decoded.edits.get(i, [])  # the client's persistent edits, for this request
    with served_models_kept(decoded.live, [(m, decoded.models[i]) for i, m in models.items()]):
        return _run(decoded, models, limits, logs)


def _run(decoded: Any, models: dict, limits: Limits, logs: Any) -> bytes:
    deadline = time.monotonic() + limits.max_seconds if limits.max_seconds else None
    try:
        if decoded.method == "session":
            saved = run_session(decoded.graph, deadline=deadline, log_to=logs)
        else:
            model = models[decoded.model]
            graph = decoded.graph
            saved = run_trace(model, graph.body, graph.nodes, decoded.invokes, decoded.forward_kwargs,
                              decoded.method, locations=graph.locations(), deadline=deadline,
                              log_to=logs).results()  # fmt: skip
    except (RaysightError, KeyboardInterrupt):
        raise
    except Exception as exc:  # an intervention failed: report it as the server's error, keeping its type
        raise RemoteExecutionError.wrap(exc) from exc
    text = logs.getvalue()
    return encode_result(saved, limits, [text] if text else [])


def serve_part(payload: bytes, resolve_model: Callable[[int], Any], limits: Limits, trusted: bool, part: dict,
               given: dict[int, Any]) -> tuple[bytes, dict[int, Any]]:  # fmt: skip
    """The server half of one part of a split session (``part``: its top-level ``nodes``, the ``models`` it runs and
    the node values it ``exports`` to later parts; ``given``: what earlier parts exported to it). Returns the encoded
    reply for the client (the values the user saved) and the exports, which travel to the next actor, not here."""
    logs = io.StringIO()
    try:
        decoded = decode_request(payload, limits, trusted, resolve_model)
        for i in part["models"]:
            resolve_model(i).__dict__["_edits"] = decoded.edits.get(i, [])
        with served_models_kept(decoded.live, [(resolve_model(i), decoded.models[i]) for i in part["models"]]):
            return _run_part(decoded, limits, part, given, logs)
    except BaseException as exc:
        exc._raysight_logs = logs.getvalue()  # type: ignore[attr-defined]
        raise


def _run_part(decoded: Any, limits: Limits, part: dict, given: dict[int, Any], logs: Any) -> tuple[bytes, dict]:
    nodes = decoded.graph.nodes
    wanted = {n.index for n in nodes if n.saved}
    for i in part["exports"]:
        nodes[i].saved = True  # kept to the end of this part (this graph is the server's own copy)
    deadline = time.monotonic() + limits.max_seconds if limits.max_seconds else None
    try:
        values = run_session(decoded.graph, deadline=deadline, log_to=logs,
                             body=[nodes[i] for i in part["nodes"]], given=given)  # fmt: skip
    except (RaysightError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise RemoteExecutionError.wrap(exc) from exc
    text = logs.getvalue()
    saved = {i: v for i, v in values.items() if i in wanted}
    for i, v in given.items():  # a value from an earlier part that the user saved: as this part left it
        if i in wanted and v is not SKIPPED:
            saved[i] = v
    kept = {**{i: v for i, v in given.items() if v is not SKIPPED}, **values}  # (given objects: as changed here)
    exports = {i: kept[i] for i in part["exports"] if i in kept}  # absent: skipped (a cond that did not run)
    return bytes(encode_result(saved, limits, [text] if text else [])), exports


class WireBackend:
    """``model.trace(..., remote="local")``: serialize, run on a server-side copy, deserialize the results."""

    def __init__(self, trusted: bool = True, limits: Optional[Limits] = None) -> None:
        self.trusted = trusted
        self.limits = limits or Limits()
        self._servers: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
        self.last_request_bytes = 0

    def __call__(self, model: Any, request: Request) -> dict[int, Any]:
        models: list[Any] = []
        payload = encode_request(request, models, trusted=self.trusted,
                                 model=None if request.method == "session" else model)  # fmt: skip
        self.last_request_bytes = len(payload)
        servers = [self._server_copy(m) for m in models]
        try:
            result = serve(payload, lambda i: servers[i], self.limits, self.trusted)
        except BaseException as exc:
            relay_logs(getattr(exc, "_raysight_logs", ""))
            raise
        saved, logs = decode_result(result)
        relay_logs(logs)
        return saved

    def _server_copy(self, model: Any) -> Any:
        server = self._servers.get(model)
        if server is None:
            with edits_set_aside(model):
                server = copy.deepcopy(model)
            self._servers[model] = server
        return server


@functools.cache
def default_wire_backend() -> WireBackend:
    """The backend of ``remote="local"`` (one per process)."""
    return WireBackend()


__all__ = ["WireBackend", "WireError", "default_wire_backend", "relay_logs", "serve", "serve_part"]
