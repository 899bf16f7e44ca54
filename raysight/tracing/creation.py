"""Tensor-creation functions with proxy sizes: ``torch.zeros(h.shape[0], 3)``.

torch dispatches ``__torch_function__`` for a size given as one sequence (``torch.zeros(h.shape)``), but its
argument parser rejects several positional sizes when one is a proxy before any dispatch happens. While a tracer
is recording (and only then), the varargs-size creation functions are wrapped so such calls record a node; the
wrappers call the original function whenever no recorder is active in the calling context. Nothing is patched
at import.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import torch

from raysight.graph.node import Op
from raysight.graph.proxy import Proxy, current_recorder

_NAMES = ("zeros", "ones", "empty", "rand", "randn")
_lock = threading.Lock()
_active = 0
_originals: dict[str, Callable] = {}
_wrappers: dict[str, Callable] = {}  # made once, then swapped in and out


def _wrap(original: Callable) -> Callable:
    @functools.wraps(original)
    def creation(*size: Any, **kwargs: Any) -> Any:
        if len(size) > 1 and any(isinstance(s, Proxy) for s in size):
            rec = current_recorder()
            if rec is not None and rec.recording:
                return rec.record(Op.CALL_FUNCTION, original, (size,), kwargs)
        return original(*size, **kwargs)

    return creation


def enable() -> None:
    global _active
    with _lock:
        _active += 1
        if _active == 1:
            namespace = torch.__dict__
            for name in _NAMES:
                original = namespace[name]
                if name not in _wrappers or _wrappers[name].__wrapped__ is not original:
                    _wrappers[name] = _wrap(original)
                _originals[name] = original
            namespace.update(_wrappers)


def disable() -> None:
    global _active
    with _lock:
        _active -= 1
        if _active == 0:
            torch.__dict__.update(_originals)
