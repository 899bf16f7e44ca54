"""Decoding the wire format: every reference and limit is checked before a node is built (see ``serialize.py`` for
the layout). A request decodes to a :class:`Decoded` graph against the server's models; a reply to saved values
whose tensors are views of the reply's bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import msgpack
import torch
from pydantic import ValidationError

from raysight.graph.callables import _RESTRICTED_ATTRS, _resolve, is_allowed
from raysight.graph.graph import Graph
from raysight.graph.node import Calls, Location, Node, Op, SourceLine, mark_stop
from raysight.graph.schema import (
    SCHEMA_VERSION,
    Limits,
    WireError,
    WireGraph,
    WireModel,
    WireRequest,
    WireResult,
)


@dataclass
class Decoded:
    """A decoded request: the graph and invokes with real values, and the model references it makes."""

    graph: Graph
    invokes: list[Any]
    forward_kwargs: dict
    method: str
    model: int
    models: list[WireModel]
    edits: dict[int, list[Graph]] = field(default_factory=dict)
    live: list[torch.nn.Parameter] = field(default_factory=list)  # the server's own parameters it references


class _Decoder:
    def __init__(self, trusted: bool, resolve_model: Any) -> None:
        self.trusted = trusted
        self.resolve_model = resolve_model
        self.nodes: list[Node] = []
        self.limit = 0  # nodes a value may reference: those recorded before the current one
        self.where = ""
        self.frames: Optional[list] = None  # a reply's out-of-band tensor bytes
        self.tensors: dict[int, torch.Tensor] = {}  # by the tensor map's id: one object per id
        self.live: list[torch.nn.Parameter] = []  # the models' own parameters the request references

    def fail(self, problem: str) -> WireError:
        return WireError(f"malformed request{self.where}: {problem}")

    def value(self, v: Any, depth: int = 0) -> Any:
        if depth > 64:
            raise self.fail("values nested more than 64 deep")
        if v is None or type(v) in (bool, int, float, str, bytes):
            return v
        if type(v) is not dict or "$" not in v:
            raise self.fail(f"a bare {type(v).__name__} where a tagged value was expected")
        tag = v["$"]
        d = depth + 1
        try:
            if tag == "node":
                i = v["i"]
                if type(i) is not int or not 0 <= i < self.limit:
                    raise self.fail(f"reference to node {i!r}, which does not exist before this one")
                return self.nodes[i]
            if tag == "tensor":
                share = v.get("id")
                if share is None:
                    return _decode_tensor(v, self)
                if type(share) is not int:
                    raise self.fail(f"a tensor's id must be an int, got {share!r}")
                t = self.tensors.get(share)
                if t is None:  # the first occurrence of this tensor: every other one is this object
                    t = self.tensors[share] = _decode_tensor(v, self)
                return t
            if tag == "tuple":
                return tuple(self.value(x, d) for x in self._items(v))
            if tag == "list":
                return [self.value(x, d) for x in self._items(v)]
            if tag == "dict":
                return {_hashable(self.value(k, d), self): self.value(x, d) for k, x in self._pairs(v)}
            if tag == "slice":
                start, stop, step = (self.value(x, d) for x in self._items(v, 3))
                return slice(start, stop, step)
            if tag == "ellipsis":
                return Ellipsis
            if tag == "size":
                return torch.Size(int(x) for x in self._items(v))
            if tag == "dtype":
                dtype = getattr(torch, str(v["name"]), None)
                if not isinstance(dtype, torch.dtype):
                    raise self.fail(f"unknown dtype {v['name']!r}")
                return dtype
            if tag == "device":
                return torch.device(str(v["name"]))
            if tag == "location":
                call = self.value(v["call"], d)
                if v["key"] not in ("output", "input", "inputs", "skip") or not isinstance(v["path"], str):
                    raise self.fail(f"bad location {v['path']!r}.{v['key']!r}")
                if not (type(call) is int and call >= 0) and type(call) is not Calls:
                    raise self.fail(f"bad call selector {call!r}")
                return Location(v["path"], v["key"], call)
            if tag == "calls":
                items = self.value(v["items"], d)
                return Calls(int(v["start"]), None if v["stop"] is None else int(v["stop"]),
                             None if items is None else tuple(int(i) for i in items), int(v["scope"]))  # fmt: skip
            if tag == "trace":
                from raysight.backends.base import InvokeInputs
                from raysight.tracing.tracer import TraceSpec

                model = self.resolve_model(int(v["model"]))
                invokes = [InvokeInputs(self.value(i["args"], d), self.value(i["kwargs"], d), int(i["batch_size"]))
                           for i in v["invokes"]]  # fmt: skip
                method = check_method(v["method"], self.trusted)
                return TraceSpec(model, invokes, self.value(v["forward_kwargs"], d), method)
            if tag == "model_param" or tag == "model_module":
                return self.owned(tag, int(v["model"]), str(v["name" if tag == "model_param" else "path"]))
            if tag == "fn":
                return self.function(str(v["module"]), str(v["name"]))
            if tag == "pickle":
                if not self.trusted:
                    raise WireError(f"restricted mode: a value sent by value (pickled){self.where} is refused")
                import cloudpickle

                return cloudpickle.loads(v["data"])
        except WireError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise self.fail(f"bad {tag!r} value ({type(exc).__name__}: {exc})") from None
        raise self.fail(f"unknown value tag {tag!r}")

    def _items(self, v: dict, n: Optional[int] = None) -> list:
        items = v["items"]
        if type(items) is not list or (n is not None and len(items) != n):
            raise self.fail(f"{v['$']!r} items must be a list" + (f" of {n}" if n else ""))
        return items

    def _pairs(self, v: dict) -> list:
        items = self._items(v)
        if not all(type(p) is list and len(p) == 2 for p in items):
            raise self.fail("dict items must be [key, value] pairs")
        return items

    def owned(self, tag: str, index: int, name: str) -> Any:
        """A parameter or submodule of the server's model ``index``: the object itself, not a copy."""
        model = self.resolve_model(index)
        module = model._module
        try:
            if tag == "model_module":
                return module.get_submodule(name)
            param = module.get_parameter(name)
        except AttributeError:
            what = "submodule" if tag == "model_module" else "parameter"
            raise self.fail(f"the model has no {what} {name!r} here (the client's model has another shape?)") from None
        self.live.append(param)
        return param

    def function(self, module: str, name: str) -> Any:
        if not self.trusted and not is_allowed(module, name):
            raise WireError(f"restricted mode: the callable {module}.{name}{self.where} is not on the allow-list")
        if module.split(".")[0] not in ("torch", "operator", "_operator", "builtins", "einops", "math", "raysight") \
                and not self.trusted:  # fmt: skip
            raise WireError(f"restricted mode: module {module!r} is not allowed")
        try:
            fn = _resolve(module, name)
        except Exception:
            raise self.fail(
                f"the callable {module}.{name} does not exist here (module {module!r} cannot be imported where the "
                "graph runs, or lacks that name); ship your code to the cluster with Ray's runtime_env "
                "(working_dir / py_modules), or define the function in the script you run"
            ) from None
        if not callable(fn):
            raise self.fail(f"{module}.{name} is not callable")
        return fn

    def graph(self, wire: WireGraph, what: str) -> Graph:
        graph = Graph()
        self.nodes = graph.nodes
        count = len(wire.nodes)
        placed = [False] * count
        traces = []
        for index, wn in enumerate(wire.nodes):
            self.limit = index
            self.where = f" in {what}, node %{index}"
            try:
                op = Op(wn.op)
            except ValueError:
                raise self.fail(f"unknown op {wn.op!r}") from None
            if op is Op.TRACE:  # its inputs may be computed after it is recorded (hoisted in front of it)
                traces.append((index, wn))
                node = Node(index, op, None, (), {}, None, None)
                graph.nodes.append(node)
                continue
            target = self.value(wn.target)
            args = self.value(wn.args) if wn.args is not None else ()
            kwargs = self.value(wn.kwargs) if wn.kwargs is not None else {}
            if type(args) is not tuple or type(kwargs) is not dict:
                raise self.fail("args must be a tuple and kwargs a dict")
            if not self.trusted:
                _check_target(op, target, self)
            source = SourceLine(wn.source.file, wn.source.line, wn.source.function) if wn.source else None
            node = Node(index, op, target, args, kwargs, None, source)
            node.saved = wn.saved
            graph.nodes.append(node)
        self.limit = count
        for index, wn in traces:
            self.where = f" in {what}, node %{index}"
            node = graph.nodes[index]
            node.target = self.value(wn.target)
            if type(node.target).__name__ != "TraceSpec":
                raise self.fail("a trace node needs a trace target")
            node.kwargs = {}
            node.set_args(self.value(wn.args) if wn.args is not None else ())
            node.saved = wn.saved
            node.source = SourceLine(wn.source.file, wn.source.line, wn.source.function) if wn.source else None
        for index, wn in enumerate(wire.nodes):
            if wn.body is not None:
                graph.nodes[index].body = self._body(wn.body, count, placed, index)
        graph.body.extend(self._body(wire.body, count, placed, -1))
        if not all(placed):
            raise self.fail(f"node %{placed.index(False)} is in no body")
        for node in graph.nodes:
            if node.op is Op.STOP:
                mark_stop(node)
        return graph

    def _body(self, indices: list[int], count: int, placed: list[bool], owner: int) -> list[Node]:
        body = []
        for i in indices:
            if type(i) is not int or not 0 <= i < count:
                raise self.fail(f"a body lists node {i!r}, which does not exist")
            if placed[i] or i == owner:
                raise self.fail(f"node %{i} appears in more than one body (a cycle?)")
            placed[i] = True
            body.append(self.nodes[i])
        return body


