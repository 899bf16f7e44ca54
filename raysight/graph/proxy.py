"""Proxy: a stand-in for a value that will exist when the graph runs.

While a recorder (a tracer or session) is active, every operation on a proxy records a node through it and returns
a new proxy. Once the graph has run, a saved proxy holds its value and behaves as that value: operators, indexing,
``print``, ``len``, iteration and torch functions act on the real value. ``if proxy:``, ``for x in proxy:`` and
``len(proxy)`` cannot be recorded and raise :class:`~raysight.errors.TraceError` with a hint while recording.
"""

from __future__ import annotations

import math
import operator
from contextvars import ContextVar
from typing import Any, Optional, Protocol

from raysight.errors import TraceError
from raysight.graph.node import CALL_FUNCTION, CALL_METHOD, GET_ATTR, GRAD, SET_GRAD, STOP, Node, Op, mark_stop


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


class Recorder(Protocol):
    """What a proxy needs from the object that records it (implemented by the tracer)."""

    graph: Any
    recording: bool
    hook_calls: bool  # calls of attached modules record as ``hook=True`` (inside model.edit())

    def record(self, op: Op, target: Any, args: tuple = (), kwargs: Optional[dict] = None) -> "Proxy": ...

    def record_call(self, fn: Any, args: tuple, op: Op = ..., depth: int = ...) -> "Proxy": ...

    def mark_saved(self, proxy: "Proxy") -> None: ...


_CURRENT: ContextVar[Optional[Recorder]] = ContextVar("raysight_current_recorder", default=None)


def current_recorder() -> Optional[Recorder]:
    """The tracer or session now recording in this context, if any."""
    return _CURRENT.get()


def _recording() -> Optional[Recorder]:
    rec = _CURRENT.get()
    return rec if rec is not None and rec.recording else None


