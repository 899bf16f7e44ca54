"""NNsight: wrap any ``torch.nn.Module`` so its internals can be read and edited with ``model.trace(...)``.

The wrapper is the root :class:`~raysight.envoy.Envoy`. Subclasses adapt three steps to their kind of model:
``_prepare_input`` (one invoke's inputs and batch size), ``_batch_inputs`` (several invokes into one batch) and
``_execute`` (run the module; for a forward pass it calls the root module through ``call(module, args, kwargs)``
when given one, which is how the root's own values reach the graph without hooks).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from raysight.backends.base import InvokeInputs
from raysight.envoy import Envoy, recorded_method
from raysight.runtime.batching import batch_size_of, concatenate_inputs
from raysight.runtime.ops import _to_device
from raysight.tracing.tracer import Tracer


class NNsight(Envoy):
    """``model = raysight.NNsight(module, rename={"transformer.h": "layers"})``."""

    def __init__(self, module: torch.nn.Module, rename: Optional[dict[str, str]] = None) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"NNsight wraps a torch.nn.Module, got {type(module).__name__}")
        self.__dict__["_rename"] = dict(rename or {})
        self.__dict__["_edits"] = []
        super().__init__(module, "", None)

    @property
    def _model(self) -> torch.nn.Module:
        """The wrapped module (nnsight 0.4's name for it)."""
        return self._module

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (or buffer); cpu for a module without either."""
        for tensor in self._module.parameters():
            return tensor.device
        for tensor in self._module.buffers():
            return tensor.device
        return torch.device("cpu")

    # -- module methods that return the module return the wrapper (``to``: Envoy's) ------------------------------
    # (inside a trace or session these three record, and run in program order where the model runs: envoy.py)
    def eval(self) -> "NNsight":
        recorded = recorded_method(self, "eval")
        if recorded is not None:
            return recorded()
        self._module.eval()
        return self

    def train(self, mode: bool = True) -> "NNsight":
        recorded = recorded_method(self, "train")
        if recorded is not None:
            return recorded(mode)
        self._module.train(mode)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "NNsight":
        recorded = recorded_method(self, "requires_grad_")
        if recorded is not None:
            return recorded(requires_grad)
        self._module.requires_grad_(requires_grad)
        return self

    # -- persistent edits -----------------------------------------------------------------------------------
    def edit(self, *inputs: Any, inplace: bool = False, validate: Optional[bool] = None, **kwargs: Any) -> "Edit":
        """``with model.edit() as edited:`` records interventions that run in every later trace of ``edited`` (a
        copy sharing the weights); ``inplace=True`` edits ``model`` itself. With an input the edit is checked on
        fake tensors first (``validate``), so a broken edit fails here, not on the next trace."""
        target = self if inplace else self._copy()
        check = bool(inputs) if validate is None else validate
        return Edit(self, target, inputs, kwargs, check)

    def clear_edits(self) -> None:
        """Remove every persistent edit of this model."""
        self._edits.clear()
        self.__dict__.pop("_edit_copies", None)  # the runtime's copies of them: nothing keeps them alive now

    def __getstate__(self) -> dict:
        """What a pickle or deep copy keeps: not the runtime's relays (forwards bound to this process's modules, kept
        from one run to the next; a copy makes its own)."""
        state = dict(self.__dict__)
        state.pop("_relays", None)
        return state

    def _copy(self) -> "NNsight":
        """A wrapper of the same module (shared weights) with its own envoy tree and its own copy of the edits."""
        copy = object.__new__(type(self))
        for name, value in self.__dict__.items():
            if not isinstance(value, Envoy) and name not in ("_by_path", "_children", "_index", "_subtree",
                                                              "_edit_copies"):  # fmt: skip
                copy.__dict__[name] = value
        copy.__dict__["_edits"] = list(self._edits)
        Envoy.__init__(copy, self._module, "", None)
        return copy

    def trace(
        self,
        *inputs: Any,
        trace: bool = True,
        invoker_args: Optional[dict] = None,
        invoker_kwargs: Optional[dict] = None,
        scan: bool = False,
        validate: bool = False,
        remote: Any = False,
        backend: Any = None,
        method: Optional[str] = None,
        debug: Optional[bool] = None,
        blocking: bool = True,
        **kwargs: Any,
    ) -> Any:
        """``with model.trace(x) as tracer:`` records interventions and runs the model once on exit.

        ``kwargs`` go to the model's forward; ``invoker_args`` (alias ``invoker_kwargs``) to input preparation.
        With ``trace=False`` the model runs at once and its output is returned. ``scan=True`` gives proxies concrete
        shapes while tracing (a fake run first); ``validate=True`` also checks every operation on fake values.
        ``method="encode"`` runs that method of the wrapped module instead of its forward (the module's hooks fire
        wherever it calls its submodules). ``debug`` is accepted for nnsight 0.4's code: raysight's errors always
        name the user's line. ``blocking=False`` (nnsight's background NDIF requests) is refused with an error.
        """
        method = "forward" if method is None else self._method_name(method)
        if blocking is not True:
            _check_blocking(blocking)
        if remote and backend is None:
            backend = _backend_for(remote, backend)
        if not trace:  # run now; still through a trace, so persistent edits apply
            with Tracer(self, inputs, invoker_kwargs=invoker_args or invoker_kwargs, forward_kwargs=kwargs,
                        backend=backend, method=method):  # fmt: skip
                output = self.output.save()
            return output.value
        return Tracer(
            self,
            inputs,
            invoker_kwargs=invoker_args or invoker_kwargs,
            forward_kwargs=kwargs,
            backend=backend,
            method=method,
            scan=scan,
            validate=validate,
        )

    def _method_name(self, method: Any) -> str:
        """The method of the wrapped module a trace runs, checked: ``method=`` as given (``forward`` or another)."""
        if method == "forward":
            return "forward"
        if not isinstance(method, str) or not method.isidentifier() or method.startswith("_"):
            raise ValueError(f"method= names a public method of the wrapped module to run instead of its forward "
                             f"(e.g. method='encode'), got {method!r}")  # fmt: skip
        found = getattr(self._module, method, None)
        if isinstance(found, torch.nn.Module):
            raise AttributeError(f"method={method!r}: that is a submodule of {type(self._module).__name__}, not a "
                                 f"method; read it as `model.{method}` in a trace of the forward")  # fmt: skip
        if not callable(found):
            raise AttributeError(f"method={method!r}: {type(self._module).__name__} has no method {method!r}; name "
                                 "one of the wrapped module's methods, or leave method= out to run its forward")  # fmt: skip
        return method

    def scan(self, *inputs: Any, validate: bool = False, **kwargs: Any) -> Tracer:
        """``with model.scan(x): dim = model.layer1.output.shape[-1]`` — shapes from a fake run; nothing real runs."""
        return Tracer(self, inputs, forward_kwargs=kwargs, scan=True, validate=validate, execute=False)

    # -- extension points for model kinds -------------------------------------------------------------------
    def _prepare_input(self, *args: Any, **kwargs: Any) -> tuple[tuple, dict, int]:
        if not args and not kwargs:
            return (), {}, 0
        return args, kwargs, batch_size_of(args, kwargs)

    def _invoker_inputs(self, args: tuple, kwargs: dict) -> tuple:
        """What ``invoker.inputs`` shows: the invoke's prepared ``(args, kwargs)``, as in nnsight 0.4."""
        return (args, kwargs)

    def _batch_inputs(self, invokes: list[InvokeInputs]) -> tuple[tuple, dict]:
        prepared = [(inv.args, inv.kwargs, inv.batch_size) for inv in invokes if inv.batch_size]
        if not prepared:
            raise ValueError("no invoke of this trace was given an input; give at least one invoke an input")
        return concatenate_inputs(prepared)

    def _prepare_deferred(self, invoke: InvokeInputs, load: Any) -> InvokeInputs:
        """An invoke whose inputs come from earlier values of a session is prepared when it runs."""
        if invoke.batch_size >= 0:
            return invoke
        args, kwargs, batch_size = self._prepare_input(*load(invoke.args), **load(invoke.kwargs))
        return InvokeInputs(args, kwargs, batch_size)

    def session(self, remote: Any = False, backend: Any = None, validate: bool = False, debug: Optional[bool] = None,
                blocking: bool = True) -> Any:  # fmt: skip
        """``with model.session() as session:`` — traces, loops and plain operations run as one graph at exit.
        ``validate=True`` validates every trace opened in it (as ``trace(..., validate=True)``); ``debug`` and
        ``blocking`` as in :meth:`trace`."""
        from raysight.tracing.session import Session

        _check_blocking(blocking)
        return Session(backend=_backend_for(remote, backend), validate=validate)

    def _ensure_dispatched(self) -> None:
        """Load real weights before a local run (a wrapped module already has them)."""

    def dispatch_to(self, device_map: Any = "auto", max_memory: Optional[dict] = None) -> "NNsight":
        """Place the wrapped module on this process's GPUs, as a model actor with ``num_gpus`` does: ``"auto"``
        (or ``"balanced"``, ``"sequential"``, ...) shards it over the visible GPUs with accelerate (one GPU: the whole
        module moves there), a dict maps module paths to devices as accelerate's ``device_map`` does, a device name
        moves it whole. Inputs of later runs are moved to the device of the first module; without CUDA (and for
        ``"auto"``) it stays where it is."""
        module = self._module
        if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            if not torch.cuda.is_available():
                return self
            if torch.cuda.device_count() == 1:
                device_map = "cuda:0"
            else:
                from accelerate import infer_auto_device_map
                from accelerate.utils import get_balanced_memory

                if max_memory is None and device_map != "sequential":
                    max_memory = get_balanced_memory(module, low_zero=device_map == "balanced_low_0")
                device_map = infer_auto_device_map(module, max_memory=max_memory)
        if isinstance(device_map, (str, torch.device)):
            module.to(device_map)
            self.__dict__["_input_device"] = torch.device(device_map)
            return self
        if not isinstance(device_map, dict):
            raise TypeError(f"device_map must be 'auto', a device or a dict of module path -> device, got "
                            f"{type(device_map).__name__}")  # fmt: skip
        from accelerate import dispatch_model

        try:
            dispatch_model(module, device_map=device_map)
        except Exception as exc:
            raise RuntimeError(f"cannot place the model with device_map={device_map!r}: {exc}") from exc
        first = next(iter(device_map.values()))
        self.__dict__["_input_device"] = torch.device(f"cuda:{first}" if isinstance(first, int) else first)
        return self

    def _execute(self, method: str, args: tuple, kwargs: dict, dispatch: bool = True,
                 call: Optional[Callable] = None) -> Any:
        """Run the model's ``method`` (``forward``: call the module). ``call(target, args, kwargs)``, when given, is
        how the root is called (it delivers the root's events to a running graph): ``model.input``/``.output`` are
        the arguments and result of that call, the module's forward or the method named with ``trace(method=)``."""
        device = self.__dict__.get("_input_device")
        if device is not None and dispatch:  # placed by dispatch_to: inputs go where the first module is
            args, kwargs = _to_device(args, device), _to_device(kwargs, device)
        target = self._module if method == "forward" else getattr(self._module, method)  # (trace(method="encode"))
        if call is not None:
            return call(target, args, kwargs)
        return target(*args, **kwargs)

    def _ended_early(self, method: str, kwargs: dict, output: Any) -> Optional[str]:
        """Why the run made fewer module calls than asked for (reads of the missing calls are then skipped, not
        errors), or None: a forward pass always runs to its end."""
        return None

    def _batch_factors(self, method: str, kwargs: dict) -> tuple[int, ...]:
        """The k of a run that expands every input row into k rows next to each other (see runtime/batching.py):
        invokes then get their k-row blocks of such values. A forward pass expands nothing."""
        return ()

    def _scan_method(self, method: str) -> str:
        """The method a scan (fake run) of a trace running ``method`` calls: the same one."""
        return method

    def _module_at(self, path: str) -> torch.nn.Module:
        envoy = self._by_path.get(path)
        if envoy is None:
            return self._module.get_submodule(path)
        return envoy._module


