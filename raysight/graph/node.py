"""Nodes of the intervention graph, in the style of torch.fx.

A node is one operation from a *closed* set (:class:`Op`) with a target, positional and keyword arguments. Arguments
are plain Python values in which other nodes appear directly (``Node`` objects inside tuples, lists, dicts and
slices); :meth:`Node.deps` lists those nodes once. Sub-graphs (the body of a condition or of an invoke) are lists
of nodes held in ``body``. A new feature is a new op plus one interpreter method, never a new node class.
"""

from __future__ import annotations

import enum
import itertools
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union


class Op(str, enum.Enum):
    """The closed set of operations. ``target`` means something different for each (see the comments)."""

    CALL_FUNCTION = "call_function"  # target: a callable; args/kwargs as given
    CALL_METHOD = "call_method"  # target: method name; args[0] is the object
    GET_ATTR = "get_attr"  # target: attribute name; args[0] is the object
    READ = "read"  # target: Location; the (narrowed) value a module received or returned
    WRITE = "write"  # target: Location; args[0] replaces the value at that location
    CALL_MODULE = "call_module"  # target: module path; args/kwargs go to the module; kwargs["hook"] fires hooks
    PARAM = "param"  # target: (module path, attribute); a copy of a parameter or buffer
    GRAD = "grad"  # args[0]: a tensor; the gradient reaching it in the next backward pass
    SET_GRAD = "set_grad"  # args[0]: a tensor, args[1]: the gradient that replaces its gradient
    COND = "cond"  # args[0]: predicate; body: nodes run only if it is true
    INVOKE = "invoke"  # target: invoke index; body: nodes that see that invoke's rows of the batch
    STOP = "stop"  # in a trace: ends the forward pass; in a session (target "session"): ends the innermost loop,
    # or the session outside loops
    LOG = "log"  # args: values printed when the graph runs
    TRACE = "trace"  # target: TraceSpec (model, invokes, forward kwargs); body: the trace's nodes (sessions)
    ITER = "iter"  # args[0]: a collection; body: run once per element, the node's value being the element


# The members as module-level names, for the hot loops of recording and running: attribute access on an Enum class
# goes through EnumType.__getattr__'s slot and costs ~4x a global lookup, and the interpreter tests every node's op.
CALL_FUNCTION = Op.CALL_FUNCTION
CALL_METHOD = Op.CALL_METHOD
GET_ATTR = Op.GET_ATTR
READ = Op.READ
WRITE = Op.WRITE
CALL_MODULE = Op.CALL_MODULE
PARAM = Op.PARAM
GRAD = Op.GRAD
SET_GRAD = Op.SET_GRAD
COND = Op.COND
INVOKE = Op.INVOKE
STOP = Op.STOP
LOG = Op.LOG
TRACE = Op.TRACE
ITER = Op.ITER


@dataclass(frozen=True)
class Calls:
    """Several calls of a module (``.all()``, ``.iter[...]``): the nodes that depend on such a read run once per
    selected call. ``items`` lists the calls; otherwise ``start``..``stop`` (``stop=None``: every later call).
    ``scope`` tells regions apart: reads recorded under one ``.all()``/``.iter`` share it."""

    start: int = 0
    stop: Optional[int] = None
    items: Optional[tuple] = None
    scope: int = 0

    def indices(self) -> Iterator[int]:
        if self.items is not None:
            return iter(self.items)
        if self.stop is None:
            return itertools.count(self.start)
        return iter(range(self.start, self.stop))

    def __str__(self) -> str:
        if self.items is not None:
            return f"calls {list(self.items)}"
        return f"calls {self.start}..{'' if self.stop is None else self.stop - 1}"


