"""The wire format: a request (graph, invokes, edits, models) as a versioned, validated, compact payload.

Layout (documented in ``docs/wire-format.md``): a msgpack map validated by the pydantic models below. Values inside
nodes are *value trees*: msgpack scalars, or maps tagged by ``"$"`` (``node``, ``tensor``, ``tuple``, ``list``,
``dict``, ``slice``, ``fn``, ``pickle``, ...). Tensors are raw bytes with dtype and shape, never nested lists, and
decode without a copy (``torch.frombuffer``). Callables travel by qualified name; in *trusted* mode anything else
travels by value (cloudpickle); in *restricted* mode only the allow-list (torch, tensor methods, operators, einops,
raysight builtins) may appear, and everything else is refused before anything runs, naming the callable and the
user's line that created it. Decoding checks every reference: a node may only use nodes recorded before it, each
node sits in exactly one body, targets and ops are from the closed set. Any defect is a :class:`WireError`.
"""

from __future__ import annotations

import builtins
import importlib
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import msgpack
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from raysight.errors import RaysightError
from raysight.graph.graph import Graph
from raysight.graph.node import Calls, Location, Node, Op, SourceLine

SCHEMA_VERSION = 1


class WireError(RaysightError, ValueError):
    """A payload that cannot be accepted: malformed, too large, of another version, or not allowed."""


@dataclass
class Limits:
    """What a server accepts: request size, saved bytes per run, and wall time per run."""

    max_request_bytes: int = 256 * 1024**2
    max_saved_bytes: int = 4 * 1024**3
    max_seconds: Optional[float] = None

    def __post_init__(self) -> None:
        if self.max_request_bytes <= 0 or self.max_saved_bytes <= 0:
            raise ValueError("Limits: sizes must be positive byte counts")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("Limits: max_seconds must be positive (or None for no limit)")


# -- the schema ------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WireSource(_Strict):
    file: str
    line: int
    function: str


class WireNode(_Strict):
    op: str
    target: Any = None
    args: Any = None
    kwargs: Any = None
    body: Optional[list[int]] = None
    saved: bool = False
    source: Optional[WireSource] = None


class WireGraph(_Strict):
    nodes: list[WireNode]
    body: list[int]


class WireInvoke(_Strict):
    args: Any
    kwargs: Any
    batch_size: int


class WireModel(_Strict):
    """A model the request runs on, by the id the server knows it under, with the client's persistent edits."""

    id: str
    edits: list[WireGraph] = []


class WireRequest(_Strict):
    version: int
    method: str
    graph: WireGraph
    invokes: list[WireInvoke]
    forward_kwargs: Any
    model: int  # index into models (-1: a session, whose traces name their models)
    models: list[WireModel]


class WireResult(_Strict):
    version: int
    saved: dict[int, Any]
    logs: list[str] = []


# -- callables ----------------------------------------------------------------------------------------------
_ALLOWED_MODULES = ("torch", "operator", "_operator", "einops", "math", "raysight.tracing.control",
                    "raysight.graph.proxy")  # fmt: skip
_ALLOWED_BUILTINS = {"list", "dict", "tuple", "set", "int", "float", "str", "bool", "bytes", "bytearray", "complex",
                     "len", "sum", "min", "max", "abs", "range", "getattr", "setattr", "round", "sorted", "zip",
                     "enumerate", "isinstance"}  # fmt: skip
_RESTRICTED_ATTRS = ("_", "__")  # attribute and method names starting with these are refused in restricted mode


_KNOWN: dict[int, tuple[str, str]] = {}


def _known_callables() -> dict[int, tuple[str, str]]:
    """id -> (module, name) for the public callables of torch and friends, whose own ``__module__``/``__qualname__``
    often do not import back (``torch.softmax`` is ``_VariableFunctionsClass.softmax``)."""
    if not _KNOWN:
        import math

        import torch.nn.functional as functional

        spaces = [("torch", torch), ("torch.nn.functional", functional), ("torch.linalg", torch.linalg),
                  ("torch.special", torch.special), ("torch.fft", torch.fft), ("operator", operator),
                  ("math", math), ("builtins", builtins)]  # fmt: skip
        try:
            import einops

            spaces.append(("einops", einops))
        except ImportError:
            pass
        for module, namespace in spaces:
            for name, value in vars(namespace).items():
                if callable(value) and not name.startswith("__"):
                    _KNOWN.setdefault(id(value), (module, name))
        for name in dir(torch.Tensor):
            value = getattr(torch.Tensor, name, None)
            if callable(value):
                _KNOWN.setdefault(id(value), ("torch", f"Tensor.{name}"))
    return _KNOWN