def _check_target(op: Op, target: Any, dec: _Decoder) -> None:
    if op in (Op.GET_ATTR, Op.CALL_METHOD) and (not isinstance(target, str) or target.startswith(_RESTRICTED_ATTRS)):
        raise WireError(f"restricted mode: attribute {target!r}{dec.where} is not allowed")


def _hashable(key: Any, dec: _Decoder) -> Any:
    try:
        hash(key)
    except TypeError:
        raise dec.fail(f"a dict key of type {type(key).__name__} is not hashable") from None
    return key


_DTYPES = {"float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
           "complex64", "complex128"}  # fmt: skip


def _decode_tensor(v: dict, dec: _Decoder) -> torch.Tensor:
    dtype_name, shape = v["dtype"], v["shape"]
    if "frame" in v and dec.frames is not None:
        data = dec.frames[v["frame"]]  # a writable view of the reply: no copy
    else:
        data = v["data"]
    if dtype_name not in _DTYPES:
        raise dec.fail(f"unsupported tensor dtype {dtype_name!r}")
    if type(shape) is not list or not all(type(s) is int and s >= 0 for s in shape) or \
            type(data) not in (bytes, memoryview):  # fmt: skip
        raise dec.fail("a tensor needs an integer shape list and bytes")
    dtype = getattr(torch, dtype_name)
    raw = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.bool: torch.uint8}.get(dtype, dtype)
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=raw).element_size()
    if numel * itemsize != len(data):
        raise dec.fail(f"tensor bytes ({len(data)}) do not match shape {shape} of {dtype_name}")
    if numel == 0:
        t = torch.empty(shape, dtype=raw)
    else:
        # bytes are immutable: copy them into memory the tensor owns (it may be edited in place); a reply's
        # frames are already writable views of memory this side owns
        t = torch.frombuffer(data if type(data) is memoryview else bytearray(data), dtype=raw).reshape(shape)
    if raw is not dtype:
        t = t.view(dtype)
    if v.get("param"):
        t = torch.nn.Parameter(t.clone(), requires_grad=bool(v.get("grad")))
    elif v.get("grad"):
        t = t.clone().requires_grad_(True)
    grad = v.get("grad_value")
    if grad is not None:
        if type(grad) is not dict or grad.get("$") != "tensor":
            raise dec.fail("a tensor's grad_value must be a tensor")
        try:
            t.grad = _decode_tensor(grad, dec)
        except RuntimeError as exc:  # shape or dtype unlike the tensor's
            raise dec.fail(f"a tensor's grad_value does not fit it ({exc})") from None
    return t


