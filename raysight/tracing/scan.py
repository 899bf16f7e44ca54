"""Scanning: run the model on fake tensors so proxies know their shapes while tracing.

``Scan`` runs one forward pass under a ``FakeTensorMode`` with every parameter and buffer swapped for a fake one
(``torch.func.functional_call``), so nothing real is computed or changed, and records each module's fake input and
output per call. The tracer turns those into the *meta* of READ nodes and, for every later node, computes the
meta by running the op on fake values (:func:`compute_meta`); with ``validate=True`` a failure there is raised at
the user's line.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, Callable, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from raysight.graph.node import Location, Node, Op, any_leaf
from raysight.runtime.batching import check_structure

NO_META: Any = object()


def new_fake_mode() -> FakeTensorMode:
    """Fake tensors for scans, with the real inputs' (static) shapes. A data-dependent op (``h[h > 0]``,
    ``torch.nonzero``, ``.item()``) has no fake value: its node, and what depends on it, is left unknown
    (see :func:`data_dependent`)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def data_dependent(exc: BaseException) -> bool:
    """Whether a fake computation failed only because a value depends on real data (a size or a branch that the
    fake tensors cannot know): validation cannot check it, which is no mistake of the user's."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException, GuardOnDataDependentSymNode))


def to_fake(mode: FakeTensorMode, value: Any, device: Optional[torch.device] = None) -> Any:
    """A fake copy of every tensor in ``value`` (on ``device`` when given, e.g. for weights on the meta device)."""
    if isinstance(value, torch.Tensor):
        if device is None and value.device.type != "meta":
            return mode.from_tensor(value)
        with mode:
            fake = torch.empty(value.shape, dtype=value.dtype, device=device or torch.device("cpu"))
        return fake.requires_grad_(value.requires_grad) if value.is_floating_point() else fake
    if isinstance(value, (list, tuple)):
        items = [to_fake(mode, v, device) for v in value]
        if type(value) in (list, tuple):
            return type(value)(items)
        return type(value)(*items) if hasattr(type(value), "_fields") else type(value)(items)
    if isinstance(value, dict):
        items = {k: to_fake(mode, v, device) for k, v in value.items()}
        if type(value) is dict:
            return items
        try:
            return type(value)(**items)
        except TypeError:
            return type(value)(items)
    return value


class Scan:
    """The fake values every module received and returned in one fake forward pass."""

    def __init__(
        self,
        mode: FakeTensorMode,
        root: torch.nn.Module,
        modules: dict[str, torch.nn.Module],
        run: Callable[[tuple, dict], Any],
        args: tuple,
        kwargs: dict,
        root_call: bool = False,
    ) -> None:
        """``root_call``: the root's values are the arguments and result of ``run`` itself (a trace running another
        method than forward, ``trace(method=...)``), not those of the root module's forward."""
        self.values: dict[tuple, list] = {}
        device = _input_device(args, kwargs)
        state = {name: to_fake(mode, t, _weight_device(t, device)) for name, t in _state(root)}
        fake_args, fake_kwargs = to_fake(mode, (args, kwargs))
        handles = []
        try:
            for path, module in modules.items():
                if root_call and not path:
                    continue
                handles.append(module.register_forward_pre_hook(self._pre(path), with_kwargs=True))
                handles.append(module.register_forward_hook(self._post(path)))
            with mode, _swapped(root, state):
                output = run(fake_args, fake_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if root_call:
            self.values[("", True)], self.values[("", False)] = [(fake_args, fake_kwargs)], [output]

    def _pre(self, path: str) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            self.values.setdefault((path, True), []).append((args, kwargs))

        return hook

    def _post(self, path: str) -> Callable:
        def hook(module: Any, args: tuple, output: Any) -> None:
            self.values.setdefault((path, False), []).append(output)

        return hook

    def value_at(self, loc: Location) -> Any:
        calls = self.values.get((loc.path, loc.is_input), [])
        call = loc.call if isinstance(loc.call, int) else getattr(loc.call, "start", 0)
        if call >= len(calls):
            return NO_META
        value = calls[call]
        if loc.key == "input":
            args, kwargs = value
            return args[0] if args else next(iter(kwargs.values()), None)
        return value


def _state(root: torch.nn.Module) -> list:
    return [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]


def _input_device(args: tuple, kwargs: dict) -> Optional[torch.device]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _weight_device(t: torch.Tensor, input_device: Optional[torch.device]) -> Optional[torch.device]:
    return (input_device or torch.device("cpu")) if t.device.type == "meta" else None


class _swapped:
    """Temporarily replace parameters and buffers by the given tensors (restored in ``__exit__``)."""

    def __init__(self, root: torch.nn.Module, state: dict[str, Any]) -> None:
        self._root = root
        self._state = state
        self._saved: list = []

    def __enter__(self) -> None:
        for name, value in self._state.items():
            owner, _, attr = name.rpartition(".")
            module = self._root.get_submodule(owner)
            table = module._parameters if attr in module._parameters else module._buffers
            self._saved.append((table, attr, table[attr]))
            table[attr] = value

    def __exit__(self, *exc: Any) -> None:
        for table, attr, original in reversed(self._saved):
            table[attr] = original
        self._saved.clear()


# -- fake values of recorded nodes -----------------------------------------------------------------------------
_SAFE_CONSTRUCTORS = {builtins.list, builtins.dict, builtins.tuple, builtins.set, builtins.int, builtins.float,
                      builtins.str, builtins.bool, builtins.complex}  # fmt: skip


def compute_meta(mode: FakeTensorMode, node: Node, meta_of: Callable[[Node], Any], module_at: Callable) -> Any:
    """The fake value ``node`` would have, or NO_META when it cannot be known without running for real."""
    from raysight.graph.node import map_nodes

    missing = False

    def load(n: Node) -> Any:
        nonlocal missing
        value = meta_of(n)
        if value is NO_META:
            missing = True
        return value

    args = map_nodes(node.args, load)
    kwargs = map_nodes(node.kwargs, load)
    if missing:
        return NO_META
    op = node.op
    with mode:
        if op is Op.CALL_FUNCTION:
            if not node.deps and not _pure_without_inputs(node.target):
                return NO_META  # a user function with no traced input: it runs once, for real, in the graph
            return node.target(*args, **kwargs)
        if op is Op.CALL_METHOD:
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
            if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                return NO_META  # `.item()`, `.tolist()` of a fake tensor: a number only the real run knows
            return value
        if op is Op.GET_ATTR:
            return getattr(args[0], node.target)
        if op is Op.PARAM:
            path, attr = node.target
            return to_fake(mode, getattr(module_at(path), attr), _weight_device(getattr(module_at(path), attr), None))
        if op is Op.CALL_MODULE:
            kwargs = dict(kwargs)
            kwargs.pop("hook", None)
            return module_at(node.target)(*args, **kwargs)
        if op is Op.GRAD:
            return torch.empty_like(args[0])
    return NO_META


def check_write(node: Node, current: Any, new: Any) -> None:
    """validate=True: an assignment to ``.output``/``.input`` must keep the structure and the shapes of what it
    replaces (the modules after it were scanned with those)."""
    if current is NO_META or any_leaf(new, lambda v: v is NO_META):  # a part has no fake value
        return
    if node.target.key == "inputs":
        return
    check_structure(current, new, f"{node.target}", shapes=True)


def _pure_without_inputs(fn: Any) -> bool:
    if fn in _SAFE_CONSTRUCTORS:
        return True
    module = getattr(fn, "__module__", None) or ""
    return module.startswith("torch") or fn is operator.getitem