def callable_name(fn: Any) -> Optional[tuple[str, str]]:
    """(module, qualified name) that import back to ``fn`` itself, or None."""
    known = _known_callables().get(id(fn))
    if known is not None and _resolve(*known) is fn:
        return known
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if module is None and isinstance(fn, type(torch.Tensor.add)):  # method descriptors of torch._C.TensorBase
        module, qualname = "torch", f"Tensor.{fn.__name__}"
    if not module or not qualname or "<" in qualname:
        return None
    try:
        if _resolve(module, qualname) is fn:
            return module, qualname
    except Exception:
        pass
    objclass = getattr(fn, "__objclass__", None)  # e.g. torch._C.TensorBase.add reached through torch.Tensor
    if objclass is not None and getattr(torch.Tensor, fn.__name__, None) is fn:
        return "torch", f"Tensor.{fn.__name__}"
    return None


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def is_allowed(module: str, qualname: str) -> bool:
    if module == "builtins":
        return qualname in _ALLOWED_BUILTINS
    return module == "torch" or module.startswith(tuple(m + "." for m in _ALLOWED_MODULES)) or module in _ALLOWED_MODULES


# -- encoding -----------------------------------------------------------------------------------------------
class _Encoder:
    def __init__(self, trusted: bool, models: list[Any], frames: Optional[list] = None) -> None:
        self.trusted = trusted
        self.models = models  # model objects, in the order of WireRequest.models
        self.node: Optional[Node] = None
        self.frames = frames  # when set, tensor bytes go out of band (see encode_result)

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
        if isinstance(v, torch.Tensor):
            return _encode_tensor(v, self.frames)
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
            if name is not None and (self.trusted or is_allowed(*name)):
                return {"$": "fn", "module": name[0], "name": name[1]}
            return self.by_value(v, f"the callable {getattr(v, '__qualname__', repr(v))}")
        return self.by_value(v, f"a {t.__name__} value")

    def by_value(self, v: Any, what: str) -> Any:
        if not self.trusted:
            raise WireError(f"restricted mode: {what} is not on the allow-list{_where(self.node)}; only torch "
                            "functions, tensor methods, operators, einops and raysight builtins may be sent")
        import cloudpickle

        return {"$": "pickle", "data": cloudpickle.dumps(v)}

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
    if isinstance(t, torch.nn.Parameter):
        out["param"] = True
    return out


def encode_request(request: Any, models: list[Any], trusted: bool = True, model: Any = None) -> bytes:
    """Encode a :class:`~raysight.backends.base.Request` (``model`` is the traced model, None for a session)."""
    enc = _Encoder(trusted, models)
    model_index = enc.model_ref(model) if model is not None else -1
    graph = enc.graph(request.graph)
    enc.node = None
    invokes = [WireInvoke(**enc.invoke(inv)) for inv in request.invokes]
    forward = enc.value(request.forward_kwargs)
    wire_models = [WireModel(id=str(i), edits=[enc.graph(g) for g in getattr(m, "_edits", [])])
                   for i, m in enumerate(enc.models)]  # fmt: skip
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


# -- decoding -----------------------------------------------------------------------------------------------
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


class _Decoder:
    def __init__(self, trusted: bool, resolve_model: Any) -> None:
        self.trusted = trusted
        self.resolve_model = resolve_model
        self.nodes: list[Node] = []
        self.limit = 0  # nodes a value may reference: those recorded before the current one
        self.where = ""
        self.frames: Optional[list] = None  # a reply's out-of-band tensor bytes

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
                return _decode_tensor(v, self)
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
                if v["key"] not in ("output", "input", "inputs") or not isinstance(v["path"], str):
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
                return TraceSpec(model, invokes, self.value(v["forward_kwargs"], d), str(v["method"]))
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

    def function(self, module: str, name: str) -> Any:
        if not self.trusted and not is_allowed(module, name):
            raise WireError(f"restricted mode: the callable {module}.{name}{self.where} is not on the allow-list")
        if module.split(".")[0] not in ("torch", "operator", "_operator", "builtins", "einops", "math", "raysight") \
                and not self.trusted:  # fmt: skip
            raise WireError(f"restricted mode: module {module!r} is not allowed")
        try:
            fn = _resolve(module, name)
        except Exception:
            raise self.fail(f"the callable {module}.{name} does not exist here") from None
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
        return torch.nn.Parameter(t.clone(), requires_grad=bool(v.get("grad")))
    if v.get("grad"):
        t = t.clone().requires_grad_(True)
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
    if wire.method not in ("forward", "generate", "session"):
        raise WireError(f"unknown method {wire.method!r}")
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
    return Decoded(graph, invokes, forward_kwargs, wire.method, wire.model, wire.models, edits)


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

