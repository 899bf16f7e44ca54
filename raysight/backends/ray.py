"""RayBackend: run a request on a Ray actor that holds the model (``remote=True``).

The client encodes the request (the wire format of ``docs/wire-format.md``), names each model it uses by a key, and
puts each model once into Ray's object store (a ``LanguageModel`` that was never dispatched travels as a shape on
the meta device: the client never loads its weights; the actor loads them from the checkpoint). The pool that serves
the model (``raysight.serve``), or else the default pool, runs it; saved values come back as the encoded reply and
errors as the same exception types, with the user's line and the remote traceback as notes.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from typing import Any, Optional, Union

from raysight.backends.base import Request
from raysight.backends.wire import edits_set_aside, relay_logs
from raysight.distributed.pool import DEFAULT_POOL, NAMESPACE, Pool, PoolConfig, registry
from raysight.graph.schema import Limits
from raysight.graph.serialize import decode_result, encode_request

logger = logging.getLogger(__name__)


def init(address: Optional[str] = None, **ray_kwargs: Any) -> Any:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one in this process when
    there is none. Idempotent: when Ray is already initialized it changes nothing."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray_kwargs.setdefault("include_dashboard", False)  # the embedded default: nothing listens for others
    ray_kwargs.setdefault("namespace", NAMESPACE)
    ray_kwargs.setdefault("log_to_driver", True)  # tracer.log lines printed on an actor reach this process
    logger.info("starting Ray (%s)", f"address={address}" if address else "a local cluster in this process")
    ray.init(address=address, **ray_kwargs)
    return ray.get_runtime_context()


def serve(
    model: Any,
    replicas: int = 1,
    num_gpus: float = 0,
    device_map: Any = "auto",
    name: Optional[str] = None,
    *,
    num_cpus: float = 1,
    max_retries: int = 2,
    start_timeout_s: float = 300.0,
    trusted: bool = True,
    limits: Optional[Limits] = None,
) -> Pool:
    """Start a named pool of ``replicas`` actors, each holding ``model`` (sharded over its ``num_gpus`` GPUs with
    ``device_map`` when it has GPUs). Remote runs of this model go to the pool; ``pool.shutdown()`` frees it."""
    init()
    reg = registry()
    reg.check_cluster()
    name = name or f"raysight-{_model_name(model)}"
    config = PoolConfig(name, replicas, num_gpus, num_cpus, device_map, max_retries, start_timeout_s, trusted,
                        limits or Limits())  # fmt: skip
    with reg.lock:
        if name in reg.pools:
            raise ValueError(f"a pool named {name!r} is already running; shut it down first "
                             "(`pool.shutdown()`, see raysight.pools()) or pass another name=")  # fmt: skip
        pool = Pool(config)
        reg.pools[name] = pool
    key = model_key(model)
    try:
        pool.hold(key, model_ref(model, key))
    except BaseException:
        pool.shutdown()
        raise
    with reg.lock:
        reg.serving[key.rpartition("-")[0]] = name  # by the model, whatever is attached to it later
    logger.info("pool %r serves %s with %d replica(s)", name, _model_name(model), replicas)
    return pool


def pools() -> list[Pool]:
    """The pools this driver started that are still running."""
    import ray

    if not ray.is_initialized():
        return []
    reg = registry()
    reg.check_cluster()
    return list(reg.pools.values())


class RayBackend:
    """``model.trace(..., remote=True)``: run on the pool serving the model (``pool=`` to choose one)."""

    def __init__(self, pool: Union[str, Pool, None] = None, trusted: bool = True, split: bool = True) -> None:
        self.pool = pool
        self.trusted = trusted
        self.split = split  # sessions: independent parts run as concurrent tasks (SPEC §7); False: one actor
        self.last_plan: Any = None  # how the last split session ran (distributed.planner.Plan)

    def __call__(self, model: Any, request: Request) -> dict[int, Any]:
        init()
        registry().check_cluster()
        models: list[Any] = []
        payload = encode_request(request, models, trusted=self.trusted,
                                 model=None if request.method == "session" else model)  # fmt: skip
        keys = [model_key(m) for m in models]
        refs = {key: model_ref(m, key) for m, key in zip(models, keys)}
        if request.method == "session" and self.split:
            from raysight.distributed.planner import Plan, plan_session, run_split

            parts, pools = plan_session(request.graph, lambda m: self._pool_for([model_key(m)] if m else []))
            if len(parts) > 1:
                self.last_plan = Plan(parts, [p.name for p in pools])
                logger.debug("%s", self.last_plan)
                index = {id(m): i for i, m in enumerate(models)}
                return run_split(payload, parts, pools, lambda m: index[id(m)], keys, refs)
            self.last_plan = Plan(parts, [pools[0].name])
        result = self._pool_for(keys).run(payload, keys, refs)
        saved, logs = decode_result(result)
        relay_logs(logs)
        return saved

    def _pool_for(self, keys: list[str]) -> Pool:
        reg = registry()
        with reg.lock:
            if isinstance(self.pool, Pool):
                return self.pool
            if isinstance(self.pool, str):
                if self.pool not in reg.pools:
                    raise ValueError(f"no pool named {self.pool!r} is running; running pools: {sorted(reg.pools)}")
                return reg.pools[self.pool]
            for key in keys:  # a session runs where its first served model is
                name = reg.serving.get(key.rpartition("-")[0])
                if name is not None:
                    return reg.pools[name]
            pool = reg.pools.get(DEFAULT_POOL)
            if pool is None:
                logger.info("starting the default pool %r (one replica)", DEFAULT_POOL)
                pool = reg.pools[DEFAULT_POOL] = Pool(PoolConfig(DEFAULT_POOL, trusted=self.trusted))
            return pool


def model_key(model: Any) -> str:
    """The name a model goes by on the actors (an edited copy shares its model's key: edits travel per request).
    A module attached to the tree after the model was sent (``model.layer.sae = SAE()``) makes a new key, so the
    actors get the model again, with it."""
    base = model.__dict__.get("_remote_key")
    if base is None:
        base = model.__dict__["_remote_key"] = uuid.uuid4().hex
    return f"{base}-{len(model.__dict__.get('_by_path', ()))}"


def model_ref(model: Any, key: str) -> Any:
    """The model in Ray's object store (put once per Ray session), without its edits."""
    import cloudpickle
    import ray

    reg = registry()
    ref = reg.refs.get(key)
    if ref is None:
        with edits_set_aside(model):
            data = cloudpickle.dumps(model)
        ref = reg.refs[key] = ray.put(data)
    return ref


def _model_name(model: Any) -> str:
    source = model.__dict__.get("_source")
    if source:
        return os.path.basename(str(source).rstrip("/")) or type(model).__name__
    return type(model.__dict__.get("_module", model)).__name__


@functools.cache
def default_ray_backend() -> RayBackend:
    """The backend of ``remote=True`` (one per process)."""
    return RayBackend()


__all__ = ["RayBackend", "default_ray_backend", "init", "pools", "serve"]