def value_of(a: Any) -> Any:
    """``a`` with every proxy inside it replaced by its value (raises if one was never produced)."""
    if isinstance(a, Proxy):
        return a.value
    if isinstance(a, (list, tuple)):
        if not any(isinstance(x, (Proxy, list, tuple, dict)) for x in a):
            return a
        items = [value_of(x) for x in a]
        if type(a) is list or type(a) is tuple:
            return type(a)(items)
        return type(a)(*items) if hasattr(type(a), "_fields") else type(a)(items)
    if isinstance(a, dict):
        return {k: value_of(v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(value_of(a.start), value_of(a.stop), value_of(a.step))
    return a


class Proxy:
    """A recorded value. Use it as you would the value; call :meth:`save` to keep it after the run."""

    __slots__ = ("_node", "_recorder", "_value", "__weakref__")

    def __init__(self, node: Node, recorder: Recorder) -> None:
        # Slots are set through their descriptors: __setattr__ records, and object.__setattr__ costs twice as much.
        _set_node(self, node)
        _set_recorder(self, recorder)
        _set_value(self, UNSET)

    # -- identity -------------------------------------------------------------------------------------------
    @property
    def node(self) -> Node:
        return self._node

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: PLE0307 - deliberate, see below
        """After the run a saved proxy answers ``isinstance`` for its value (``isinstance(p, torch.Tensor)``), so
        libraries that branch on the type (a tokenizer's ``decode``, say) treat it as the value. ``type(p)`` is
        still Proxy, and torch dispatches on the real type, so nothing mistakes it for a tensor's memory."""
        value = self._value
        return type(self) if value is UNSET else type(value)

    @property
    def resolved(self) -> bool:
        """True once the graph has run and produced a (saved) value for this proxy."""
        return self._value is not UNSET

    @property
    def value(self) -> Any:
        value = self._value
        if value is UNSET:
            raise ValueError("Accessing value before it's been set. " + self._unset_hint())
        return value

    def _unset_hint(self) -> str:
        node = self.node
        where = f" (created at {node.source})" if node.source else ""
        if self._recorder.recording:
            return (
                f"{node.name}{where} gets its value when the graph runs, at the end of the `with` block; "
                "inside the block, keep using the proxy itself."
            )
        if not node.saved:
            return f"{node.name}{where} was not saved: call .save() on it inside the trace to keep its value."
        return (
            f"{node.name}{where} was never produced: its condition was false, the run stopped early, "
            "or the module it reads was never reached."
        )

    def save(self) -> "Proxy":
        """Keep this value after the run (chainable: ``x = model.layer.output.save()``)."""
        rec = self._recorder
        if not rec.recording:  # a trace of a session that has closed: the session records now
            current = _recording()
            if current is None or current.graph is not rec.graph:
                raise TraceError(".save() must be called inside the `with` block that created the proxy.")
            rec = current
        rec.mark_saved(self)
        return self

    def stop(self) -> None:
        """End the forward pass as soon as this value has been computed."""
        rec = _require_recording("stop()")
        mark_stop(rec.record(STOP, None, (self,)).node)

    # -- recording or acting on the value --------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__") or name.startswith(("_repr_", "_ipython")):
            raise AttributeError(name)
        rec = _recording()
        if rec is None:
            return getattr(self.value, name)
        if name == "grad":
            return rec.record(GRAD, None, (self,))
        if name in _CONCRETE:
            meta = _meta(rec, self)
            if meta is not None:
                return _concrete(meta, name)
        return _AttrProxy(self, name, rec)

    def __setattr__(self, name: str, value: Any) -> None:
        rec = _recording()
        if rec is None:
            setattr(self.value, name, value_of(value))
        elif name == "grad":
            rec.record(SET_GRAD, None, (self, value))
        else:
            rec.record(CALL_FUNCTION, setattr, (self, name, value))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rec = _recording()
        if rec is None:
            return self.value(*value_of(args), **value_of(kwargs))
        return rec.record(CALL_FUNCTION, _call, (self, *args), kwargs)

    def __getitem__(self, key: Any) -> Any:
        return _apply(operator.getitem, self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        _apply(operator.setitem, self, key, value)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        rec = _recording()
        if rec is None:
            return func(*value_of(args), **value_of(kwargs))
        if not kwargs:
            return rec.record_call(func, args, CALL_FUNCTION, 2)
        return rec.record(CALL_FUNCTION, func, args, kwargs)

    # -- what cannot be recorded ----------------------------------------------------------------------------
    def __bool__(self) -> bool:
        if _recording() is None:
            return bool(self.value)
        raise TraceError(
            f"`if` on a proxy ({self._describe()}) cannot be decided while tracing, because its value does not "
            "exist yet. Use `with tracer.cond(proxy):` (or `session.cond`) to run code conditionally when the "
            "graph runs; for a multi-element tensor reduce it first, e.g. `tracer.cond(torch.all(x > 0))`."
        )

    def __iter__(self) -> Any:
        rec = _recording()
        if rec is None:
            return iter(self.value)
        meta = _meta(rec, self)
        if meta is not None:
            return iter([self[i] for i in range(len(meta))])
        raise TraceError(
            f"Iterating over a proxy ({self._describe()}) cannot be recorded: its length is unknown while tracing. "
            "Index it (`proxy[0]`, `proxy[1]`), or loop with `with session.iter(proxy) as item:`."
        )

    def __len__(self) -> int:
        rec = _recording()
        if rec is None:
            return len(self.value)
        meta = _meta(rec, self)
        if meta is not None:
            return len(meta)
        raise TraceError(
            f"len() of a proxy ({self._describe()}) is unknown while tracing. Use `proxy.shape[0]` for a tensor, "
            "or `raysight.apply(len, proxy)` to compute it when the graph runs."
        )

    def __contains__(self, item: Any) -> bool:
        if _recording() is None:
            return item in self.value
        raise TraceError(
            "`x in proxy` cannot be decided while tracing; use `raysight.apply(operator.contains, proxy, x)`."
        )

    def __index__(self) -> int:
        if _recording() is None:
            return operator.index(self.value)
        raise TraceError(
            f"A proxy ({self._describe()}) cannot be used as a plain Python index while tracing; index a proxy or "
            "a tensor with it instead, or use `raysight.apply(...)`."
        )

    def __int__(self) -> int:
        if _recording() is None:
            return int(self.value)
        raise TraceError("int(proxy) is unknown while tracing; use `raysight.int(proxy)` to record the conversion.")

    def __float__(self) -> float:
        if _recording() is None:
            return float(self.value)
        raise TraceError(
            "float(proxy) is unknown while tracing; use `raysight.float(proxy)` to record the conversion."
        )

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        if _recording() is None:
            import numpy
            import torch

            value = self.value
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu()
            return numpy.asarray(value, dtype=dtype)
        raise TraceError("A proxy cannot become a numpy array while tracing; convert it after the run.")

    def __round__(self, ndigits: Optional[int] = None) -> Any:
        return _apply(round, self) if ndigits is None else _apply(round, self, ndigits)

    def __trunc__(self) -> Any:
        return _apply(math.trunc, self)

    def __floor__(self) -> Any:
        return _apply(math.floor, self)

    def __ceil__(self) -> Any:
        return _apply(math.ceil, self)

    def __hash__(self) -> int:
        return id(self)

    def __format__(self, spec: str) -> str:
        if self._value is not UNSET or not self._recorder.recording:
            return format(self.value, spec)  # (after the run, a value never set raises the ValueError)
        return format(repr(self), spec)

    def __str__(self) -> str:
        """After its trace: the value's text (``print(hidden)``), or the "never set" ``ValueError`` (not saved,
        stopped early, a branch not taken), as in nnsight 0.4. While recording: a description of the node."""
        if self._value is not UNSET or not self._recorder.recording:
            return str(self.value)
        return repr(self)

    def __repr__(self) -> str:
        if self._value is not UNSET:
            return repr(self._value)
        return f"<Proxy {self._describe()}>"

    def _describe(self) -> str:
        node = self.node
        return f"{node.name} {node.op.value}[{node.describe_target()}]"

    def __reduce_ex__(self, protocol: Any) -> Any:
        value = self._value
        if value is not UNSET:  # after the run a saved proxy pickles (torch.save, deepcopy) exactly as its value
            return value.__reduce_ex__(protocol)
        raise TraceError("A proxy cannot be pickled or copied before it has a value: save it, and pickle it (or its "
                         "`.value`) after the run.")  # fmt: skip


_set_node = Proxy._node.__set__  # type: ignore[attr-defined]
_set_recorder = Proxy._recorder.__set__  # type: ignore[attr-defined]
_set_value = Proxy._value.__set__  # type: ignore[attr-defined]


_new_object = object.__new__


def new_proxy(node: Node, recorder: Recorder) -> Proxy:
    """``Proxy(node, recorder)`` without the type call and ``__init__`` frame (recording's hot path)."""
    proxy = _new_object(Proxy)
    _set_node(proxy, node)
    _set_recorder(proxy, recorder)
    _set_value(proxy, UNSET)
    return proxy


def set_value(proxy: Proxy, value: Any) -> None:
    """Give a proxy the value its node produced (after the run)."""
    _set_value(proxy, value)


class _AttrProxy(Proxy):
    """``proxy.name``: becomes a GET_ATTR node only if used as a value, a CALL_METHOD node if called."""

    __slots__ = ("_obj", "_attr")

    def __init__(self, obj: Proxy, attr: str, recorder: Recorder) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_attr", attr)
        _set_node(self, None)
        _set_recorder(self, recorder)
        _set_value(self, UNSET)

    @property
    def node(self) -> Node:
        node = self._node
        if node is None:
            node = self._recorder.record(GET_ATTR, self._attr, (self._obj,)).node
            _set_node(self, node)
        return node

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rec = _recording()
        if rec is None:
            return getattr(self._obj.value, self._attr)(*value_of(args), **value_of(kwargs))
        if self._node is not None:  # the attribute was used as a value already: call that value
            return rec.record(CALL_FUNCTION, _call, (self, *args), kwargs)
        if not kwargs:
            return rec.record_call(self._attr, (self._obj, *args), CALL_METHOD, 2)
        return rec.record(CALL_METHOD, self._attr, (self._obj, *args), kwargs)


_CONCRETE = frozenset({"shape", "dtype", "device", "ndim"})


def _meta(rec: Recorder, proxy: Proxy) -> Any:
    """The fake value of ``proxy`` when its trace scans (``scan=True``), else None."""
    meta_of = getattr(rec, "meta_of", None)
    return meta_of(proxy) if meta_of is not None else None


def _concrete(meta: Any, name: str) -> Any:
    if isinstance(meta, (list, tuple)):
        return type(meta)(_concrete(m, name) for m in meta) if type(meta) in (list, tuple) else tuple(
            _concrete(m, name) for m in meta
        )
    if isinstance(meta, dict):
        return {k: _concrete(v, name) for k, v in meta.items()}
    return getattr(meta, name, None)


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def _require_recording(what: str) -> Recorder:
    rec = _recording()
    if rec is None:
        raise TraceError(f"{what} can only be used inside a `with model.trace(...)` or `model.session()` block.")
    return rec


def _apply(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` for a proxy's operator: recorded while recording, else on the values (its caller is the
    operator, whose caller is the user's line: see ``Tracer.record_call``)."""
    rec = _recording()
    if rec is None:
        return fn(*value_of(args))
    return rec.record_call(fn, args)


def _binary(fn: Any) -> Any:
    def method(self: Proxy, other: Any) -> Any:
        return _apply(fn, self, other)

    return method


def _reflected(fn: Any) -> Any:
    def method(self: Proxy, other: Any) -> Any:
        return _apply(fn, other, self)

    return method


def _unary(fn: Any) -> Any:
    def method(self: Proxy) -> Any:
        return _apply(fn, self)

    return method


_BINARY = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow, "matmul": operator.matmul,
    "and": operator.and_, "or": operator.or_, "xor": operator.xor, "lshift": operator.lshift,
    "rshift": operator.rshift,
}  # fmt: skip
_INPLACE = {
    "iadd": operator.iadd, "isub": operator.isub, "imul": operator.imul, "itruediv": operator.itruediv,
    "ifloordiv": operator.ifloordiv, "imod": operator.imod, "ipow": operator.ipow, "imatmul": operator.imatmul,
    "iand": operator.iand, "ior": operator.ior, "ixor": operator.ixor,
}  # fmt: skip
_COMPARE = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
            "ge": operator.ge}  # fmt: skip
_UNARY = {"neg": operator.neg, "pos": operator.pos, "invert": operator.invert, "abs": operator.abs}

for _name, _fn in _BINARY.items():
    setattr(Proxy, f"__{_name}__", _binary(_fn))
    setattr(Proxy, f"__r{_name}__", _reflected(_fn))
for _name, _fn in {**_INPLACE, **_COMPARE}.items():
    setattr(Proxy, f"__{_name}__", _binary(_fn))
for _name, _fn in _UNARY.items():
    setattr(Proxy, f"__{_name}__", _unary(_fn))
Proxy.__hash__ = lambda self: id(self)  # __eq__ above would otherwise unset it
