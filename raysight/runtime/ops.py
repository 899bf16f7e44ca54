"""The interpreter's one method per op: what a node of each kind does when it runs (a mixin of
:class:`~raysight.runtime.interpreter.Interleaver`, like ``gradients.py`` and ``loops.py``).

READ is inlined in the interleaver's stream loop (it is the most frequent node); COND, INVOKE, STOP, GRAD, TRACE and
ITER are handled by the stream itself, since they steer execution rather than compute a value.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from raysight.errors import InterventionError
from raysight.graph.node import Location, Node
from raysight.runtime.batching import narrow, replace_rows
from raysight.runtime.state import Event, Stream, same_view


class Ops:
    """Op methods of the Interleaver (it supplies env, _load, module_at, call_root and log_to)."""

    def _arguments(self, node: Node) -> tuple[tuple, dict]:
        if node.flat:  # nodes only as direct arguments: no walk needed
            env = self.env
            args = tuple(env[a.index] if type(a) is Node else a for a in node.args)
            kwargs = node.kwargs
            if kwargs:
                kwargs = {k: env[v.index] if type(v) is Node else v for k, v in kwargs.items()}
            return args, kwargs
        return self._load(node.args), self._load(node.kwargs)

    def call_function(self, node: Node, stream: Stream, event: Any) -> Any:
        args, kwargs = self._arguments(node)
        return node.target(*args, **kwargs)

    def call_method(self, node: Node, stream: Stream, event: Any) -> Any:
        (obj, *args), kwargs = self._arguments(node)
        return getattr(obj, node.target)(*args, **kwargs)

    def get_attr(self, node: Node, stream: Stream, event: Any) -> Any:
        return getattr(self.env[node.args[0].index], node.target)

    def write(self, node: Node, stream: Stream, event: Event) -> None:
        loc: Location = node.target
        new = self._load(node.args[0])
        where = f"{loc} in {stream.label}"
        if loc.key == "skip":  # the module's forward is not run: the hooks' forward hands back `new` (hooks.py)
            if event.skips is None:
                event.skips = []
            event.skips.append((stream.rows, new, where))
            return None
        current = _select(event.value, loc.key)
        if same_view(new, narrow(current, stream.rows)):
            return None  # an in-place edit written back (`x += 1`): the batch already holds it
        if stream.rows is None and _shapes(new) != _shapes(current):
            self.reshaped = (node, _shapes(current), _shapes(new))  # named if the model fails after it
        if loc.key == "output":
            event.value = replace_rows(current, stream.rows, new, where)
        elif loc.key == "inputs":
            args, kwargs = replace_rows(current, stream.rows, _as_inputs(new, where), where)
            event.value = (tuple(args), dict(kwargs))
        else:
            args, kwargs = event.value
            if args:
                event.value = ((replace_rows(args[0], stream.rows, new, where), *args[1:]), kwargs)
            else:
                first = next(iter(kwargs))
                event.value = (args, {**kwargs, first: replace_rows(kwargs[first], stream.rows, new, where)})
        event.modified = True
        return None

    def call_module(self, node: Node, stream: Stream, event: Any) -> Any:
        module = self.module_at(node.target)
        args, kwargs = self._load(node.args), self._load(node.kwargs)
        hook = kwargs.pop("hook", False)
        device = _device_of(module)
        if device is not None:
            args, kwargs = _to_device((args, kwargs), device)
        if not hook:  # the module's own forward, without this run's wrapper (hooks.py): no events
            forward = module.forward
            return getattr(forward, "_raysight_forward", forward)(*args, **kwargs)
        if not node.target and self.call_root is not None:  # the root's events come without hooks in this run
            return self.call_root(module, args, kwargs)
        return module(*args, **kwargs)

    def param(self, node: Node, stream: Stream, event: Any) -> Any:
        path, attr = node.target
        module = self.module_at(path)
        value = getattr(module, attr)
        if isinstance(value, torch.Tensor) and value.device.type == "meta" and hasattr(module, "_hf_hook"):
            from accelerate.utils import align_module_device  # offloaded by accelerate: fetch the real weights

            with align_module_device(module):
                return getattr(module, attr).clone()
        return value.clone() if isinstance(value, torch.Tensor) else value

    def log(self, node: Node, stream: Stream, event: Any) -> None:
        kwargs = self._load(node.kwargs)
        if self.log_to is not None:  # a server: the lines go back to the client with the results
            kwargs = {**kwargs, "file": self.log_to}
        print(*self._load(node.args), **kwargs)  # the user asked for it: tracer.log
        return None


def _shapes(value: Any) -> Any:
    """The shape of a tensor, or of each tensor of a tuple or list (one level: a module's output tuple)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in value)
    return None


def _select(value: Any, key: str) -> Any:
    if key == "output" or key == "inputs":
        return value
    return _first_input(value)


def _first_input(value: tuple) -> Any:
    """``.input``: the first positional argument, else the first keyword argument."""
    args, kwargs = value
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    return None


def _as_inputs(new: Any, where: str) -> tuple:
    if not (isinstance(new, (tuple, list)) and len(new) == 2 and isinstance(new[1], dict)):
        raise InterventionError(
            f"cannot set {where}: `.inputs` must be set to `((positional args...), {{keyword args}})`, "
            f"got {type(new).__name__}"
        )
    return (tuple(new[0]), new[1])


def _device_of(module: torch.nn.Module) -> Optional[torch.device]:
    for p in module.parameters():
        return p.device
    return None


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device) if value.device != device else value
    if isinstance(value, (list, tuple)):
        items = [_to_device(v, device) for v in value]
        return type(value)(items) if type(value) in (list, tuple) else type(value)(*items)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


