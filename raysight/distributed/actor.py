"""ModelServer: the Ray actor that holds models and runs wire requests against them.

An actor keeps every model it was sent (by the client's model key), loads real weights the first time one runs
(``LanguageModel`` ships as a shape on the meta device and loads from its checkpoint here), and answers each request
with the encoded saved values, or with a description of the error that a client turns back into an exception of
the same type, carrying the user's line. The class is plain Python; :func:`actor_class` makes it a Ray actor
class on first use, so importing this module does not import ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
import traceback
from typing import Any, Iterator, Optional

from raysight.backends.wire import serve, serve_part
from raysight.graph.schema import Limits
from raysight.graph.serialize import decode_request
from raysight.runtime.state import INTERRUPT, SKIPPED

logger = logging.getLogger(__name__)


class ModelServer:
    """One replica of a pool: ``run(payload, keys, refs)`` decodes a request against the models named by ``keys``
    (loading the missing ones from ``refs``), runs it and returns ``("ok", result_bytes)`` or ``("error", info)``."""

    def __init__(self, limits: Optional[Limits] = None, trusted: bool = True, device_map: Any = None,
                 num_gpus: float = 0, keeper: Any = None) -> None:  # fmt: skip
        self.limits = limits or Limits()
        self.trusted = trusted
        self.device_map = device_map
        self.num_gpus = num_gpus
        # a shared pool's PoolKeeper (distributed.pool): the models it serves, for an actor that Ray restarted after
        # it died, whichever driver (if any) is still connected
        self.keeper = keeper
        self.models: dict[str, Any] = {}
        self.jobs: dict[str, Any] = {}  # extraction jobs, decoded: (request, ShardJob)

    def load(self, key: str, model_bytes: Any) -> str:
        """Hold the model sent as ``model_bytes`` (cloudpickled) under ``key`` and load its weights now."""
        if key not in self.models:
            model = pickle.loads(model_bytes)
            load_kwargs = model.__dict__.get("_load_kwargs")
            if self.num_gpus and self.device_map is not None and isinstance(load_kwargs, dict):
                load_kwargs.setdefault("device_map", self.device_map)  # shard over this actor's GPUs
            elif self.num_gpus and self.device_map is not None and hasattr(model, "dispatch_to"):
                model.dispatch_to(self.device_map)  # a plain module: onto this actor's GPUs (accelerate)
            self.models[key] = model
        self.models[key]._ensure_dispatched()
        return key

    def run(self, payload: bytes, keys: list[str], refs: dict[str, Any]) -> tuple[str, Any]:
        try:
            with stops_when_cancelled() as watch:
                self._hold(keys, refs)
                watch.watch(self.models[key] for key in keys)
                result = serve(payload, self._resolver(keys), self.limits, self.trusted)
            return "ok", bytes(result)
        except Exception as exc:  # reported to the client, which raises it there with the same type and notes
            return "error", error_info(exc)

    def extract(self, job_key: str, job_ref: Any, first_id: int, batch: dict, keys: list[str],
                refs: dict[str, Any]) -> tuple[str, Any]:  # fmt: skip
        """One shard of an extraction: ``batch`` (rows from ``first_id``) through the job's graph, as an Arrow table.
        The job (graph, input template, outputs) is decoded once per actor and kept for the job's other shards."""
        try:
            with stops_when_cancelled() as watch:
                self._hold(keys, refs)
                decoded, job = self._extraction(job_key, job_ref, keys)
                model = self.models[keys[decoded.model]]
                watch.watch([model])
                return "ok", run_extraction_shard(model, decoded, job, first_id, batch, self.limits)
        except Exception as exc:
            return "error", error_info(exc)

    def run_part(self, payload: bytes, part: dict, *args: Any) -> tuple[tuple[str, Any], Optional[dict]]:
        """One part of a split session (called with ``num_returns=2``; ``args``: what earlier parts exported to it,
        resolved by Ray from the object store, then the model keys and refs): the reply for the client, and the values
        later parts take from this one. A part whose inputs failed is skipped; the client reports that error."""
        imports, keys, refs = args[:-2], args[-2], args[-1]
        if any(exported is None for exported in imports):
            return ("skipped", None), None
        used = set(part["models"])
        given: dict[int, Any] = {i: SKIPPED for i in part["needs"]}  # what an earlier part's cond skipped
        for exported in imports:
            given.update(exported)
        try:
            with stops_when_cancelled() as watch:
                self._hold([keys[i] for i in used], refs)
                watch.watch(self.models[keys[i]] for i in used)
                result, exports = serve_part(payload, self._resolver(keys, used), self.limits, self.trusted, part,
                                             given)  # fmt: skip
            return ("ok", result), exports
        except Exception as exc:
            return ("error", error_info(exc)), None

    def _resolver(self, keys: list[str], used: Optional[set] = None) -> Any:
        """Model index -> the model this request runs. A model and an edited copy of it share a key (edits travel
        per request): the second index of a key gets a copy sharing the weights, so each keeps its own edits.
        Models of other parts of a split session (not in ``used``) are never run here."""
        chosen: dict[int, Any] = {}
        taken: set[str] = set()

        def resolve(i: int) -> Any:
            if used is not None and i not in used:
                return _Elsewhere(keys[i])
            model = chosen.get(i)
            if model is None:
                held = self.models[keys[i]]
                model = chosen[i] = held._copy() if keys[i] in taken else held
                taken.add(keys[i])
            return model

        return resolve

    def _hold(self, keys: list[str], refs: dict[str, Any]) -> None:
        import ray

        for key in keys:
            if key not in self.models:
                data = ray.get(self.keeper.model.remote(key)) if self.keeper is not None else None
                if data is None:  # not the model the shared pool serves (or not a shared pool): the client's copy
                    ref = refs[key]
                    data = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
                self.load(key, data)

    def _extraction(self, job_key: str, job_ref: Any, keys: list[str]) -> tuple[Any, Any]:
        job = self.jobs.get(job_key)
        if job is None:
            import ray

            if not self.trusted:
                raise PermissionError("extraction sends its input template and preprocess by value; this pool is "
                                      "restricted (trusted=False): serve the model with trusted=True to extract")
            payload, shard_job = pickle.loads(ray.get(job_ref) if isinstance(job_ref, ray.ObjectRef) else job_ref)
            decoded = decode_request(payload, self.limits, True, lambda i: self.models[keys[i]])
            job = self.jobs[job_key] = (decoded, shard_job)
            while len(self.jobs) > 4:  # an actor serves a few jobs at a time; the oldest is done
                self.jobs.pop(next(iter(self.jobs)))
        return job

    def models_held(self) -> list[str]:
        return list(self.models)

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class Cancelled(RuntimeError):
    """The client cancelled the request this actor was running (``ray.cancel``: interrupted, or another part of its
    session failed)."""


