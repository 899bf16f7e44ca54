"""Calls that must record while a trace or session records, though they take no proxy torch can dispatch on.

* Tensor creation with several positional sizes (``torch.zeros(h.shape[0], 3)``): torch dispatches
  ``__torch_function__`` for a size given as one sequence, but rejects several positional sizes when one is a
  proxy before any dispatch happens.
* Training objects (``torch.nn.Parameter``, ``torch.nn.Linear``, ``torch.optim`` optimizers, ``DataLoader``):
  constructed while recording, they become nodes, so they are created (and trained) where the graph runs; they
  are kept after the run (saved) so later traces can use them.

While a recorder is active (and only then) these names are swapped for wrappers, four dict updates in all; the
wrappers call the original whenever no recorder is active in the calling context. Nothing is patched at import.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Any, Callable

import torch
import torch.utils.data

from raysight.graph.node import Op
from raysight.graph.proxy import Proxy, current_recorder

_SIZED = ("zeros", "ones", "empty", "rand", "randn")
_lock = threading.Lock()
_active = 0
_tables: list[tuple[dict, dict, dict]] = []  # (namespace, wrappers, originals)


def _sized(original: Callable) -> Callable:
    @functools.wraps(original)
    def creation(*size: Any, **kwargs: Any) -> Any:
        if len(size) > 1 and any(isinstance(s, Proxy) for s in size):
            rec = current_recorder()
            if rec is not None and rec.recording:
                return rec.record(Op.CALL_FUNCTION, original, (size,), kwargs)
        return original(*size, **kwargs)

    return creation


class _Recording(type):
    """Stands in for a class while recording: calling it records a node; ``isinstance``/``issubclass`` checks and
    attribute lookups (torch and libraries use them on these names) answer for the real class."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        original = cls.__dict__["__wrapped__"]
        rec = current_recorder()
        if rec is None or not rec.recording:
            return original(*args, **kwargs)
        proxy = rec.record(Op.CALL_FUNCTION, original, args, kwargs)
        rec.mark_saved(proxy)  # training state outlives the run
        return proxy

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls.__dict__["__wrapped__"])

    def __subclasscheck__(cls, sub: Any) -> bool:
        return issubclass(sub, cls.__dict__["__wrapped__"])

    def __getattr__(cls, name: str) -> Any:
        return getattr(cls.__dict__["__wrapped__"], name)


def _constructor(original: Any) -> Any:
    return _Recording(original.__name__, (), {"__wrapped__": original, "__doc__": original.__doc__,
                                              "__module__": original.__module__, "__qualname__": original.__qualname__})


def _build_tables() -> None:
    optimizers = [
        name
        for name, value in vars(torch.optim).items()
        if inspect.isclass(value) and issubclass(value, torch.optim.Optimizer) and value is not torch.optim.Optimizer
    ]
    plan = [
        (torch, _SIZED, _sized),
        (torch.nn, ("Parameter", "Linear"), _constructor),
        (torch.optim, tuple(optimizers), _constructor),
        (torch.utils.data, ("DataLoader",), _constructor),
    ]
    for module, names, make in plan:
        namespace = module.__dict__
        originals = {name: namespace[name] for name in names}
        _tables.append((namespace, {name: make(fn) for name, fn in originals.items()}, originals))


def enable() -> None:
    global _active
    with _lock:
        _active += 1
        if _active == 1:
            if not _tables:
                _build_tables()
            for namespace, wrappers, _ in _tables:
                namespace.update(wrappers)


def disable() -> None:
    global _active
    with _lock:
        _active -= 1
        if _active == 0:
            for namespace, _, originals in _tables:
                namespace.update(originals)
