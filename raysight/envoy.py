"""Envoy: the user's handle on one module of the wrapped model.

An envoy mirrors the ``nn.Module`` tree (``model.transformer.h[3]``); inside a trace its ``.output``, ``.input``
and ``.inputs`` are proxies that read (or, when assigned, write) that module's values in the forward pass, its
tensor attributes are copies, and calling it runs the module ad hoc. Outside a trace it gives the real module's
attributes. A child named ``output``, ``input`` or ``inputs`` takes the name, as in nnsight 0.4 (BERT's
``attention.output`` is the ``BertSelfOutput`` child); the module's own values are then ``.nns_output`` /
``.nns_input`` / ``.nns_inputs``. A child whose name clashes with any envoy API is also reachable as ``name_``
(``attention.output_``; ``next_``, ...).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator, Optional

import torch

from raysight.errors import TraceError
from raysight.graph.node import CALL_FUNCTION, CALL_MODULE, PARAM
from raysight.graph.proxy import _CURRENT, Proxy, current_recorder


class _ModuleValue:
    """``envoy.output`` / ``.input`` / ``.inputs``: reading records a READ of that value of the module in the trace
    recording now (assigning is ``Envoy.__setattr__``'s: it records a WRITE). A descriptor rather than a property:
    reading a module value is the most frequent thing a trace does, and this makes it one call. It is a non-data
    descriptor, so a child module of the same name, kept in the envoy's ``__dict__``, shadows it for free."""

    def __init__(self, key: str, doc: str) -> None:
        self.key = key
        self.__doc__ = doc

    def __get__(self, envoy: Optional["Envoy"], owner: Any = None) -> Any:
        if envoy is None:
            return self
        rec = _CURRENT.get()
        if rec is None or not rec.recording or rec.root_module is not envoy._root._module:
            rec = envoy._recorder(self.key)  # raises the error that says what is wrong, or allows a session
        return rec.record_read(envoy._path, self.key)


_VALUE_NAMES = ("output", "input", "inputs")
# modules attached through an envoy (`envoy.sae = SAE()`): inside model.edit() a call of one is hooked, as in
# nnsight 0.4, so later traces read its values. A call of a module the forward pass runs itself stays unhooked:
# hooked, it would be that module's first call and shift the calls the edit's own reads of it mean.
_ATTACHED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_NNS_NAMES = ("nns_output", "nns_input", "nns_inputs")
# module methods that change training state: called while a trace or session records, they record (a training
# loop's `model.zero_grad()` runs at each step, where the model is; `model.train()` ... `model.eval()` switch modes
# in program order, on the server for a remote run), instead of running once, now, on this side
_RECORDED_METHODS = frozenset({"zero_grad", "train", "eval", "requires_grad_"})


class _RecordedMethod:
    """``envoy.zero_grad`` (``.train``, ...) while recording: calling it records the call on the module (sent by
    reference); ``train``/``eval``/``requires_grad_`` give the envoy back, as the module's methods give the module."""

    __slots__ = ("rec", "fn", "module", "envoy")

    def __init__(self, rec: Any, fn: Any, module: torch.nn.Module, envoy: Any) -> None:
        self.rec, self.fn, self.module, self.envoy = rec, fn, module, envoy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        proxy = self.rec.record(CALL_FUNCTION, self.fn, (self.module, *args), kwargs)
        return proxy if self.fn.__name__ == "zero_grad" else self.envoy


def recorded_method(envoy: Any, name: str) -> Optional[_RecordedMethod]:
    """The recording form of ``envoy.<name>`` (one of _RECORDED_METHODS) while a trace or session records."""
    rec = current_recorder()
    if rec is None or not rec.recording:
        return None
    module = envoy.__dict__["_module"]
    return _RecordedMethod(rec, getattr(type(module), name), module, envoy)


class Envoy:
    """A module in the tree of a wrapped model. See the module docstring."""

    _raysight_envoy = True

    def __init__(self, module: torch.nn.Module, path: str = "", root: Optional["Envoy"] = None) -> None:
        d = self.__dict__
        d["_module"] = module
        d["_path"] = path
        d["_root"] = root if root is not None else self
        d["_children"] = {}
        d["_index"] = []  # the children in order, for `envoy[i]`
        d["_subtree"] = None
        d["_root"]._register(path, self)
        for name, child in module.named_children():
            self._add_child(name, child)

    # -- the tree -------------------------------------------------------------------------------------------
    def _register(self, path: str, envoy: "Envoy") -> None:
        self.__dict__.setdefault("_by_path", {})[path] = envoy

    def _add_child(self, name: str, module: torch.nn.Module) -> "Envoy":
        path = f"{self._path}.{name}" if self._path else name
        child = (_ListEnvoy if type(module) is torch.nn.ModuleList else Envoy)(module, path, self._root)
        if name in self._children:
            self._index[self._index.index(self._children[name])] = child
        else:
            self._index.append(child)
        self._children[name] = child
        if not hasattr(type(self), name) or name in _VALUE_NAMES:
            self.__dict__[name] = child  # `output`/`input`/`inputs` become the child's, as in nnsight 0.4
        if hasattr(type(self), name):
            self.__dict__[name + "_"] = child  # (other names of the envoy API stay the API's)
        for key, alias in (self._root.__dict__.get("_rename") or {}).items():
            if key == path and "." in key:
                self._root.__dict__.setdefault(alias, child)  # a full path: reachable from the root
            elif key == name:
                self.__dict__.setdefault(alias, child)  # a child name: renamed wherever it occurs
        self._invalidate_subtree()
        return child

    def _invalidate_subtree(self) -> None:
        envoy: Optional[Envoy] = self
        root = self._root
        while envoy is not None:
            envoy.__dict__["_subtree"] = None
            if envoy is root:
                break
            parent_path = envoy._path.rpartition(".")[0]
            envoy = root._by_path.get(parent_path)

    def _subtree_paths(self) -> list[str]:
        paths = self.__dict__["_subtree"]
        if paths is None:
            paths = [self._path]
            for child in self._children.values():
                paths.extend(child._subtree_paths())
            self.__dict__["_subtree"] = paths
        return paths

    def modules(self, include_fn: Optional[Any] = None, names: bool = False) -> list[Any]:
        """This envoy and every envoy below it, depth first (a list, as in nnsight 0.4); with ``include_fn`` only
        those it accepts (``model.modules(include_fn=lambda e: e.path.endswith("attn"))``), with ``names=True`` as
        ``(path, envoy)`` pairs."""
        found: list[Envoy] = []
        stack = [self]
        while stack:
            envoy = stack.pop()
            found.append(envoy)
            stack.extend(reversed(list(envoy._children.values())))
        if include_fn is not None:
            found = [envoy for envoy in found if include_fn(envoy)]
        return [(envoy._path, envoy) for envoy in found] if names else found

    def named_modules(self, include_fn: Optional[Any] = None) -> list[tuple[str, "Envoy"]]:
        """``(path, envoy)`` for this envoy and every envoy below it (a list, as in nnsight 0.4)."""
        return self.modules(include_fn, names=True)

    def to(self, *args: Any, **kwargs: Any) -> "Envoy":
        """``module.to(...)`` that returns this envoy (``model = model.to("cuda")`` keeps the wrapper)."""
        self._module.to(*args, **kwargs)
        return self

    def _clear(self) -> None:
        """nnsight 0.4 cleared the proxies its envoys cached between traces; raysight's envoys keep none, so there
        is nothing to clear (kept so code written for 0.4, such as its test fixtures, runs unchanged)."""

    @property
    def path(self) -> str:
        return self._path

    @property
    def _module_path(self) -> str:
        """nnsight 0.4's form of the path: ``""`` for the root, ``".transformer.h.0"`` below it."""
        return f".{self._path}" if self._path else ""

    def get(self, path: str) -> Any:
        """What a dotted path below this envoy names: ``model.get("transformer.h.0")`` is the envoy,
        ``model.get("transformer.h.0.output")`` inside a trace the proxy of its output."""
        value: Any = self
        for part in path.split("."):
            value = getattr(value, part)
        return value

    # -- reading and writing values (inside a trace) --------------------------------------------------------
    def _recorder(self, what: str) -> Any:
        rec = current_recorder()
        if rec is None or not rec.recording:
            raise TraceError(
                f"`{self._describe()}.{what}` can only be used inside a `with model.trace(...)` block "
                "(or a session / edit block)"
            )
        model = getattr(rec, "model", None)
        if model is not None and model._module is not self._root._module:  # an edited copy shares the module
            raise TraceError(
                f"`{self._describe()}.{what}` belongs to another model than the one being traced; read it inside a "
                "trace of its own model (use a session to combine several models)"
            )
        return rec

    output = _ModuleValue("output", "The module's output in this forward pass (narrowed to the invoke's rows).")
    input = _ModuleValue("input", "The module's first positional argument (or its first keyword argument when "
                         "called without any).")  # fmt: skip
    inputs = _ModuleValue("inputs", "All of the module's arguments as ``((args...), {kwargs})``.")
    nns_output = _ModuleValue("output", "``.output``, also when a child module is named ``output``.")
    nns_input = _ModuleValue("input", "``.input``, also when a child module is named ``input``.")
    nns_inputs = _ModuleValue("inputs", "``.inputs``, also when a child module is named ``inputs``.")

    def skip(self, value: Any) -> None:
        """Do not run this module in the forward pass: its output is ``value`` instead (the module's input is still
        seen by its pre-hooks; nothing inside it runs, so reads of its submodules find nothing). Inside an invoke
        that holds only some rows of the batch, the module runs and those rows of its output become ``value``."""
        if not self._path:
            raise TraceError("the root module cannot be skipped (nothing would run); skip one of its submodules, or "
                             "set `model.output = ...`")  # fmt: skip
        rec = _CURRENT.get()
        if rec is None or not rec.recording or rec.root_module is not self._root._module:
            rec = self._recorder("skip()")
        rec.record_write(self._path, "skip", value)

    def next(self, steps: int = 1) -> "Envoy":
        """Later accesses of this module and its descendants refer to their next call (chainable)."""
        rec = self._recorder("next()")
        rec.advance(self._subtree_paths(), steps)
        return self

    def all(self) -> Any:
        """Later accesses of this module and its descendants apply to every call (statement or ``with``)."""
        return self._recorder("all()").select_calls(self._subtree_paths(), None, self)

    @property
    def iter(self) -> "_CallSelector":
        """``envoy.iter[i]``, ``envoy.iter[1:3]``, ``envoy.iter[[0, 2]]``: select calls (statement or ``with``)."""
        return _CallSelector(self)

    def __call__(self, *args: Any, hook: bool = False, **kwargs: Any) -> Any:
        rec = current_recorder()
        if rec is None or not rec.recording:
            return self._module(*args, **kwargs)
        self._recorder("__call__")
        if hook or (rec.hook_calls and self._module in _ATTACHED):
            kwargs["hook"] = True
        return rec.record(CALL_MODULE, self._path, args, kwargs)

    # -- attributes -----------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        module = self.__dict__["_module"]
        try:
            value = getattr(module, name)
        except AttributeError:
            children = ", ".join(self._children) or "none"
            raise AttributeError(
                f"{self._describe()} ({type(module).__name__}) has no submodule or attribute {name!r}; its "
                f"submodules are: {children}. Print the model to see its tree."
            ) from None
        if name in _RECORDED_METHODS:
            recorded = recorded_method(self, name)
            if recorded is not None:
                return recorded
        if isinstance(value, torch.Tensor):
            rec = current_recorder()
            model = getattr(rec, "model", None) if rec is not None and rec.recording else None
            if model is not None and model._module is self._root._module:
                return rec.record(PARAM, (self._path, name))
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        mounted = name in _VALUE_NAMES and name in self.__dict__  # a child module of this name is mounted there
        if mounted and not isinstance(value, torch.nn.Module):
            raise TraceError(
                f"{self._describe()} has a child module named {name!r}, so `.{name}` is that module; set the "
                f"module's own {name} with `.nns_{name} = ...`"
            )
        if not mounted and (name in _VALUE_NAMES or name in _NNS_NAMES):  # a WRITE of the module's value
            key = name[4:] if name in _NNS_NAMES else name
            rec = _CURRENT.get()
            if rec is None or not rec.recording or rec.root_module is not self._root._module:
                rec = self._recorder(key)
            rec.record_write(self._path, key, value)
        elif isinstance(value, torch.nn.Module):
            self._module.add_module(name, value)
            self._add_child(name, value)
            _ATTACHED.add(value)
        elif isinstance(value, Proxy):
            raise TraceError(
                f"cannot store a proxy as attribute {name!r} of {self._describe()}; assign `.output`/`.input`, "
                "or keep the proxy in a variable"
            )
        else:
            setattr(self._module, name, value)

    # -- containers -----------------------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        if type(key) is int:  # the common case, `model.layers[i]`
            try:
                return self._index[key]
            except IndexError:
                pass
        children = list(self._children.values())
        if isinstance(key, slice):
            return children[key]
        if isinstance(key, str):
            if key in self._children:
                return self._children[key]
            raise KeyError(f"{self._describe()} has no submodule {key!r}; it has: {', '.join(self._children)}")
        if not isinstance(key, int):
            raise TypeError(f"index {self._describe()} with an int, a slice or a name, not {type(key).__name__}")
        if not -len(children) <= key < len(children):
            raise IndexError(
                f"{self._describe()} has {len(children)} submodules (valid indices {-len(children)}.."
                f"{len(children) - 1}); index {key} is out of range"
            )
        return children[key]

    def __len__(self) -> int:
        return len(self._children)

    def __iter__(self) -> Iterator["Envoy"]:
        return iter(list(self._children.values()))

    def _describe(self) -> str:
        return f"model.{self._path}" if self._path else "model"

    def __repr__(self) -> str:
        return repr(self._module)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self._module)))


class _ChildOutputs(_ModuleValue):
    """``.output`` of a ModuleList (which never runs itself): the list of its children's outputs, as in nnsight 0.4
    (``model.layers.output[3]`` is block 3's output)."""

    def __get__(self, envoy: Optional["Envoy"], owner: Any = None) -> Any:
        if envoy is None:
            return self
        outputs = [c.output for c in envoy._index]
        return envoy._recorder("output").record(CALL_FUNCTION, list, (outputs,))


class _ListEnvoy(Envoy):
    """The envoy of a ``torch.nn.ModuleList``."""

    output = _ChildOutputs("output", _ChildOutputs.__doc__ or "")


class _CallSelector:
    def __init__(self, envoy: Envoy) -> None:
        self._envoy = envoy

    def __getitem__(self, selection: Any) -> Any:
        envoy = self._envoy
        return envoy._recorder("iter[...]").select_calls(envoy._subtree_paths(), selection, envoy)