@contextlib.contextmanager
def stops_when_cancelled(every_s: float = 0.05) -> Iterator[CancelWatch]:
    """Inside the block, the request stops with :class:`Cancelled` soon after the client cancelled this actor task.

    ``ray.cancel`` does not stop a running task of a regular (non-async) actor: Ray only sets a flag that the task
    may read (``ray.get_runtime_context().is_canceled()``, for the thread running the task). The block yields a
    :class:`CancelWatch` that reads it (at most every ``every_s`` seconds) in two places: between the nodes the
    request runs (a session loop that never calls the model, say), and in forward pre-hooks on the models given to
    :meth:`CancelWatch.watch`, so a cancelled forward pass or generation ends at its next layer. Outside a Ray actor
    (the class used directly) the watch does nothing."""
    import ray

    context = ray.get_runtime_context()
    try:
        context.is_canceled()
    except RuntimeError:  # not in a Ray worker, or an async actor
        yield CancelWatch(None, every_s)
        return
    watch = CancelWatch(context, every_s)
    token = INTERRUPT.set(watch.check)
    try:
        yield watch
    finally:
        INTERRUPT.reset(token)
        watch.remove()


class CancelWatch:
    """Reads Ray's cancel flag for one request; see :func:`stops_when_cancelled`."""

    def __init__(self, context: Any, every_s: float) -> None:
        self._context = context
        self._every_s = every_s
        self._next_check = 0.0
        self._handles: list[Any] = []
        self._watched: set[int] = set()

    def check(self, *_: Any) -> None:
        """Raise :class:`Cancelled` if the client cancelled the request (a forward pre-hook, or called bare)."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._every_s
            if self._context.is_canceled():
                raise Cancelled("the client cancelled this request (ray.cancel); it was stopped where it had got to")

    def watch(self, models: Any) -> None:
        """Check at the layers of these models (raysight models or modules), for this request only."""
        if self._context is None:
            return
        for model in models:
            for module in checkpoints(getattr(model, "_module", model)):
                if id(module) not in self._watched:
                    self._watched.add(id(module))
                    self._handles.append(module.register_forward_pre_hook(self.check))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._watched.clear()


def checkpoints(root: Any) -> list:
    """Where a cancelled forward pass stops: the root module, its children, and the elements of every
    ``ModuleList`` in it (a transformer's blocks). A few hooks, not one on every module: a hooked module takes
    torch's slow call path, and a global hook would put every module of the model there."""
    import torch

    found = {id(root): root}
    for child in root.children():
        found.setdefault(id(child), child)
    for module in root.modules():
        if isinstance(module, torch.nn.ModuleList):
            for child in module.children():
                found.setdefault(id(child), child)
    return list(found.values())


class _Elsewhere:
    """A model of the session that another part runs (its traces are not in this part, so it is never used here)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"model {self.key} runs in another part of this session, not on this actor")


def run_extraction_shard(model: Any, decoded: Any, job: Any, first_id: int, batch: dict, limits: Limits) -> Any:
    """Run one shard of a decoded extraction job on ``model``, with the client's edits, as :func:`serve` does."""
    from raysight.data.shard import run_shard

    model.__dict__["_edits"] = decoded.edits.get(decoded.model, [])
    # (tracer.log lines print on the actor, whose output Ray forwards to the driver)
    table = run_shard(model, decoded.graph, decoded.forward_kwargs, decoded.method, job, first_id, batch)
    if table.nbytes > limits.max_saved_bytes:
        raise ValueError(f"a shard's rows take {table.nbytes} bytes, over the pool's limit of "
                         f"{limits.max_saved_bytes}; use a smaller batch_size or raise Limits.max_saved_bytes")
    return table


def error_info(exc: BaseException) -> dict:
    """What a client needs to raise ``exc`` again: its type by name, message, notes and the remote traceback."""
    kind = type(exc)
    cause = getattr(exc, "__cause__", None)
    if type(exc).__name__.startswith("Remote") and cause is not None:  # RemoteExecutionError.wrap of the real error
        kind = type(cause)
    return {
        "module": kind.__module__,
        "name": kind.__qualname__,
        "message": str(exc),
        "notes": list(getattr(exc, "__notes__", [])),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "logs": getattr(exc, "_raysight_logs", ""),
        "node": getattr(exc, "_raysight_node", getattr(cause, "_raysight_node", None)),  # the failing node's index
    }


_ACTOR_CLASS: Any = None


def actor_class() -> Any:
    """``ray.remote(ModelServer)``, made once."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(ModelServer)
    return _ACTOR_CLASS