class Location(NamedTuple):
    """A place in a model a graph can read or write: a module path, which value, and which call(s) of the module.
    (A named tuple: immutable, hashable and cheap to create on the hot path of recording.)"""

    path: str  # dotted module path; "" is the root module
    key: str  # "output", "input" (first argument), "inputs" ((args, kwargs)) or "skip" (WRITE: replaces the call)
    call: Union[int, Calls] = 0  # which call of the module in this run (0 = the first)

    @property
    def is_input(self) -> bool:
        return self.key != "output"

    def describe(self, root_name: str = "model") -> str:
        where = f"{root_name}.{self.path}" if self.path else root_name
        suffix = f" ({self.call})" if isinstance(self.call, Calls) else f" (call {self.call})" if self.call else ""
        return f"{where}.{self.key}{suffix}"

    def __str__(self) -> str:
        return self.describe()


class SourceLine(NamedTuple):
    """Where the user's code created a node (a named tuple: made on every recorded node, so it must be cheap)."""

    filename: str
    lineno: int
    function: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno} in {self.function}"

    def text(self) -> str:
        import linecache

        return linecache.getline(self.filename, self.lineno).strip()


def _library_dirs(names: tuple) -> tuple:
    """The package directories of libraries that apply operations to proxies on the user's behalf, found without
    importing them: torch's Python wrappers (``F.softmax``, Tensor methods written in Python, ``Module.__call__`` of
    a module applied to a proxy) dispatch to ``__torch_function__`` from frames of their own, and einops computes
    with the proxy's shape inside its functions; the line that matters is the one that called them."""
    import importlib.util

    dirs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            dirs.append(os.path.dirname(os.path.abspath(spec.origin)) + os.sep)
    return tuple(dirs)


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Frames in these files record on the user's behalf; the first frame outside them is the user's line.
_INTERNAL = tuple(
    os.path.join(_PACKAGE_DIR, part)
    for part in ("graph" + os.sep, "tracing" + os.sep, "runtime" + os.sep, "models" + os.sep, "backends" + os.sep,
                 "envoy.py", "__init__.py")
) + (os.path.join(os.path.dirname(os.__file__), "contextlib.py"),) + _library_dirs(("torch", "einops"))


_internal_files: dict[str, bool] = {}  # by file name: a str caches its hash, a code object does not
_new_tuple = tuple.__new__  # builds a named tuple without its Python-level __new__ (recording's hot path)


def user_source(skip: int = 2) -> Optional[tuple]:
    """The first frame outside raysight (and contextlib): the user's line that is being recorded, as the plain
    ``(code, instruction offset)`` pair a node keeps; ``Node.source`` turns it into a :class:`SourceLine` when someone
    asks (rarely). A frame's ``f_lineno`` scans the code's line table on every read, so it is not read here."""
    frame = sys._getframe(skip)
    known = _internal_files
    while frame is not None:
        code = frame.f_code
        filename = code.co_filename
        internal = known.get(filename)
        if internal is None:
            internal = known[filename] = filename.startswith(_INTERNAL)
        if not internal:
            return (code, frame.f_lasti)  # type: ignore[return-value]
        frame = frame.f_back
    return None


def _source_line(where: tuple) -> SourceLine:
    """The SourceLine of a ``(code, instruction offset)`` pair from :func:`user_source`."""
    code, offset = where
    lineno = code.co_firstlineno
    for start, end, line in code.co_lines():
        if start <= offset < end:
            if line is not None:
                lineno = line
            break
    return _new_tuple(SourceLine, (code.co_filename, lineno, code.co_name))


_NO_KWARGS: dict = {}
_new_object = object.__new__


