"""Selections of a module's calls: ``.all()`` and ``.iter[...]`` as a sticky statement or a ``with`` block."""

from __future__ import annotations

from typing import Any

from raysight.graph.node import Calls


class CallScope:
    """Applies a multi-call selection at once (statement form, sticky) and undoes it when used as ``with``.

    It also stands for the selected module, as nnsight 0.4's iteration envoy did: ``envoy.iter[1].output``,
    ``envoy.all().output``, ``with envoy.iter[1:3] as e: e.output[:] = 0`` and its submodules (``e.mlp``) read and
    write the selected calls."""

    _envoy: Any = None

    def __init__(self, tracer: Any, paths: list[str], calls: Calls, envoy: Any = None) -> None:
        self._tracer = tracer
        self._previous = {p: tracer._calls.get(p) for p in paths}
        for path in paths:
            tracer._calls[path] = calls
        self.calls = calls
        if envoy is not None:
            self._envoy = envoy

    def __getattr__(self, name: str) -> Any:  # (only for what the scope itself lacks)
        envoy = self.__dict__.get("_envoy")
        if envoy is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(envoy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs") and self._envoy is not None:
            setattr(self._envoy, name, value)
        else:
            object.__setattr__(self, name, value)

    def __getitem__(self, key: Any) -> Any:
        if self._envoy is None:
            raise TypeError(f"{type(self).__name__} selects calls of every module; index a module's envoy instead")
        return self._envoy[key]

    def __enter__(self) -> "CallScope":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        calls = self._tracer._calls
        for path, previous in self._previous.items():
            if previous is None:
                calls.pop(path, None)
            else:
                calls[path] = previous
        return False


def parse_calls(selection: Any, scope: int) -> Calls:
    hint = "use envoy.iter[i], envoy.iter[a:b] or envoy.iter[[i, j]] with non-negative call indices"
    if isinstance(selection, int) and not isinstance(selection, bool):
        if selection < 0:
            raise IndexError(f"iter[{selection}]: call indices count from 0; {hint}")
        return Calls(items=(selection,), scope=scope)
    if isinstance(selection, slice):
        start = 0 if selection.start is None else selection.start
        step = 1 if selection.step is None else selection.step
        if not all(isinstance(v, int) for v in (start, step)) or start < 0 or step < 1:
            raise IndexError(f"iter[{selection}] is not a valid selection of calls; {hint}")
        if selection.stop is None:
            if step != 1:
                raise IndexError(f"iter[{selection}]: an open-ended slice cannot have a step; {hint}")
            return Calls(start, None, None, scope)
        if not isinstance(selection.stop, int) or selection.stop < start:
            raise IndexError(f"iter[{selection}] is not a valid selection of calls; {hint}")
        return Calls(items=tuple(range(start, selection.stop, step)), scope=scope)
    if isinstance(selection, (list, tuple)):
        if not selection or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in selection):
            raise IndexError(f"iter[{list(selection)}] is not a valid selection of calls; {hint}")
        return Calls(items=tuple(sorted(set(selection))), scope=scope)
    raise TypeError(f"iter[...] takes an int, a slice or a list of ints, not {type(selection).__name__}; {hint}")
