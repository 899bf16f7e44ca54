"""Hooks for exactly the module locations a graph needs, installed for one run and always removed.

A module the graph reads or writes gets, for the run, an instance ``forward`` that wraps its own: it hands the
input to the interleaver before the call and the output after it, and passes on the replacement if an intervention
wrote one. That is what a forward pre-hook and a forward hook would do, but a module with hooks takes torch's slow
call path (~1.3 µs more per call here), and a wrapper keeps the fast one. A module that already has forward hooks of
its own (the user's, a library's), or a process with global module hooks, gets real hooks instead, put after the
others, so the order in which they all see a value stays torch's. A module a graph may skip
(``envoy.skip(value)``) gets a pre-hook and an instance ``forward`` that returns the value instead of running when
its pre-hook was handed one.

The root module is the exception when the run calls it exactly once (a forward pass): its events are delivered
around that call by :meth:`HookSet.call_root`, without hooks. A hooked module takes torch's slow call path, and
``model.output`` is read by most traces, so this saves a hook and a slow call per trace.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.modules.module as torch_module
import torch.utils.hooks

from raysight.graph.node import Location
from raysight.runtime.batching import replace_rows
from raysight.runtime.interpreter import Interleaver
from raysight.util import WrapperModule

ROOT_INPUT = ("", True)
ROOT_OUTPUT = ("", False)


_Handle = torch.utils.hooks.RemovableHandle
_DIRECT: Any = None  # whether hooks go straight into a module's hook dicts (decided on first use)
WRAP = True  # modules without hooks of their own get a wrapping forward rather than hooks (see the module doc)


def _direct_hooks_supported() -> bool:
    """Registering a hook through torch's API makes a RemovableHandle (weak references to the hook dicts) and
    removing it walks them again: about 8x the cost of the two dict updates that are the registration itself, and
    paid per hooked module per trace. When this torch keeps its hooks in the dicts ``register_forward_hook`` and
    ``register_forward_pre_hook`` fill (every 2.x release), the runtime puts its hooks there itself, with ids from
    the same counter; otherwise it uses the API."""
    global _DIRECT
    probe = torch.nn.Module()
    state = probe.__dict__
    names = ("_forward_hooks", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
    _DIRECT = all(isinstance(state.get(name), dict) for name in names) and isinstance(
        getattr(_Handle, "next_id", None), int
    )
    if _DIRECT:  # check that torch calls a hook put in that way, with the arguments the API would give it
        seen: list = []
        probe = WrapperModule()
        state = probe.__dict__
        state["_forward_pre_hooks"][-1] = lambda m, a, k: seen.append(("pre", len(a), type(k)))
        state["_forward_pre_hooks_with_kwargs"][-1] = True
        state["_forward_hooks"][-1] = lambda m, a, o: seen.append(("post", len(a), type(o)))
        try:
            probe(torch.zeros(1))
        finally:
            for name in names:
                state[name].pop(-1, None)
        _DIRECT = seen == [("pre", 1, dict), ("post", 1, torch.Tensor)]
    return _DIRECT


class HookSet:
    """Context manager: ``with HookSet(module_at, locations, interleaver) as hooks: model(...)``; with
    ``direct_root=True`` the caller runs the root module through ``hooks.call_root``."""

    _root_input = _root_output = False  # (set only when the root's events come from call_root)

    def __init__(
        self,
        module_at: Callable[[str], torch.nn.Module],
        locations: Iterable[Location],
        interleaver: Interleaver,
        direct_root: bool = False,
        relays: Optional[dict] = None,
    ) -> None:
        # module path -> [its input event key or None, its output event key or None, whether a skip replaces it]
        paths: dict[str, list] = {}
        for loc in locations:
            path = loc.path
            entry = paths.get(path)
            if entry is None:
                entry = paths[path] = [None, None, False]
            key = loc.key
            if key == "output":
                entry[1] = (path, False)
            else:
                entry[0] = (path, True)
                if key == "skip":
                    entry[2] = True
        if direct_root:
            root = paths.pop("", None)
            if root is not None:
                self._root_input = root[0] is not None
                self._root_output = root[1] is not None
        self._paths = paths
        self._module_at = module_at
        self._relays = relays
        self._on_event = interleaver.on_event
        self._handles: list[Any] = []  # torch's handles of hooks registered through its API
        self._direct: list[tuple[dict, Any, int]] = []  # (hooks dict, with-kwargs flags or None, id) put in directly
        # modules given a forward of the run: (module, the forward it had in its __dict__ or _NONE, relay box or None)
        self._forwards: list[tuple[torch.nn.Module, Any, Optional[list]]] = []

    def __enter__(self) -> "HookSet":
        module_at, on_event, handles = self._module_at, self._on_event, self._handles
        direct = _DIRECT if _DIRECT is not None else _direct_hooks_supported()
        wrap = WRAP and not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)
        forwards = self._forwards
        relays = self._relays if self._relays is not None else {}
        hook_id = _Handle.next_id
        try:
            for path, (in_key, out_key, skips) in self._paths.items():
                module = module_at(path)
                if wrap and not skips and not (module._forward_hooks or module._forward_pre_hooks):
                    state = module.__dict__
                    old = state.get("forward", _NONE)
                    relay = relays.get(path)
                    if relay is None or relay[0] is not module or relay[1] is not old or (
                        old is _NONE and type(module).forward is not relay[2]
                    ):
                        relay = relays[path] = _relay(module, old)
                    box = relay[4]
                    box[0], box[1], box[2] = on_event, in_key, out_key
                    forwards.append((module, old, box))
                    state["forward"] = relay[3]
                    continue
                for key in (in_key, out_key):
                    if key is None:
                        continue
                    if key[1] and skips:
                        pending: list = []
                        handles.append(module.register_forward_pre_hook(_skip_pre_hook(key, on_event, pending),
                                                                        with_kwargs=True))  # fmt: skip
                        forwards.append((module, module.__dict__.get("forward", _NONE), None))
                        module.__dict__["forward"] = _skipping_forward(module.forward, pending)
                    elif not direct:
                        if key[1]:
                            handles.append(module.register_forward_pre_hook(_pre_hook(key, on_event),
                                                                            with_kwargs=True))  # fmt: skip
                        else:
                            handles.append(module.register_forward_hook(_post_hook(key, on_event)))
                    elif key[1]:  # what register_forward_pre_hook(with_kwargs=True) does, without its handle
                        state = module.__dict__
                        hooks, flags = state["_forward_pre_hooks"], state["_forward_pre_hooks_with_kwargs"]
                        hooks[hook_id] = _pre_hook(key, on_event)
                        flags[hook_id] = True
                        self._direct.append((hooks, flags, hook_id))
                        hook_id += 1
                    else:  # what register_forward_hook does, without its handle
                        hooks = module.__dict__["_forward_hooks"]
                        hooks[hook_id] = _post_hook(key, on_event)
                        self._direct.append((hooks, None, hook_id))
                        hook_id += 1
        except BaseException:
            self.remove()
            raise
        finally:
            if hook_id > _Handle.next_id:  # ids stay unique among torch's own handles
                _Handle.next_id = hook_id
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for hooks, flags, hook_id in self._direct:
            hooks.pop(hook_id, None)
            if flags is not None:
                flags.pop(hook_id, None)
        self._direct.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, old, box in reversed(self._forwards):
            if old is _NONE:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = old  # (accelerate, for one, keeps its own forward there)
            if box is not None:
                box[0] = None  # (the relay stays for the next run; it must not keep this run's interleaver alive)
        self._forwards.clear()

    def call_root(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """Call the root module as its hooks would see it: input event, forward, output event."""
        if self._root_input:
            event = self._on_event(ROOT_INPUT, (args, kwargs))
            if event.modified:
                args, kwargs = event.value
        output = module(*args, **kwargs)
        if self._root_output:
            event = self._on_event(ROOT_OUTPUT, output)
            if event.modified:
                output = event.value
        return output


def _relay(module: torch.nn.Module, old: Any) -> tuple:
    """A forward for ``module`` that delivers the events of a pre-hook and a forward hook around its own: what
    a run puts in the module's ``__dict__``. It is made once per module and kept by the model (``relays``) for
    later runs, which only fill its box: [the interleaver's on_event (None between runs: the module's own forward
    runs, without events), the input event key or None, the output event key or None]. Returns (module, ``old``, the
    class's forward, the relay, its box); a run reuses it while the first three are still the module's."""
    forward = module.forward  # (its instance forward when it has one, else the class's, bound)
    box: list = [None, None, None]

    def relay(*args: Any, **kwargs: Any) -> Any:
        on_event, in_key, out_key = box
        if on_event is None:
            return forward(*args, **kwargs)
        if in_key is not None:
            event = on_event(in_key, (args, kwargs))
            if event.modified:
                args, kwargs = event.value
        output = forward(*args, **kwargs)
        if out_key is not None:
            event = on_event(out_key, output)
            if event.modified:
                return event.value
        return output

    relay.__wrapped__ = forward  # type: ignore[attr-defined]  # inspect.signature(module.forward) sees the real one
    relay._raysight_forward = forward  # type: ignore[attr-defined]  # (ops.call_module: an ad-hoc call, no events)
    return (module, old, type(module).forward, relay, box)


def is_hooked(module: torch.nn.Module) -> bool:
    """Whether the module's calls deliver events (or run anyone's hooks) in this run."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or hasattr(
        module.__dict__.get("forward"), "_raysight_forward"
    )


