"""Calls that must record while a trace or session records, though they take no proxy torch can dispatch on.

* Tensor creation with several positional sizes (``torch.zeros(h.shape[0], 3)``): torch dispatches
  ``__torch_function__`` for a size given as one sequence, but rejects several positional sizes when one is a
  proxy before any dispatch happens.
* Training objects (``torch.nn.Parameter``, ``torch.nn.Linear``, ``torch.optim`` optimizers, ``DataLoader``):
  constructed while a trace or session records, they become nodes, so they are created (and trained) where the
  graph runs; they are kept after the run (saved) so later traces can use them. Their classes keep their
  identity (``isinstance``, ``type(x) is``, subclassing, pickling): the first recorder gives ``Parameter``,
  ``Optimizer``, ``Linear`` and ``DataLoader`` a ``__new__`` that records when user code constructs exactly one
  of them (or one of torch.optim's optimizers) while a recorder of the calling context records, and otherwise
  constructs as before; it stays (it was a dict update per class per trace, a tenth of an empty trace's cost).
  Torch's own code constructing them (a ``torch.nn.LayerNorm`` built while recording) gets real ones. A name
  imported before (``from torch.optim import AdamW``) records too.

The creation functions are swapped into ``torch`` while any trace or session records (one dict update) and
swapped back after; the stand-ins do the original thing whenever no recorder is active in the calling context
(another thread, say). Nothing is patched at import.
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
    if issubclass(cls, torch.optim.Optimizer):
        args, kwargs = _params_listed(args, kwargs)
    proxy = rec.record(Op.CALL_FUNCTION, cls, args, kwargs)
    rec.mark_saved(proxy)  # training state outlives the run
    return proxy


def _params_listed(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """An optimizer's ``params`` given as an iterator (``model.layer.parameters()``), as the list the optimizer
    would make of it now: the recorded node keeps it (an iterator is spent after one use, and cannot travel)."""

    def listed(params: Any) -> Any:
        if isinstance(params, (torch.Tensor, Proxy, list, tuple, dict)) or not hasattr(params, "__iter__"):
            if isinstance(params, list) and any(isinstance(g, dict) for g in params):  # parameter groups
                return [{**g, "params": listed(g["params"])} if isinstance(g, dict) and "params" in g else g
                        for g in params]  # fmt: skip
            return params
        return list(params)

    if args:
        return (listed(args[0]), *args[1:]), kwargs
    if "params" in kwargs:
        return args, {**kwargs, "params": listed(kwargs["params"])}
    return args, kwargs


def _from_torch(frame: Any) -> bool:
    """Whether the caller is torch's own code: a module built while recording (``torch.nn.LayerNorm(10)`` applied
    ad hoc) makes real parameters; only the user's ``torch.nn.Parameter(...)`` records."""
    return frame is not None and str(frame.f_globals.get("__name__", "")).startswith("torch.")


def _recording_new(base: type, kinds: frozenset, needs_args: bool) -> Callable:
    """The ``__new__`` given to ``base`` for good: while a recorder of this context records, constructing exactly
    one of ``kinds`` from user code returns a proxy (not an instance, so Python skips ``__init__``); anything else
    (subclasses, no recorder, another thread, torch's own code, ``copy``/``pickle`` calling ``cls.__new__(cls)``
    without arguments when ``needs_args``) constructs as it always did."""
    own = base.__dict__.get("__new__")
    original = own.__func__ if isinstance(own, staticmethod) else own  # None: object.__new__ (takes no arguments)

    def __new__(kind: type, *args: Any, **kwargs: Any) -> Any:
        if _active and kind in kinds and (args or kwargs or not needs_args) and not _from_torch(sys._getframe(1)):
            proxy = _record_construction(kind, args, kwargs)
            if proxy is not None:
                return proxy
        if original is None:
            return object.__new__(kind)
        return original(kind, *args, **kwargs)

    __new__.__qualname__ = f"{base.__qualname__}.__new__"
    return staticmethod(__new__)


_sized_tables: list[tuple[Callable, dict]] = []  # [(torch.__dict__.update, stand-ins), (its update, originals)]
_lock = threading.Lock()
_active = 0  # recorders open (traces and sessions)


def _install() -> None:
    """Once, on the first recorder: the recording ``__new__`` of the training classes, and the tables of the
    creation functions that enable() and disable() swap."""
    optimizers = frozenset(
        value
        for value in vars(torch.optim).values()
        if inspect.isclass(value) and issubclass(value, torch.optim.Optimizer) and value is not torch.optim.Optimizer
    )
    for base, kinds, needs_args in (
        (torch.nn.Parameter, frozenset({torch.nn.Parameter}), False),  # (Parameter() is an empty parameter)
        (torch.optim.Optimizer, optimizers, True),
        (torch.nn.Linear, frozenset({torch.nn.Linear}), True),
        (torch.utils.data.DataLoader, frozenset({torch.utils.data.DataLoader}), True),
    ):
        base.__new__ = _recording_new(base, kinds, needs_args)
    namespace = torch.__dict__
    originals = {name: namespace[name] for name in _SIZED}
    _sized_tables.extend([(namespace.update, {n: _sized(fn) for n, fn in originals.items()}),
                          (namespace.update, originals)])  # fmt: skip


def enable() -> None:
    """A trace or session starts recording: swap the creation functions in (nested recorders share one swap)."""
    global _active
    with _lock:
        if not _sized_tables:
            _install()
        _active += 1
        if _active == 1:
            update, table = _sized_tables[0]
            update(table)


def disable() -> None:
    global _active
    with _lock:
        _active -= 1
        if _active == 0:
            update, table = _sized_tables[1]
            update(table)