class Node:
    """One operation in the graph. ``index`` is unique within the root graph and orders nodes as recorded."""

    # What most nodes share lives on the class, so making a node (the hot path of recording) sets only what
    # differs: an instance-dict class with class defaults is made faster here than a __slots__ one.
    args: tuple = ()
    kwargs: dict = _NO_KWARGS  # shared: nothing mutates a node's kwargs
    deps: tuple = ()  # the distinct nodes among the arguments
    flat = True  # every node in the arguments is a direct argument: loading them is a plain lookup, not a walk
    body: Optional[list] = None
    saved = False
    num_users = 0
    event_key: Optional[tuple] = None  # READ/WRITE: (module path, is_input), the events it uses (set when run)
    stops = False  # READ: an `envoy.output.stop()` later reads the same location again (see mark_stop)
    _where: Optional[tuple] = None  # the source line: a SourceLine, or the (code, offset) pair of user_source

    def __init__(
        self,
        index: int,
        op: Op,
        target: Any,
        args: tuple = (),
        kwargs: Optional[dict] = None,
        body: Optional[list] = None,
        source: Optional[SourceLine] = None,
    ) -> None:
        self.index = index
        self.op = op
        self.target = target
        self._where = source
        if body is not None:
            self.body = body
        if args or kwargs:
            self.args = args
            if kwargs is not None:
                self.kwargs = kwargs
            deps, flat = _scan_args(args, kwargs or _NO_KWARGS)
            if deps:
                self.deps = deps
                for dep in deps:
                    dep.num_users += 1
            if not flat:
                self.flat = False

    @classmethod
    def leaf(cls, index: int, op: Op, target: Any, source: Optional[SourceLine]) -> "Node":
        """A node without arguments or body (a READ, say), made without ``__init__``'s argument handling."""
        node = _new_object(cls)
        node.index = index
        node.op = op
        node.target = target
        node._where = source
        return node

    @classmethod
    def computed(cls, index: int, op: Op, target: Any, args: tuple, deps: tuple, source: Optional[tuple]) -> "Node":
        """A node whose arguments hold nodes only directly, with ``deps`` (the distinct ones) already collected:
        what ``__init__`` does for such arguments, without scanning them again (recording's hot path)."""
        node = _new_object(cls)
        node.index = index
        node.op = op
        node.target = target
        node._where = source
        node.args = args
        if deps:
            node.deps = deps
            for dep in deps:
                dep.num_users += 1
        return node

    @property
    def source(self) -> Optional[SourceLine]:
        """Where the user's code created this node."""
        where = self._where
        if where is None or type(where) is SourceLine:
            return where
        source = self._where = _source_line(where)
        return source

    @source.setter
    def source(self, value: Optional[SourceLine]) -> None:
        self._where = value

    def set_args(self, args: tuple) -> None:
        """Give a node (a TRACE node, once its trace is recorded) the arguments it depends on."""
        self.args = args
        self.deps = _collect_nodes(args, self.kwargs)
        self.flat = False
        for dep in self.deps:
            dep.num_users += 1

    @property
    def name(self) -> str:
        return f"%{self.index}"

    def describe_target(self) -> str:
        target = self.target
        if self.op is Op.CALL_FUNCTION:
            return _callable_name(target)
        if self.op is Op.CALL_MODULE:
            return f"model.{target}" if target else "model"
        if self.op is Op.PARAM:
            path, attr = target
            return f"model.{path}.{attr}" if path else f"model.{attr}"
        return str(target) if target is not None else ""

    def format(self) -> str:
        args = ", ".join(_format_arg(a) for a in self.args)
        kwargs = ", ".join(f"{k}={_format_arg(v)}" for k, v in self.kwargs.items())
        call = ", ".join(x for x in (args, kwargs) if x)
        saved = " [saved]" if self.saved else ""
        return f"{self.name} = {self.op.value}[{self.describe_target()}]({call}){saved}"

    def __repr__(self) -> str:
        return self.format()


def _callable_name(fn: Callable) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    if module in (None, "builtins"):
        return name
    if module == "_operator":
        module = "operator"
    return f"{module}.{name}"


def _format_arg(a: Any) -> str:
    if isinstance(a, Node):
        return a.name
    if isinstance(a, tuple):
        inner = ", ".join(_format_arg(x) for x in a)
        return f"({inner},)" if len(a) == 1 else f"({inner})"
    if isinstance(a, list):
        return "[" + ", ".join(_format_arg(x) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_format_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, slice):
        parts = [_format_arg(x) if x is not None else "" for x in (a.start, a.stop, a.step)]
        return ":".join(parts[:2] if a.step is None else parts)
    if type(a).__name__ == "Tensor":
        return f"tensor(shape={tuple(a.shape)}, dtype={a.dtype})"
    text = repr(a)
    return text if len(text) < 60 else text[:57] + "..."


_LEAVES = frozenset({int, float, str, bool, type(None), type(Ellipsis)})


