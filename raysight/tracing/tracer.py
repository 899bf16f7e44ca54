"""Tracer (``model.trace``) and Invoker (``tracer.invoke``): record a graph, then run it once on exit.

The tracer is the current *recorder* (a ContextVar) while its ``with`` block runs: proxies and envoys record
nodes through it. Each invoke adds its inputs to the batch and a body of nodes that see only its rows. On a clean
exit the graph and inputs go to a backend as one request; the saved values come back into the saved proxies.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from raysight.backends.base import InvokeInputs, Request, current_default
from raysight.errors import TraceError
from raysight.graph.graph import Graph
from raysight.graph.node import (
    CALL_FUNCTION,
    CALL_METHOD,
    COND,
    GET_ATTR,
    INVOKE,
    LOG,
    READ,
    STOP,
    TRACE,
    WRITE,
    _new_tuple,
    Calls,
    any_leaf,
    map_nodes,
    Location,
    Node,
    Op,
    plain_index,
    user_source,
)
from raysight.graph.proxy import _CURRENT, Proxy, current_recorder, new_proxy, set_value, value_of
from raysight.tracing import control, creation
from raysight.tracing import scan as scan_mod
from raysight.tracing.calls import CallScope, parse_calls

if TYPE_CHECKING:
    from raysight.models.nnsight import NNsight


class Tracer:
    """``with model.trace(*inputs, **forward_kwargs) as tracer:`` — records interventions, runs them on exit."""

    # Defaults live on the class: a tracer is made per trace, so only what differs is set per instance.
    recording = False
    hook_calls = False  # model.edit(): calls of attached modules run through hooks (see envoy._ATTACHED)
    root_module: Any = None  # while recording: the module whose envoys record here
    _invoker: Optional["Invoker"] = None
    _implicit: Optional["Invoker"] = None
    _scopes = 0
    _token: Any = None
    _mode: Any = None  # the FakeTensorMode of scans, created on first use
    _full_scan: Any = None
    _session: Any = None

    def __init__(
        self,
        model: "NNsight",
        inputs: tuple,
        *,
        invoker_kwargs: Optional[dict] = None,
        forward_kwargs: Optional[dict] = None,
        backend: Any = None,
        method: str = "forward",
        scan: bool = False,
        validate: bool = False,
        execute: bool = True,
    ) -> None:
        self.model = model
        self.graph = Graph()
        self.invokes: list[InvokeInputs] = []
        self._inputs = inputs
        self._invoker_kwargs = invoker_kwargs or {}
        self._forward_kwargs = forward_kwargs or {}
        self._backend = backend
        self._method = method
        self._saved: list[Proxy] = []
        self._calls: dict[str, Union[int, Calls]] = {}
        self._scan = scan or validate
        self._validate = validate
        self._execute = execute
        self._meta: dict[int, Any] = {}
        self._reads: Optional[dict] = {}  # Location -> (its latest READ, the body it is in), per invoke

    # -- the recorder protocol ------------------------------------------------------------------------------
    def record(self, op: Op, target: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Proxy:
        graph = self.graph
        node = graph.add(op, target, self._to_arg(args) if args else (), self._to_arg(kwargs) if kwargs else None,
                         user_source(1))  # fmt: skip
        if self._mode is not None:
            self._record_meta(node)
        return new_proxy(node, self)

    def record_call(self, fn: Any, args: tuple, op: Op = CALL_FUNCTION, depth: int = 3) -> Proxy:
        """Record ``fn(*args)`` (``op`` CALL_FUNCTION) or the method ``fn`` of ``args[0]`` (CALL_METHOD) for a
        proxy's operator, method call or torch function (``h + 1``, ``h[:] = 0``, ``h.sum(0)``): the hot path of
        recording computations, so the arguments are converted and their nodes collected in one pass, and the
        user's line is looked for from ``depth`` frames up on (the caller's caller's ... caller: the proxy's
        operator, whose caller is the user's line). Arguments other than this graph's proxies, plain values, and
        slices or tuples of plain Python values go through :meth:`record`."""
        graph = self.graph
        converted = []
        deps: list[Node] = []
        for a in args:
            t = type(a)
            if t is Proxy:
                if a._recorder is not self and a._recorder.graph is not graph:
                    return self.record(op, fn, args)
                a = a._node
                if a not in deps:
                    deps.append(a)
            elif t not in _PLAIN and not plain_index(a, t):
                return self.record(op, fn, args)
            converted.append(a)
        nodes = graph.nodes
        node = Node.computed(len(nodes), op, fn, tuple(converted), tuple(deps), user_source(depth))
        nodes.append(node)
        graph._stack[-1].append(node)
        if self._mode is not None:
            self._record_meta(node)
        return new_proxy(node, self)

    def record_read(self, path: str, key: str) -> Proxy:
        """Record a READ of a module's ``key`` ("output", "input", "inputs"): the hot path of tracing, so what
        ``Graph.add`` does is written out here, and the Location is made without its Python-level __new__.

        A location read again in the same block takes the earlier read as its argument: when the module has
        already fired by then (read again after a later module, which nnsight 0.4 allowed), the runtime reuses
        the earlier read's value instead of raising OutOfOrderError."""
        calls = self._calls
        call = calls.get(path, 0) if calls else 0
        target = _new_tuple(Location, (path, key, call))
        graph = self.graph
        nodes = graph.nodes
        body = graph._stack[-1]
        reads = self._reads
        earlier = reads.get(target)
        if earlier is None or (earlier[1] is not body and not _open(graph._stack, earlier[1])):
            node = Node.leaf(len(nodes), READ, target, user_source(3))
            if type(call) is int:
                reads[target] = (node, body)
        else:  # read before in this block or in one around it (a cond inside), which has run by then
            node = Node(len(nodes), READ, target, (earlier[0],), None, None, user_source(3))
            if earlier[1] is body:
                reads[target] = (node, body)
        nodes.append(node)
        body.append(node)
        if self._mode is not None:
            self._record_meta(node)
        return new_proxy(node, self)

    def record_write(self, path: str, key: str, value: Any) -> Proxy:
        """Record a WRITE of a module's ``key`` ("output", "input", "inputs", or "skip": its output in place of
        running it); later reads of that event see what it wrote, so earlier reads are not reused for them."""
        calls = self._calls
        graph = self.graph
        nodes = graph.nodes
        target = _new_tuple(Location, (path, key, calls.get(path, 0) if calls else 0))
        node = Node(len(nodes), WRITE, target, self._to_arg((value,)), None, None, user_source(2))
        if self._reads:
            _forget_reads(self._reads, target)
        nodes.append(node)
        graph._stack[-1].append(node)
        if self._mode is not None:
            self._record_meta(node)
        return new_proxy(node, self)

    # -- scanning: fake values while tracing ----------------------------------------------------------------
    def meta_of(self, proxy: Proxy) -> Any:
        """The fake value of a proxy of this trace (scan=True), or None when it is unknown."""
        if self._mode is None or proxy._recorder.graph is not self.graph:
            return None
        value = self._meta.get(proxy.node.index, scan_mod.NO_META)
        return None if value is scan_mod.NO_META else value

    def fake_mode(self) -> Any:
        if self._mode is None:
            self._mode = scan_mod.new_fake_mode()
        return self._mode

    def scan_inputs(self, args: tuple, kwargs: dict) -> "scan_mod.Scan":
        model = self.model
        modules = {path: envoy._module for path, envoy in model._by_path.items()}
        method = model._scan_method(self._method)
        extra = self._forward_kwargs if method == self._method else {}  # a generate scan sees the first step only
        run = lambda a, k: model._execute(method, a, {**k, **extra}, dispatch=False)  # noqa: E731
        return scan_mod.Scan(self.fake_mode(), model._module, modules, run, args, kwargs,
                             root_call=method not in ("forward", "generate"))  # fmt: skip

    def _record_meta(self, node: Node) -> None:
        meta = self._meta
        lookup = lambda n: meta.get(n.index, scan_mod.NO_META)  # noqa: E731
        try:
            if node.op is READ:
                scan = self._invoker.scan if self._invoker is not None else self._batch_scan()
                value = scan.value_at(node.target) if scan is not None else scan_mod.NO_META
            elif node.op is WRITE:
                if self._validate:
                    scan = self._invoker.scan if self._invoker is not None else self._batch_scan()
                    target = node.target
                    if target.key == "skip":  # the value stands in for the module's output
                        target = target._replace(key="output")
                    current = scan.value_at(target) if scan is not None else scan_mod.NO_META
                    scan_mod.check_write(node, current, map_nodes(node.args[0], lookup))
                return
            else:
                value = scan_mod.compute_meta(self._mode, node, lookup, self.model._module_at)
        except Exception as exc:
            if self._validate and not scan_mod.data_dependent(exc):
                from raysight.runtime.interpreter import annotate

                raise annotate(exc, node) from None
            value = scan_mod.NO_META
        meta[node.index] = value

    def _batch_scan(self) -> Any:
        """The scan of the whole batch, for reads outside invokes."""
        if self._full_scan is None and self.invokes:
            args, kwargs = self.model._batch_inputs(self.invokes)
            self._full_scan = self.scan_inputs(args, kwargs)
        return self._full_scan

    def mark_saved(self, proxy: Proxy) -> None:
        node = proxy._node or proxy.node  # (an attribute proxy makes its node on first use)
        node.saved = True
        self._saved.append(proxy)

    def _to_arg(self, a: Any) -> Any:
        t = type(a)
        if t in _PLAIN:
            return a
        if t is slice:
            if type(a.start) in _PLAIN and type(a.stop) in _PLAIN and type(a.step) in _PLAIN:
                return a
            return slice(self._to_arg(a.start), self._to_arg(a.stop), self._to_arg(a.step))
        if isinstance(a, Proxy):
            if a._recorder.graph is self.graph:
                return a.node
            if a.resolved:
                return a.value
            if a._recorder.recording:
                raise TraceError(
                    f"{a.node.name} belongs to another trace that is still being recorded; traces cannot be nested, "
                    "use a session (`with model.session():`) to pass values between traces"
                )
            return a.value  # raises the "never set" ValueError with its hint
        if t is tuple or t is list:
            return t([x if type(x) in _PLAIN else self._to_arg(x) for x in a])
        if isinstance(a, tuple):
            items = [self._to_arg(x) for x in a]
            return t(*items) if hasattr(t, "_fields") else t(items)
        if t is dict:
            return {k: self._to_arg(v) for k, v in a.items()}
        if getattr(a, "_raysight_envoy", False):
            return a._module
        return a

    # -- calls of modules that run more than once -----------------------------------------------------------
    def call_index(self, path: str) -> Union[int, Calls]:
        """Which call(s) of the module at ``path`` an access made now refers to."""
        return self._calls.get(path, 0)

    def advance(self, paths: list[str], steps: int = 1) -> None:
        """``.next()``: later accesses of these modules refer to their next call."""
        calls = self._calls
        for path in paths:
            current = calls.get(path, 0)
            calls[path] = (current.start if isinstance(current, Calls) else current) + steps

    def select_calls(self, paths: list[str], selection: Any, envoy: Any = None) -> "CallScope":
        """``.all()`` / ``.iter[...]``: later accesses of these modules refer to several calls (``envoy``: the
        module selected, whose ``.output`` & co. the returned scope gives)."""
        self._scopes += 1
        if selection is None:  # .all(): this call and every later one
            start = self.call_index(paths[0]) if paths else 0
            calls = Calls(start.start if isinstance(start, Calls) else start, None, None, self._scopes)
        else:
            calls = parse_calls(selection, self._scopes)
        return CallScope(self, paths, calls, envoy)

    # -- the user's API -------------------------------------------------------------------------------------
    def all(self) -> "CallScope":
        """``with tracer.all():`` — later accesses of every module apply to every call (as ``model.all()``)."""
        return self.model.all()

    @property
    def iter(self) -> "_TracerIter":
        """``with tracer.iter[1:3]:`` — later accesses of every module select those calls (as ``model.iter``);
        ``with tracer.iter(collection) as item:`` — a loop run when the graph runs (as ``session.iter``)."""
        return _TracerIter(self)

    def next(self, steps: int = 1) -> "Tracer":
        """Later accesses of every module refer to their next call (as ``model.next()``)."""
        self.model.next(steps)
        return self

    @property
    def invoker(self) -> Optional["Invoker"]:
        """The invoke open now (for ``model.trace(x)``, the one its input made): ``tracer.invoker.inputs``."""
        return self._invoker or self._implicit

    def invoke(self, *inputs: Any, **kwargs: Any) -> "Invoker":
        """Add a batch entry: ``with tracer.invoke(x):`` — accesses inside see only these rows."""
        return Invoker(self, inputs, kwargs)

    def cond(self, predicate: Any) -> "Block":
        """``with tracer.cond(pred):`` runs its body only if ``pred`` is true when the graph runs."""
        return Block(self, self.record(COND, None, (predicate,)).node)

    def stop(self) -> None:
        """End the forward pass once every intervention recorded before this line has run."""
        self.record(STOP, None)

    def log(self, *values: Any, **print_kwargs: Any) -> None:
        """Print the real values when the graph runs."""
        self.record(LOG, None, values, print_kwargs)

    def apply(self, fn: Any, *args: Any, **kwargs: Any) -> Proxy:
        """Call ``fn(*args, **kwargs)`` as one node when the graph runs."""
        return self.record(CALL_FUNCTION, fn, args, kwargs)

    local = staticmethod(control.local)  # nnsight 0.4's ``tracer.local()``: see :func:`raysight.local`

    # -- context --------------------------------------------------------------------------------------------
    def __enter__(self) -> "Tracer":
        active = current_recorder()
        self._session = None
        if active is not None and active.recording:
            if not getattr(active, "is_session", False):
                raise TraceError(
                    "a trace was opened inside another trace; close the first one, or group traces in "
                    "`with model.session():`"
                )
            if not self._execute:
                raise TraceError("model.edit() and model.scan() cannot be used inside a session; open them before it")
            self._session = active  # record into the session's graph, inside a TRACE node
            if active.validate:
                self._scan = self._validate = True
            self.graph = active.graph
            spec = TraceSpec(self.model, self.invokes, self._forward_kwargs, self._method)
            self._trace_node = self.graph.add(TRACE, spec, source=user_source(1))
            self.graph.enter(self._trace_node)
        self._depth = len(self.graph._stack) - 1  # invokes open at this depth
        if "einops" in sys.modules and "raysight.tracing.einops_backend" not in sys.modules:
            import raysight.tracing.einops_backend  # noqa: F401 - defining the backend registers it with einops
        self.root_module = self.model._module  # envoys of this module (or an edited copy of it) record here
        self._token = _CURRENT.set(self)
        self.recording = True
        creation.enable()
        if self._inputs:
            self._implicit = Invoker(self, self._inputs, self._invoker_kwargs)
            try:
                self._implicit.__enter__()
            except BaseException:
                self._close()
                raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if self._implicit is not None and self._invoker is self._implicit:
            self._implicit.__exit__(exc_type, exc, tb)
        self._implicit = None
        self._close()
        if self._session is not None:
            self.graph.exit()
            if exc_type is None:
                spec = self._trace_node.target
                spec.forward_kwargs = self._to_arg(self._forward_kwargs)
                deferred = [(inv.args, inv.kwargs) for inv in self.invokes if inv.batch_size < 0]
                self._hoist_inputs(deferred)
                self._trace_node.set_args((deferred, spec.forward_kwargs))  # what the trace needs to start
                self._session.adopt(self._saved)
                self._saved = []
                if not self.invokes:
                    raise TraceError("a trace in a session was given no input and no `tracer.invoke(...)` was opened")
            return False
        if exc_type is not None or not self._execute:
            return False
        if not self.invokes:
            raise TraceError(
                f"{type(self.model).__name__}.trace() was given no input and no `tracer.invoke(...)` was opened: "
                "pass inputs to trace(x) or add `with tracer.invoke(x):` blocks"
            )
        self._run()
        return False

    def _hoist_inputs(self, inputs: Any) -> None:
        """Nodes that compute an invoke's input (``tracer.invoke(h[:, :5])``) were recorded inside the trace, but
        the trace needs them before it starts: move them in front of it, in the session."""
        body = self._trace_node.body
        inside = {n.index: n for n in body}
        needed: dict[int, Node] = {}
        stack = _nodes_in(inputs)
        while stack:
            node = stack.pop()
            if node.index in inside and node.index not in needed:
                if node.op is not CALL_FUNCTION and node.op is not CALL_METHOD and node.op is not GET_ATTR:
                    raise TraceError(
                        f"an invoke's input depends on {node.format()} of the same trace; compute trace inputs from "
                        "earlier traces of the session, before the trace opens"
                    )
                needed[node.index] = node
                stack.extend(node.deps)
        if not needed:
            return
        hoisted = [n for n in body if n.index in needed]
        body[:] = [n for n in body if n.index not in needed]
        parent = self.graph.current_body
        at = parent.index(self._trace_node)
        parent[at:at] = hoisted

    def _close(self) -> None:
        self.recording = False
        if self._token is not None:
            creation.disable()
            _CURRENT.reset(self._token)
            self._token = None

    def request(self) -> Request:
        return Request(self.graph, self.invokes, self._forward_kwargs, self._method)

    def _run(self) -> None:
        backend = self._backend or current_default() or _local_backend()
        if backend is _LOCAL:  # this process: the request's parts go straight in
            graph = self.graph
            results = run_trace(self.model, graph.body, graph.nodes, self.invokes, self._forward_kwargs,
                                self._method, None, graph.locations()).saved_values  # fmt: skip
        else:
            results = backend(self.model, self.request())
        for proxy in self._saved:
            index = proxy.node.index
            if index in results:
                set_value(proxy, results[index])
        self._saved = []  # proxies point at the tracer: drop the way back so no cycle keeps values alive

    def __repr__(self) -> str:
        return f"<Tracer of {type(self.model).__name__}: {len(self.graph)} nodes, {len(self.invokes)} invokes>"


