"""einops on proxies: an einops backend for :class:`~raysight.graph.proxy.Proxy`.

einops picks a backend per tensor type from the subclasses of its ``AbstractBackend``; defining this class (done
the first time a trace is entered while einops is imported) makes ``einops.rearrange(proxy, ...)`` record the
primitive torch operations einops would run (reshape, permute, reductions) as nodes. einops needs the number of
dimensions up front: it comes from the pattern's left side, or, with ``...`` in it, from ``scan=True``.
"""

from __future__ import annotations

import sys
from typing import Any

from einops._backends import TorchBackend

from raysight.errors import TraceError
from raysight.graph.proxy import Proxy


class ProxyBackend(TorchBackend):
    framework_name = "raysight"

    def is_appropriate_type(self, tensor: Any) -> bool:
        return isinstance(tensor, Proxy)

    def shape(self, x: Proxy) -> tuple:
        ndim = _rank_from_meta(x)
        if ndim is None:
            ndim = _rank_from_pattern()
        return tuple(x.shape[i] for i in range(ndim))

    def is_float_type(self, x: Any) -> bool:
        return True  # decided when the graph runs; torch raises there if a mean is taken of integers


def _rank_from_meta(x: Proxy) -> Any:
    meta = getattr(x._recorder, "meta_of", None)
    value = meta(x) if meta is not None else None
    return value.dim() if hasattr(value, "dim") else None


def _rank_from_pattern() -> int:
    frame = sys._getframe(2)
    while frame is not None:
        pattern = frame.f_locals.get("pattern") if frame.f_code.co_filename.endswith(("einops.py",)) else None
        if isinstance(pattern, str):
            left = pattern.split("->")[0]
            if "..." in left or "…" in left:
                break
            return _count_axes(left)
        frame = frame.f_back
    raise TraceError(
        "einops needs the number of dimensions of a proxy while tracing: write the pattern without `...`, trace "
        "with `scan=True`, or call it when the graph runs with `raysight.apply(einops.rearrange, x, pattern)`"
    )


def _count_axes(expression: str) -> int:
    count, depth, in_token = 0, 0, False
    for char in expression:
        if char == "(":
            if depth == 0:
                count += 1
            depth += 1
            in_token = False
        elif char == ")":
            depth -= 1
        elif char.isspace():
            in_token = False
        elif depth == 0 and not in_token:
            count += 1
            in_token = True
    return count
