"""Hooks for exactly the module locations a graph needs, installed for one run and always removed.

One forward pre-hook per module whose input is read or written, one forward hook per module whose output is;
each hands the value to the interleaver and returns the replacement if an intervention wrote one.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from raysight.graph.node import Location
from raysight.runtime.interpreter import Interleaver


class HookSet:
    """Context manager: ``with HookSet(module_at, locations, interleaver): model(...)``."""

    def __init__(
        self,
        module_at: Callable[[str], torch.nn.Module],
        locations: Iterable[Location],
        interleaver: Interleaver,
    ) -> None:
        self._keys = {(loc.path, loc.is_input) for loc in locations}
        self._module_at = module_at
        self._interleaver = interleaver
        self._handles: list[Any] = []

    def __enter__(self) -> "HookSet":
        try:
            for path, is_input in self._keys:
                module = self._module_at(path)
                if is_input:
                    handle = module.register_forward_pre_hook(self._pre_hook(path), with_kwargs=True)
                else:
                    handle = module.register_forward_hook(self._post_hook(path))
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, path: str) -> Callable:
        key = (path, True)
        on_event = self._interleaver.on_event

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            event = on_event(key, (args, kwargs))
            return event.value if event.modified else None

        return hook

    def _post_hook(self, path: str) -> Callable:
        key = (path, False)
        on_event = self._interleaver.on_event

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            event = on_event(key, output)
            return event.value if event.modified else None

        return hook
