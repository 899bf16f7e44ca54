"""The wire format: a request (graph, invokes, edits, models) as a versioned, validated, compact payload.

Layout (documented in ``docs/wire-format.md``): a msgpack map validated by the pydantic models of ``schema.py``. Values inside
nodes are *value trees*: msgpack scalars, or maps tagged by ``"$"`` (``node``, ``tensor``, ``tuple``, ``list``,
``dict``, ``slice``, ``fn``, ``pickle``, ...). Tensors are raw bytes with dtype and shape, never nested lists, and
decode without a copy (``torch.frombuffer``). Callables travel by qualified name; in *trusted* mode anything else
travels by value (cloudpickle); in *restricted* mode only the allow-list (torch, tensor methods, operators, einops,
raysight builtins) may appear, and everything else is refused before anything runs, naming the callable and the
user's line that created it. Decoding checks every reference: a node may only use nodes recorded before it, each
node sits in exactly one body, targets and ops are from the closed set. Any defect is a :class:`WireError`.

This module encodes and is the wire's front door; the schema and limits are in ``schema.py``, the allow-list of
restricted mode in ``callables.py``, and decoding in ``decoding.py``.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import msgpack
import torch

from raysight.graph.callables import _RESTRICTED_ATTRS, callable_name, is_allowed
from raysight.graph.decoding import Decoded, decode_request, decode_result
from raysight.graph.graph import Graph
from raysight.graph.node import Calls, Location, Node, Op
from raysight.graph.schema import (
    SCHEMA_VERSION,
    Limits,
    WireError,
    WireGraph,
    WireInvoke,
    WireModel,
    WireNode,
    WireRequest,
    WireResult,
    WireSource,
)

__all__ = ["SCHEMA_VERSION", "Decoded", "Limits", "WireError", "WireGraph", "WireInvoke", "WireModel", "WireNode", "WireRequest",
           "WireResult", "WireSource", "callable_name", "decode_request", "decode_result", "encode_request",
           "encode_result", "is_allowed"]  # fmt: skip

class _Encoder:
    def __init__(self, trusted: bool, models: list[Any], frames: Optional[list] = None) -> None:
        self.trusted = trusted
        self.models = models  # model objects, in the order of WireRequest.models
        self.node: Optional[Node] = None
        self.frames = frames  # when set, tensor bytes go out of band (see encode_result)
        self.tensors: dict[int, tuple[torch.Tensor, dict]] = {}  # id() -> (the tensor, its encoding)
        self._owned: Optional[dict[int, dict]] = None  # id() of the models' parameters and modules -> reference

    def model_ref(self, model: Any) -> int:
        for i, known in enumerate(self.models):
            if known is model:
                return i
        self.models.append(model)
        return len(self.models) - 1

    def value(self, v: Any) -> Any:
        t = type(v)
        if v is None or t in (bool, int, float, str, bytes):
            return v
        if t is Node:
            return {"$": "node", "i": v.index}
        if isinstance(v, (torch.nn.Parameter, torch.nn.Module)) and self.models:
            ref = self.owned(v)
            if ref is not None:
                return ref
        if isinstance(v, torch.Tensor):
            # one object on this side is one object on the other (an optimizer's parameters are the ones the
            # trace uses; an in-place edit of a tensor shows wherever it is referenced)
            # (each occurrence carries the data, so the decoder may meet them in any order: the first it decodes is
            # the object every other occurrence of that id becomes)
            known = self.tensors.get(id(v))
            if known is not None:
                return known[1]
            out = _encode_tensor(v, self.frames)
            out["id"] = len(self.tensors)
            self.tensors[id(v)] = (v, out)  # v kept alive while encoding, so its id() stays its own
            return out
        if t is tuple:
            return {"$": "tuple", "items": [self.value(x) for x in v]}
        if t is list:
            return {"$": "list", "items": [self.value(x) for x in v]}
        if t is dict:
            return {"$": "dict", "items": [[self.value(k), self.value(x)] for k, x in v.items()]}
        if t is slice:
            return {"$": "slice", "items": [self.value(v.start), self.value(v.stop), self.value(v.step)]}
        if v is Ellipsis:
            return {"$": "ellipsis"}
        if t is torch.Size:
            return {"$": "size", "items": list(v)}
        if t is torch.dtype:
            return {"$": "dtype", "name": str(v).removeprefix("torch.")}
        if t is torch.device:
            return {"$": "device", "name": str(v)}
        if t is Location:
            return {"$": "location", "path": v.path, "key": v.key, "call": self.value(v.call)}
        if t is Calls:
            return {"$": "calls", "start": v.start, "stop": v.stop, "items": self.value(v.items), "scope": v.scope}
        if type(v).__name__ == "TraceSpec":
            return {"$": "trace", "model": self.model_ref(v.model), "method": v.method,
                    "invokes": [self.invoke(i) for i in v.invokes], "forward_kwargs": self.value(v.forward_kwargs)}
        if callable(v):
            name = callable_name(v)
            if name is not None and name[0] == "__main__" and self.trusted:
                name = None  # the script's own functions: the other side's __main__ is another program
            if name is not None and (self.trusted or is_allowed(*name)):
                return {"$": "fn", "module": name[0], "name": name[1]}
            return self.by_value(v, f"the callable {getattr(v, '__qualname__', repr(v))}")
        return self.by_value(v, f"a {t.__name__} value")

    def owned(self, v: Any) -> Optional[dict]:
        """The reference to ``v`` when it is a parameter or a module of one of the request's models: the server
        resolves it to *its* object (an optimizer over ``model.layer.parameters()`` steps the served weights, as a
        local run steps the model's own), where by value it would be a copy."""
        if self._owned is None:
            self._owned = {}
            for i, model in enumerate(self.models):
                module = getattr(model, "_module", None)
                if not isinstance(module, torch.nn.Module):
                    continue
                for path, sub in module.named_modules():
                    self._owned.setdefault(id(sub), {"$": "model_module", "model": i, "path": path})
                for name, param in module.named_parameters():
                    self._owned.setdefault(id(param), {"$": "model_param", "model": i, "name": name})
        return self._owned.get(id(v))

    def by_value(self, v: Any, what: str) -> Any:
        if not self.trusted:
            raise WireError(f"restricted mode: {what} is not on the allow-list{_where(self.node)}; only torch "
                            "functions, tensor methods, operators, einops and raysight builtins may be sent")
        import cloudpickle

        try:
            data = cloudpickle.dumps(v)
        except Exception as exc:  # a generator, a lock, an open file, ...
            hint = " (make it a list first: `list(...)`)" if inspect.isgenerator(v) else ""
            raise WireError(f"{what}{_where(self.node)} cannot be sent to where the graph runs: it cannot be "
                            f"pickled ({type(exc).__name__}: {exc}){hint}") from exc
        return {"$": "pickle", "data": data}

    def invoke(self, inv: Any) -> dict:
        return {"args": self.value(inv.args), "kwargs": self.value(inv.kwargs), "batch_size": inv.batch_size}

    def graph(self, graph: Graph) -> WireGraph:
        nodes = []
        for node in graph.nodes:
            self.node = node
            if not self.trusted:
                _check_names(node)
            nodes.append(WireNode(
                op=node.op.value,
                target=self.value(node.target),
                args=self.value(node.args),
                kwargs=self.value(node.kwargs),
                body=[n.index for n in node.body] if node.body is not None else None,
                saved=node.saved,
                source=WireSource(file=node.source.filename, line=node.source.lineno, function=node.source.function)
                if node.source else None,
            ))  # fmt: skip
        return WireGraph(nodes=nodes, body=[n.index for n in graph.body])


def _check_names(node: Node) -> None:
    if node.op in (Op.GET_ATTR, Op.CALL_METHOD) and isinstance(node.target, str):
        if node.target.startswith(_RESTRICTED_ATTRS):
            raise WireError(f"restricted mode: attribute {node.target!r} is not allowed{_where(node)}")


def _where(node: Optional[Node]) -> str:
    if node is None or node.source is None:
        return ""
    return f" (created at {node.source})"


def _encode_tensor(t: torch.Tensor, frames: Optional[list] = None) -> dict:
    cpu = t.detach().to("cpu").contiguous()
    dtype = str(cpu.dtype).removeprefix("torch.")
    if cpu.dtype in (torch.bfloat16, torch.float16):
        cpu = cpu.view(torch.int16)
    elif cpu.dtype == torch.bool:
        cpu = cpu.view(torch.uint8)
    data = memoryview(cpu.numpy()).cast("B")  # copied once: into the payload
    out = {"$": "tensor", "dtype": dtype, "shape": list(t.shape)}
    if frames is None:
        out["data"] = data
    else:
        out["frame"] = len(frames)
        frames.append(data)
    if t.requires_grad and t.is_leaf:
        out["grad"] = True
    if (t.is_leaf or t.retains_grad) and t.grad is not None:  # e.g. kept by retain_grad() on a saved value
        out["grad_value"] = _encode_tensor(t.grad, frames)
    if isinstance(t, torch.nn.Parameter):
        out["param"] = True
    return out


def client_state(model: Any) -> tuple[Optional[list[str]], Optional[list[str]]]:
    """The paths of ``model``'s modules in training mode (``model.train()`` / ``.eval()`` on the client) and the
    names of its parameters that do not require grad (``requires_grad_(False)``, a LoRA's frozen base), as
    ``named_modules`` / ``named_parameters`` name them: a server runs the request in the same state, so dropout and
    batch norm behave as here and no gradient is computed for a frozen parameter. One walk of the module tree."""
    module = getattr(model, "_module", None)
    if not isinstance(module, torch.nn.Module):
        return None, None
    training: list[str] = []
    frozen: list[str] = []
    seen: set[int] = set()
    for path, m in module.named_modules():
        if m.training:
            training.append(path)
        for name, p in m._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if not p.requires_grad:
                frozen.append(f"{path}.{name}" if path else name)
    return training, frozen


def encode_request(request: Any, models: list[Any], trusted: bool = True, model: Any = None) -> bytes:
    """Encode a :class:`~raysight.backends.base.Request` (``model`` is the traced model, None for a session)."""
    enc = _Encoder(trusted, models)
    model_index = enc.model_ref(model) if model is not None else -1
    for node in request.graph.nodes:  # every model first, so that any of their parameters is known as theirs
        if node.op is Op.TRACE:
            enc.model_ref(node.target.model)
    graph = enc.graph(request.graph)
    enc.node = None
    invokes = [WireInvoke(**enc.invoke(inv)) for inv in request.invokes]
    forward = enc.value(request.forward_kwargs)
    wire_models = []
    for i, m in enumerate(enc.models):
        training, frozen = client_state(m)
        wire_models.append(WireModel(id=str(i), edits=[enc.graph(g) for g in getattr(m, "_edits", [])],
                                     training=training, frozen=frozen))  # fmt: skip
    wire = WireRequest(version=SCHEMA_VERSION, method=request.method, graph=graph, invokes=invokes,
                       forward_kwargs=forward, model=model_index, models=wire_models)  # fmt: skip
    return msgpack.packb(wire.model_dump(), use_bin_type=True)


def encode_result(saved: dict[int, Any], limits: Limits, logs: Optional[list[str]] = None) -> bytearray:
    """The reply: ``[8-byte header length][msgpack header][tensor bytes, back to back]``. Tensors in the header
    name their frame; the whole reply is built with one copy of the tensor data, and decodes without another."""
    frames: list = []
    enc = _Encoder(trusted=True, models=[], frames=frames)
    values = {i: enc.value(v) for i, v in saved.items()}
    lengths = [len(f) for f in frames]
    # built by us, so no validation on the way out (it would walk every value); decode_result validates
    header = msgpack.packb({"version": SCHEMA_VERSION, "saved": values, "logs": logs or [], "frames": lengths},
                           use_bin_type=True)  # fmt: skip
    size = 8 + len(header) + sum(lengths)
    if size > limits.max_saved_bytes:
        raise WireError(f"the saved values take {size} bytes, over the limit of {limits.max_saved_bytes}; "
                        "save less (e.g. slices or reductions) or raise Limits.max_saved_bytes")  # fmt: skip
    return bytearray().join([len(header).to_bytes(8, "little"), header, *frames])
