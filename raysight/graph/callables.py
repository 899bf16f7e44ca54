"""Callables on the wire: the qualified name a callable travels under, and the allow-list of restricted mode (torch,
tensor methods, operators, einops, math and raysight builtins)."""

from __future__ import annotations

import builtins
import importlib
import operator
from typing import Any, Optional

import torch

_ALLOWED_MODULES = ("torch", "operator", "_operator", "einops", "math", "raysight.tracing.control",
                    "raysight.graph.proxy")  # fmt: skip
_ALLOWED_BUILTINS = {"list", "dict", "tuple", "set", "int", "float", "str", "bool", "bytes", "bytearray", "complex",
                     "len", "sum", "min", "max", "abs", "range", "getattr", "setattr", "round", "sorted", "zip",
                     "enumerate", "isinstance"}  # fmt: skip
_RESTRICTED_ATTRS = ("_", "__")  # attribute and method names starting with these are refused in restricted mode


_KNOWN: dict[int, tuple[str, str]] = {}


def _known_callables() -> dict[int, tuple[str, str]]:
    """id -> (module, name) for the public callables of torch and friends, whose own ``__module__``/``__qualname__``
    often do not import back (``torch.softmax`` is ``_VariableFunctionsClass.softmax``)."""
    if not _KNOWN:
        import math

        import torch.nn.functional as functional

        spaces = [("torch", torch), ("torch.nn.functional", functional), ("torch.linalg", torch.linalg),
                  ("torch.special", torch.special), ("torch.fft", torch.fft), ("operator", operator),
                  ("math", math), ("builtins", builtins)]  # fmt: skip
        try:
            import einops

            spaces.append(("einops", einops))
        except ImportError:
            pass
        for module, namespace in spaces:
            for name, value in vars(namespace).items():
                if callable(value) and not name.startswith("__"):
                    _KNOWN.setdefault(id(value), (module, name))
        for name in dir(torch.Tensor):
            value = getattr(torch.Tensor, name, None)
            if callable(value):
                _KNOWN.setdefault(id(value), ("torch", f"Tensor.{name}"))
    return _KNOWN


def callable_name(fn: Any) -> Optional[tuple[str, str]]:
    """(module, qualified name) that import back to ``fn`` itself, or None."""
    known = _known_callables().get(id(fn))
    if known is not None and _resolve(*known) is fn:
        return known
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if module is None and isinstance(fn, type(torch.Tensor.add)):  # method descriptors of torch._C.TensorBase
        module, qualname = "torch", f"Tensor.{fn.__name__}"
    if not module or not qualname or "<" in qualname:
        return None
    try:
        if _resolve(module, qualname) is fn:
            return module, qualname
    except Exception:
        pass
    objclass = getattr(fn, "__objclass__", None)  # e.g. torch._C.TensorBase.add reached through torch.Tensor
    if objclass is not None and getattr(torch.Tensor, fn.__name__, None) is fn:
        return "torch", f"Tensor.{fn.__name__}"
    return None


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def is_allowed(module: str, qualname: str) -> bool:
    if module == "builtins":
        return qualname in _ALLOWED_BUILTINS
    return module == "torch" or module.startswith(tuple(m + "." for m in _ALLOWED_MODULES)) or module in _ALLOWED_MODULES