def decode_request(payload: bytes, limits: Limits, trusted: bool, resolve_model: Any) -> Decoded:
    """Check and decode a request; ``resolve_model(i)`` gives the server's model for model index ``i``."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError(f"a request must be bytes, got {type(payload).__name__}")
    if len(payload) > limits.max_request_bytes:
        raise WireError(f"the request is {len(payload)} bytes, over the limit of {limits.max_request_bytes}; send "
                        "smaller inputs or raise Limits.max_request_bytes")  # fmt: skip
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False, max_bin_len=len(payload),
                              max_str_len=len(payload), max_array_len=len(payload), max_map_len=len(payload))  # fmt: skip
    except Exception as exc:
        raise WireError(f"the request is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise WireError("the request is not a map")
    version = raw.get("version")
    if version != SCHEMA_VERSION:
        raise WireError(f"the request has schema version {version!r}; this server speaks version {SCHEMA_VERSION}")
    try:
        wire = WireRequest.model_validate(raw)
    except ValidationError as exc:
        raise WireError(f"the request does not match the schema: {exc.errors()[0]['loc']}: "
                        f"{exc.errors()[0]['msg']}") from None  # fmt: skip
    if wire.method != "session":
        check_method(wire.method, trusted)
    if not -1 <= wire.model < len(wire.models):
        raise WireError(f"the request names model {wire.model}, but lists {len(wire.models)} models")
    dec = _Decoder(trusted, lambda i: _check_model(i, wire, resolve_model))
    edits = {}
    for i, m in enumerate(wire.models):
        edits[i] = [dec.graph(g, f"an edit of model {i}") for g in m.edits]
    graph = dec.graph(wire.graph, "the graph")
    dec.nodes, dec.limit, dec.where = graph.nodes, 0, " in the invokes"  # invokes may not reference nodes
    from raysight.backends.base import InvokeInputs

    invokes = [InvokeInputs(dec.value(i.args), dec.value(i.kwargs), i.batch_size) for i in wire.invokes]
    forward_kwargs = dec.value(wire.forward_kwargs)
    if not isinstance(forward_kwargs, dict):
        raise WireError("malformed request: forward_kwargs must be a dict")
    return Decoded(graph, invokes, forward_kwargs, wire.method, wire.model, wire.models, edits, dec.live)


def check_method(method: Any, trusted: bool) -> str:
    """The model method a trace runs: ``forward``, ``generate``, or (trusted mode only) another public method of the
    model that the client named with ``model.trace(x, method=...)``."""
    if method in ("forward", "generate"):
        return method
    if not isinstance(method, str) or not method.isidentifier() or method.startswith("_"):
        raise WireError(f"malformed request: {method!r} is not a method a trace can run")
    if not trusted:
        raise WireError(f"restricted mode: running the model's method {method!r} is refused; traces here may run "
                        "forward and generate only")  # fmt: skip
    return method


def _check_model(i: int, wire: WireRequest, resolve_model: Any) -> Any:
    if not 0 <= i < len(wire.models):
        raise WireError(f"malformed request: a trace names model {i}, but the request lists {len(wire.models)}")
    return resolve_model(i)


def decode_result(payload: Any) -> tuple[dict[int, Any], list[str]]:
    """Decode a reply; tensors are views of ``payload`` (a bytearray stays writable; bytes are copied once)."""
    buffer = memoryview(payload if isinstance(payload, bytearray) else bytearray(payload))
    try:
        length = int.from_bytes(buffer[:8], "little")
        raw = msgpack.unpackb(buffer[8 : 8 + length], raw=False, strict_map_key=False)
        frames_lengths = raw.pop("frames")
        result = WireResult.model_validate(raw)
    except Exception as exc:
        raise WireError(f"malformed reply ({type(exc).__name__}: {exc})") from None
    frames, offset = [], 8 + length
    for n in frames_lengths:
        frames.append(buffer[offset : offset + n])
        offset += n
    dec = _Decoder(trusted=True, resolve_model=None)
    dec.frames = frames
    return {int(i): dec.value(v) for i, v in result.saved.items()}, list(result.logs)