def _pre_hook(key: tuple, on_event: Callable) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        event = on_event(key, (args, kwargs))
        return event.value if event.modified else None

    return hook


def _skip_pre_hook(key: tuple, on_event: Callable, pending: list) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        event = on_event(key, (args, kwargs))
        pending.append(event.skips)  # one entry per call (None: this call runs), taken by the forward below
        return event.value if event.modified else None

    return hook


def _skipping_forward(forward: Callable, pending: list) -> Callable:
    """The module's forward for one run: a call whose input event was handed a skip returns the skip's value. When
    the skip covers only some invokes' rows, the module runs and those rows of its output are replaced."""

    def skipping(*args: Any, **kwargs: Any) -> Any:
        skips = pending.pop() if pending else None
        if skips is None:
            return forward(*args, **kwargs)
        whole = [value for rows, value, _ in skips if rows is None]
        if whole:
            return whole[-1]
        output = forward(*args, **kwargs)
        for rows, value, where in skips:
            output = replace_rows(output, rows, value, where)
        return output

    skipping._raysight_forward = forward  # type: ignore[attr-defined]  # (an ad-hoc call runs the module itself)
    return skipping


_NONE = object()


def _post_hook(key: tuple, on_event: Callable) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        event = on_event(key, output)
        return event.value if event.modified else None

    return hook