_PLAIN = frozenset({int, float, str, bool, type(None), torch.Tensor, torch.nn.Parameter, torch.dtype, torch.device})


class TraceSpec:
    """The target of a TRACE node in a session: which model runs, with which inputs and forward arguments."""

    __slots__ = ("model", "invokes", "forward_kwargs", "method")

    def __init__(self, model: Any, invokes: list, forward_kwargs: dict, method: str) -> None:
        self.model = model
        self.invokes = invokes
        self.forward_kwargs = forward_kwargs
        self.method = method

    def __repr__(self) -> str:
        return f"{type(self.model).__name__}.{self.method}({len(self.invokes)} invokes)"


def _open(stack: list, body: list) -> bool:
    """Whether ``body`` is one of the blocks being recorded into now (an enclosing one)."""
    for open_body in stack:
        if open_body is body:
            return True
    return False


def _forget_reads(reads: dict, written: Location) -> None:
    """A write of ``written`` (``.output = v``, ``.input = v``, a skip): reads of that event are no longer current."""
    path, call = written.path, written.call
    keys = ("output",) if written.key in ("output", "skip") else ("input", "inputs")
    for key in keys:
        reads.pop(_new_tuple(Location, (path, key, call)), None)


def _nodes_in(value: Any) -> list[Node]:
    if isinstance(value, Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _nodes_in(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _nodes_in(v)]
    return []


def _any_proxy(values: Any) -> bool:
    for value in values:
        if isinstance(value, Proxy):
            return True
    return False


def _has_proxy(value: Any) -> bool:
    return any_leaf(value, lambda v: isinstance(v, Proxy))


def _local_backend() -> Any:
    global _LOCAL, run_trace
    if _LOCAL is None:
        from raysight.backends.local import LocalBackend
        from raysight.runtime.execute import run_trace

        _LOCAL = LocalBackend()
    return _LOCAL


run_trace: Any = None  # raysight.runtime.execute.run_trace, imported with the local backend


_LOCAL: Any = None


class Invoker:
    """``with tracer.invoke(*inputs, **prepare_kwargs) as invoker:`` — one batch entry and its interventions."""

    def __init__(self, tracer: Tracer, inputs: tuple, kwargs: dict) -> None:
        self.tracer = tracer
        self._raw = (inputs, kwargs)
        self.inputs: tuple = ()
        self.kwargs: dict = {}
        self.batch_size = 0
        self.index = -1
        self.scan: Any = None

    def __enter__(self) -> "Invoker":
        tracer = self.tracer
        graph = tracer.graph
        stack = graph._stack
        if tracer._invoker is not None or not tracer.recording or len(stack) - 1 != tracer._depth:
            self._refuse()
        inputs, kwargs = raw = self._raw
        scan = tracer._scan
        if kwargs and "scan" in kwargs:
            kwargs = dict(kwargs)
            scan = kwargs.pop("scan") or scan
            raw = (inputs, kwargs)
        model = tracer.model
        if tracer._session is not None and _has_proxy((inputs, kwargs)):  # a session value: prepared when it runs
            args, kwargs, batch_size = tracer._to_arg(inputs), tracer._to_arg(kwargs), -1
        else:
            if _any_proxy(inputs) or (kwargs and _any_proxy(kwargs.values())):  # saved by an earlier trace
                inputs, kwargs = value_of(inputs), value_of(kwargs)
            args, kwargs, batch_size = model._prepare_input(*inputs, **kwargs)
        self.inputs, self.kwargs, self.batch_size = model._invoker_inputs(args, kwargs), kwargs, batch_size
        if scan and batch_size > 0:
            self.scan = tracer.scan_inputs(args, kwargs)
        if tracer._full_scan is not None:
            tracer._full_scan = None
        invokes = tracer.invokes
        self.index = index = len(invokes)
        invokes.append(InvokeInputs(args, kwargs, batch_size, raw))
        nodes = graph.nodes
        node = Node(len(nodes), INVOKE, index, body=[])  # (what graph.add and graph.enter do)
        nodes.append(node)
        stack[-1].append(node)
        stack.append(node.body)
        tracer._invoker = self
        self._outer_calls, tracer._calls = tracer._calls, {}  # .next() positions start afresh in each invoke
        self._outer_reads, tracer._reads = tracer._reads, {}
        return self

    def _refuse(self) -> None:
        tracer = self.tracer
        if not tracer.recording:
            raise TraceError("tracer.invoke() must be used inside the `with model.trace():` block")
        if tracer._invoker is not None:
            raise TraceError(
                "an invoke was opened while another invoke is open; invokes cannot be nested. Close the first "
                "`with tracer.invoke(...)` block (or, for `model.trace(x)` with an input, put each input in its "
                "own invoke and call `model.trace()` without one)"
            )
        raise TraceError("tracer.invoke() must be opened directly in the trace, not inside a cond block")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.tracer.graph.exit()
        self.tracer._invoker = None
        self.tracer._calls = self._outer_calls
        self.tracer._reads = self._outer_reads
        return False


class _TracerIter:
    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def __getitem__(self, selection: Any) -> Any:
        return self._tracer.model.iter[selection]

    def __call__(self, collection: Any, return_context: bool = False) -> Any:
        from raysight.tracing.session import loop_over

        return loop_over(self._tracer, collection, return_context)


class Block:
    """A recorded block: the nodes created inside ``with`` go into ``node.body`` (cond, loops)."""

    def __init__(self, recorder: Any, node: Node, branches: tuple = ()) -> None:
        self.recorder = recorder
        self.node = node
        self._branches = branches + (node,)  # a cond chain's COND nodes so far (if / elif ...)

    def else_(self, condition: Any = None) -> "Block":
        """``with c.else_():`` after ``with tracer.cond(p) as c:`` runs when no earlier branch ran;
        ``c.else_(q)`` is an elif (chainable: ``with c2.else_():`` after ``with c.else_(q) as c2:``), as nnsight 0.4."""
        if self.node.op is not COND:
            raise TraceError("else_() continues a `tracer.cond(...)` block; this block is not a condition")
        rec = self.recorder
        if not rec.recording or not any(n is self.node for n in rec.graph.current_body):
            raise TraceError("`with c.else_():` must follow the `with tracer.cond(...) as c:` block, at the same level")
        from raysight.tracing.control import else_taken

        taken = rec.record(CALL_FUNCTION, else_taken, (True if condition is None else condition, *self._branches))
        return Block(rec, rec.record(COND, None, (taken,)).node, self._branches)

    def __enter__(self) -> "Block":
        self.recorder.graph.enter(self.node)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.recorder.graph.exit()
        return False