def plain_index(a: Any, t: type) -> bool:
    """Whether ``a`` (of type ``t``) is a slice of plain Python values, or a tuple of those and plain values (an
    index such as ``[:, 0]`` or ``[..., -1]``): an argument that holds no node."""
    if t is slice:
        return type(a.start) in _LEAVES and type(a.stop) in _LEAVES and type(a.step) in _LEAVES
    if t is tuple:
        for x in a:
            tx = type(x)
            if tx not in _LEAVES and (tx is not slice or not plain_index(x, tx)):
                return False
        return True
    return False


def _scan_args(args: tuple, kwargs: dict) -> tuple[tuple, bool]:
    """The distinct nodes in the arguments, and whether all of them are direct arguments."""
    deps: list[Node] = []
    for a in (*args, *kwargs.values()) if kwargs else args:
        t = type(a)
        if t is Node:
            if a not in deps:
                deps.append(a)
        elif t is slice:
            if plain_index(a, t):
                continue
            return _collect_nodes(args, kwargs), False
        elif t not in _LEAVES and (t in (tuple, list, dict) or isinstance(a, (tuple, list, dict))):
            return _collect_nodes(args, kwargs), _direct_only(args, kwargs)
    return tuple(deps), True


def _direct_only(args: tuple, kwargs: dict) -> bool:
    for a in (*args, *kwargs.values()):
        if type(a) is not Node and _collect_nodes((a,), {}):
            return False
    return True


def _collect_nodes(args: tuple, kwargs: dict) -> tuple:
    found: dict[int, Node] = {}
    for a in args:
        _visit(a, found)
    for a in kwargs.values():
        _visit(a, found)
    return tuple(found.values())


def _visit(a: Any, found: dict) -> None:
    """Add the nodes inside ``a`` to ``found`` (a module-level function: a nested recursive one is a cycle)."""
    if isinstance(a, Node):
        found.setdefault(a.index, a)
    elif isinstance(a, (tuple, list)):
        for x in a:
            _visit(x, found)
    elif isinstance(a, dict):
        for x in a.values():
            _visit(x, found)
    elif isinstance(a, slice):
        _visit(a.start, found)
        _visit(a.stop, found)
        _visit(a.step, found)


def any_leaf(value: Any, test: Callable[[Any], bool]) -> bool:
    """Whether ``test`` holds for ``value`` or for anything inside its lists, tuples and dict values."""
    if test(value):
        return True
    if isinstance(value, (list, tuple)):
        return any(any_leaf(v, test) for v in value)
    if isinstance(value, dict):
        return any(any_leaf(v, test) for v in value.values())
    return False


def map_nodes(a: Any, fn: Callable[[Node], Any]) -> Any:
    """Rebuild ``a`` with every node in it replaced by ``fn(node)`` (tuples, lists, dicts and slices are walked)."""
    if isinstance(a, Node):
        return fn(a)
    if isinstance(a, tuple):
        items = [map_nodes(x, fn) for x in a]
        if type(a) is tuple:
            return tuple(items)
        if hasattr(type(a), "_fields"):  # named tuple
            return type(a)(*items)
        return type(a)(items)  # torch.Size and other tuple subclasses
    if isinstance(a, list):
        return [map_nodes(x, fn) for x in a]
    if isinstance(a, dict):
        return {k: map_nodes(v, fn) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(map_nodes(a.start, fn), map_nodes(a.stop, fn), map_nodes(a.step, fn))
    return a


def mark_stop(stop: Node) -> None:
    """``envoy.output.stop()`` on a location the invoke read before (a READ that takes the earlier READ as its
    argument): mark the reads of that chain, so the pass stops when that module fires, whatever the stream waits
    for next (nnsight 0.4 stopped there; the runtime sees ``Node.stops``). Recording and decoding both call it."""
    node = stop.args[0] if stop.args else None
    if type(node) is not Node or node.op is not Op.READ or not node.args:
        return
    while type(node) is Node and node.op is Op.READ:
        node.stops = True
        node = node.args[0] if node.args else None
