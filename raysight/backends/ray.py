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
from raysight.distributed.pool import DEFAULT_POOL, NAMESPACE, Pool, PoolConfig, registry, shared_pool_names
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
    detached: bool = False,
) -> Pool:
    """Start a named pool of ``replicas`` actors, each holding ``model`` (sharded over its ``num_gpus`` GPUs with
    ``device_map`` when it has GPUs). Remote runs of this model go to the pool; ``pool.shutdown()`` frees it.

    ``detached=True`` makes a *shared* pool: it outlives this driver, and every driver of the cluster can use it. The
    same call in another driver (or again in this one) finds the running pool instead of starting one, when ``model``
    matches the model it serves (same class, checkpoint and module tree; see :func:`model_fingerprint`): runs of the
    model then use the weights the pool loaded, and the other arguments are those the pool was started with."""
    init()
    reg = registry()
    reg.check_cluster()
    name = name or f"raysight-{_model_name(model)}"
    config = PoolConfig(name, replicas, num_gpus, num_cpus, device_map, max_retries, start_timeout_s, trusted,
                        limits or Limits(), detached)  # fmt: skip
    fingerprint = model_fingerprint(model) if detached else None
    with reg.lock:
        pool = reg.pools.get(name) or _attach(reg, name)
        if pool is not None:
            if not (detached and pool.shared):
                what = "a shared pool" if pool.shared else "a pool"
                fix = "pass detached=True to use it" if pool.shared else "shut it down first (`pool.shutdown()`)"
                raise ValueError(f"{what} named {name!r} is already running; {fix}, see raysight.pools(), or pass "
                                 "another name=")  # fmt: skip
            key = pool.adopt(model, fingerprint)
            reg.serving[key.rpartition("-")[0]] = name
            running = pool.config
            differ = [f"{field}={getattr(running, field)!r} (asked {getattr(config, field)!r})"
                      for field in ("replicas", "num_gpus", "num_cpus", "device_map", "trusted")
                      if getattr(running, field) != getattr(config, field)]  # fmt: skip
            if differ:
                logger.warning("the shared pool %r runs as it was started: %s; to change that, shut it down and "
                               "serve it again", name, ", ".join(differ))  # fmt: skip
            logger.info("using the shared pool %r for %s", name, _model_name(model))
            return pool
        pool = Pool(config)
        reg.pools[name] = pool
    key = model_key(model)
    try:
        pool.hold(key, model_ref(model, key), fingerprint, _model_name(model))
    except BaseException:
        pool.shutdown()
        raise
    with reg.lock:
        reg.serving[key.rpartition("-")[0]] = name  # by the model, whatever is attached to it later
    logger.info("pool %r serves %s with %d replica(s)", name, _model_name(model), replicas)
    return pool


def pools() -> list[Pool]:
    """The pools this driver started that are still running, and the shared pools running on the cluster (whichever
    driver started them)."""
    import ray

    if not ray.is_initialized():
        return []
    reg = registry()
    reg.check_cluster()
    running = set(shared_pool_names())
    for pool in [p for p in list(reg.pools.values()) if p.shared and p.name not in running]:
        pool.closed = True  # shut down by another driver
        reg.forget(pool)
    with reg.lock:
        for name in running:
            if name not in reg.pools:
                _attach(reg, name)
        return list(reg.pools.values())


def _attach(reg: Any, name: str) -> Optional[Pool]:
    """The shared pool ``name`` of the cluster, now one of this driver's pools (None when there is none); the caller
    holds ``reg.lock``."""
    pool = Pool.attach(name)
    if pool is not None:
        reg.pools[name] = pool
    return pool


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
        traced = None if request.method == "session" else model
        payload = encode_request(request, models, trusted=self.trusted, model=traced)
        keys = [model_key(m) for m in models]
        refs = {key: model_ref(m, key) for m, key in zip(models, keys)}
        if request.method == "session" and self.split:
            from raysight.distributed.planner import Plan, plan_session, run_split

            parts, pools = plan_session(request.graph, lambda m: self._pool_for([model_key(m)] if m else []))
            payload = self._restricted_for(pools, payload, request, traced)
            if len(parts) > 1:
                self.last_plan = Plan(parts, [p.name for p in pools])
                logger.debug("%s", self.last_plan)
                index = {id(m): i for i, m in enumerate(models)}
                return run_split(payload, parts, pools, lambda m: index[id(m)], keys, refs)
            self.last_plan = Plan(parts, [pools[0].name])
        pool = self._pool_for(keys)
        if request.method != "session" or not self.split:  # (a split session's pools were checked above)
            payload = self._restricted_for([pool], payload, request, traced)
        result = pool.run(payload, keys, refs)
        saved, logs = decode_result(result)
        relay_logs(logs)
        return saved

    def _restricted_for(self, pools: list[Pool], payload: bytes, request: Request, traced: Any) -> bytes:
        """The request encoded in restricted mode when a pool it runs on is restricted (``trusted=False``, a shared
        model service, say): a callable off the allow-list is then refused here, by name and with the user's line,
        before anything is sent (the pool would refuse it too, but could only say that a pickled value came)."""
        if not self.trusted or all(pool.config.trusted for pool in pools):
            return payload
        return encode_request(request, [], trusted=False, model=traced)

    def _pool_for(self, keys: list[str]) -> Pool:
        reg = registry()
        with reg.lock:
            if isinstance(self.pool, Pool):
                return self.pool
            if isinstance(self.pool, str):
                if self.pool not in reg.pools and _attach(reg, self.pool) is None:
                    running = sorted(set(reg.pools) | set(shared_pool_names()))
                    raise ValueError(f"no pool named {self.pool!r} is running; running pools: {running}")
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


def model_fingerprint(model: Any) -> str:
    """What a shared pool matches a client's model by: its class, its checkpoint (a ``LanguageModel``'s source and
    load arguments) and its module tree (every module's path and type, every parameter's name and shape). Not
    the weights: a driver's model of that shape runs with the weights the pool loaded (a client of a shared
    ``LanguageModel`` pool never loads them). Structure only, so it is the same on a meta-device model."""
    import hashlib

    state = model.__dict__
    module = state.get("_module", model)
    source = str(state.get("_source") or "")
    parts = [type(model).__qualname__, os.path.realpath(source) if source and os.path.exists(source) else source]
    load_kwargs = state.get("_load_kwargs")
    if isinstance(load_kwargs, dict):
        parts.append(repr(sorted((k, repr(v)) for k, v in load_kwargs.items() if k != "device_map")))
    parts += [f"{path}={type(m).__qualname__}" for path, m in module.named_modules()]
    parts += [f"{path}:{tuple(p.shape)}" for path, p in module.named_parameters()]  # (dtype: a loaded checkpoint's
    # may differ from its meta-device shape's; the dtype asked for is among the load arguments)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


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
