"""Training objects as nodes: while a session or trace records, constructing ``torch.nn.Parameter``,
``torch.nn.Linear``, a ``torch.optim`` optimizer or a ``DataLoader`` records a node instead, so the object is
created (and trained) where the graph runs. The names are swapped in only while recording and restored after
(as :mod:`raysight.tracing.creation` does). Such nodes are kept after the run (saved), so trained parameters and
optimizers can be used by later traces.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Any, Callable

import torch
import torch.utils.data

from raysight.graph.node import Op
from raysight.graph.proxy import current_recorder

_lock = threading.Lock()
_active = 0
_swapped: list[tuple[Any, str, Any]] = []
_wrappers: dict[tuple[int, str], Callable] = {}


def _targets() -> list[tuple[Any, str]]:
    names = [(torch.nn, "Parameter"), (torch.nn, "Linear"), (torch.utils.data, "DataLoader"), (torch, "utils")]
    names = names[:3]
    for name, value in vars(torch.optim).items():
        if inspect.isclass(value) and issubclass(value, torch.optim.Optimizer) and value is not torch.optim.Optimizer:
            names.append((torch.optim, name))
    return names


def _wrap(original: Any) -> Callable:
    @functools.wraps(original, updated=())
    def construct(*args: Any, **kwargs: Any) -> Any:
        rec = current_recorder()
        if rec is None or not rec.recording:
            return original(*args, **kwargs)
        proxy = rec.record(Op.CALL_FUNCTION, original, args, kwargs)
        rec.mark_saved(proxy)  # training state outlives the run
        return proxy

    return construct


def enable() -> None:
    global _active
    with _lock:
        _active += 1
        if _active == 1:
            for owner, name in _targets():
                original = getattr(owner, name)
                key = (id(owner), name)
                wrapper = _wrappers.get(key)
                if wrapper is None or wrapper.__wrapped__ is not original:
                    wrapper = _wrappers[key] = _wrap(original)
                _swapped.append((owner, name, original))
                setattr(owner, name, wrapper)


def disable() -> None:
    global _active
    with _lock:
        _active -= 1
        if _active == 0:
            for owner, name, original in reversed(_swapped):
                setattr(owner, name, original)
            _swapped.clear()
