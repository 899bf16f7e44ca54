"""NNsight: wrap any ``torch.nn.Module`` so its internals can be read and edited with ``model.trace(...)``.

The wrapper is the root :class:`~raysight.envoy.Envoy`. Subclasses adapt three steps to their kind of model:
``_prepare_input`` (one invoke's inputs and batch size), ``_batch_inputs`` (several invokes into one batch) and
``_execute`` (run the module).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from raysight.backends.base import InvokeInputs
from raysight.envoy import Envoy
from raysight.runtime.batching import batch_size_of, concatenate_inputs
from raysight.tracing.tracer import Tracer


class NNsight(Envoy):
    """``model = raysight.NNsight(module, rename={"transformer.h": "layers"})``."""

    def __init__(self, module: torch.nn.Module, rename: Optional[dict[str, str]] = None) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"NNsight wraps a torch.nn.Module, got {type(module).__name__}")
        self.__dict__["_rename"] = dict(rename or {})
        super().__init__(module, "", None)

    def trace(
        self,
        *inputs: Any,
        trace: bool = True,
        invoker_args: Optional[dict] = None,
        invoker_kwargs: Optional[dict] = None,
        backend: Any = None,
        **kwargs: Any,
    ) -> Any:
        """``with model.trace(x) as tracer:`` records interventions and runs the model once on exit.

        ``kwargs`` go to the model's forward; ``invoker_args`` (alias ``invoker_kwargs``) to input preparation.
        With ``trace=False`` the model runs at once and its output is returned.
        """
        if not trace:
            args, kw, _ = self._prepare_input(*inputs, **(invoker_args or invoker_kwargs or {}))
            return self._execute("forward", args, {**kw, **kwargs})
        return Tracer(
            self,
            inputs,
            invoker_kwargs=invoker_args or invoker_kwargs,
            forward_kwargs=kwargs,
            backend=backend,
        )

    # -- extension points for model kinds -------------------------------------------------------------------
    def _prepare_input(self, *args: Any, **kwargs: Any) -> tuple[tuple, dict, int]:
        if not args and not kwargs:
            return (), {}, 0
        return args, kwargs, batch_size_of(args, kwargs)

    def _batch_inputs(self, invokes: list[InvokeInputs]) -> tuple[tuple, dict]:
        prepared = [(inv.args, inv.kwargs, inv.batch_size) for inv in invokes if inv.batch_size]
        if not prepared:
            raise ValueError("no invoke of this trace was given an input; give at least one invoke an input")
        return concatenate_inputs(prepared)

    def _execute(self, method: str, args: tuple, kwargs: dict) -> Any:
        return self._module(*args, **kwargs)

    def _module_at(self, path: str) -> torch.nn.Module:
        envoy = self._by_path.get(path)
        if envoy is None:
            return self._module.get_submodule(path)
        return envoy._module