def _check_blocking(blocking: Any) -> None:
    if blocking is not True:
        raise ValueError(f"blocking={blocking!r}: raysight runs every trace and session to the end before the `with` "
                         "block returns (nnsight 0.4's non-blocking NDIF requests have no counterpart); leave "
                         "blocking= out, and run independent work concurrently with a remote session or "
                         "raysight.extract")  # fmt: skip


def _backend_for(remote: Any, backend: Any) -> Any:
    """``remote=False``: run here; ``remote=True``: on a Ray actor holding the model (``raysight.serve`` or the
    default pool); ``remote="local"``: the full wire path in this process."""
    if backend is not None or not remote:
        return backend
    if remote == "local":
        from raysight.backends.wire import default_wire_backend

        return default_wire_backend()
    if remote is True:
        from raysight.backends.ray import default_ray_backend

        return default_ray_backend()
    raise ValueError(f"remote={remote!r}: use remote=True (a Ray actor), remote='local' (the serialized path in this "
                     "process) or remote=False")


class Edit:
    """The context of ``model.edit()``: records with a tracer that never runs, then stores the graph as an edit."""

    def __init__(self, model: NNsight, target: NNsight, inputs: tuple, kwargs: dict, validate: bool) -> None:
        self._target = target
        self._tracer = Tracer(model, inputs, invoker_kwargs=kwargs, validate=validate, execute=False)
        self._tracer.hook_calls = True  # as in nnsight 0.4: an attached module called in an edit is hooked, so
        # its .output (and its children's) can be read in later traces (see envoy._ATTACHED)

    def __enter__(self) -> NNsight:
        self._tracer.__enter__()
        return self._target

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self._tracer.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self._target._edits.append(self._tracer.graph)
        return False

