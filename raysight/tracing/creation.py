"""Calls that must record while a trace or session records, though they take no proxy torch can dispatch on.

* Tensor creation with several positional sizes (``torch.zeros(h.shape[0], 3)``): torch dispatches
  ``__torch_function__`` for a size given as one sequence, but rejects several positional sizes when one is a
  proxy before any dispatch happens.
* Training objects (``torch.nn.Parameter``, ``torch.nn.Linear``, ``torch.optim`` optimizers, ``DataLoader``):
  constructed while a trace or session records, they become nodes, so they are created (and trained) where the
  graph runs; they are kept after the run (saved) so later traces can use them. ``Parameter`` gets a recording ``__new__``;
  the others are replaced in their modules by subclasses that record (``isinstance`` and subclassing keep
  working in both cases). Torch's own code constructing a Parameter (a ``torch.nn.LayerNorm`` built while
  recording) gets a real one.

All of it is swapped in while any trace or session records (four dict updates and one ``__new__``) and swapped
back after; the stand-ins do the original thing whenever no recorder is active in the calling context (another
thread, say). Nothing is patched at import.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from typing import Any, Callable

import torch
import torch.utils.data

from raysight.graph.node import Op
from raysight.graph.proxy import Proxy, current_recorder

_SIZED = ("zeros", "ones", "empty", "rand", "randn")


def _sized(original: Callable) -> Callable:
    @functools.wraps(original)
    def creation(*size: Any, **kwargs: Any) -> Any:
        if len(size) > 1 and any(isinstance(s, Proxy) for s in size):
            rec = current_recorder()
            if rec is not None and rec.recording:
                return rec.record(Op.CALL_FUNCTION, original, (size,), kwargs)
        return original(*size, **kwargs)

    return creation


def _record_construction(cls: type, args: tuple, kwargs: dict) -> Any:
    rec = current_recorder()
    if rec is None or not rec.recording:
        return None
    proxy = rec.record(Op.CALL_FUNCTION, cls, args, kwargs)
    rec.mark_saved(proxy)  # training state outlives the run
    return proxy


def _parameter_new() -> Any:
    """``torch.nn.Parameter`` keeps its class (torch and libraries subclass it with metaclasses of their own, e.g.
    FSDP's ``FlatParameter``); its own ``__new__`` is swapped for one that records."""
    original = torch.nn.Parameter.__dict__["__new__"].__func__

    def __new__(kind: type, *args: Any, **kwargs: Any) -> Any:
        if kind is torch.nn.Parameter and not _from_torch(sys._getframe(1)):
            proxy = _record_construction(kind, args, kwargs)
            if proxy is not None:
                return proxy  # not a Parameter, so Python skips __init__
        return original(kind, *args, **kwargs)

    return staticmethod(__new__)


def _from_torch(frame: Any) -> bool:
    """Whether the caller is torch's own code: a module built while recording (``torch.nn.LayerNorm(10)`` applied
    ad hoc) makes real parameters; only the user's ``torch.nn.Parameter(...)`` records."""
    return frame is not None and str(frame.f_globals.get("__name__", "")).startswith("torch.")


def _stand_in(original: type) -> type:
    """A subclass of ``original`` that stands in for it in its module while a session records: calling it records
    a node; ``isinstance``/``issubclass`` answer for ``original``; classes that subclass it meanwhile (a library
    imported mid-session) construct as usual. (Setting ``__new__`` on these classes could not be undone.)"""

    class Recording(type(original)):  # type: ignore[misc]
        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            if cls is stand_in:
                proxy = _record_construction(original, args, kwargs)
                return proxy if proxy is not None else original(*args, **kwargs)
            return super().__call__(*args, **kwargs)

        def __instancecheck__(cls, obj: Any) -> bool:
            return isinstance(obj, original) if cls is stand_in else super().__instancecheck__(obj)

        def __subclasscheck__(cls, sub: Any) -> bool:
            return issubclass(sub, original) if cls is stand_in else super().__subclasscheck__(sub)

    stand_in = Recording(original.__name__, (original,), {"__module__": original.__module__,
                         "__qualname__": original.__qualname__, "__doc__": original.__doc__})  # fmt: skip
    return stand_in


_parameter_news: list[Any] = []  # [recording __new__, original __new__]
_swap_in: list[tuple[Callable, dict]] = []  # (namespace.update, wrappers): what enable() calls
_swap_out: list[tuple[Callable, dict]] = []  # (namespace.update, originals): what disable() calls
_lock = threading.Lock()
_active = 0  # recorders open (traces and sessions)


def _build_tables() -> None:
    """What enable() and disable() swap: per namespace, its ``update`` with the stand-ins and with the originals."""
    tables = []  # (namespace, stand-ins, originals)
    namespace = torch.__dict__
    originals = {name: namespace[name] for name in _SIZED}
    tables.append((namespace, {name: _sized(fn) for name, fn in originals.items()}, originals))
    optimizers = [
        name
        for name, value in vars(torch.optim).items()
        if inspect.isclass(value) and issubclass(value, torch.optim.Optimizer) and value is not torch.optim.Optimizer
    ]
    for module, names in ((torch.nn, ("Linear",)), (torch.optim, optimizers), (torch.utils.data, ("DataLoader",))):
        originals = {name: module.__dict__[name] for name in names}
        tables.append((module.__dict__, {n: _stand_in(c) for n, c in originals.items()}, originals))
    _parameter_news.extend([_parameter_new(), torch.nn.Parameter.__dict__["__new__"]])
    _swap_out.extend((namespace.update, originals) for namespace, _, originals in tables)
    _swap_in.extend((namespace.update, wrappers) for namespace, wrappers, _ in tables)  # last: enable() checks it


def enable() -> None:
    """A trace or session starts recording: swap the stand-ins in (nested recorders share one swap)."""
    global _active
    with _lock:
        _active += 1
        if _active == 1:
            if not _swap_in:
                _build_tables()
            for update, table in _swap_in:
                update(table)
            torch.nn.Parameter.__new__ = _parameter_news[0]


def disable() -> None:
    global _active
    with _lock:
        _active -= 1
        if _active == 0:
            for update, table in _swap_out:
                update(table)
            torch.nn.Parameter.__new__ = _parameter_news[1]
