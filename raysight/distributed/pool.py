"""Pools of model actors: replicas of :class:`~raysight.distributed.actor.ModelServer` behind one name.

``raysight.serve(model, replicas=2)`` starts a named pool holding that model; a remote run of a model that no
pool serves goes to the *default pool* (one replica, started on first use), whose actors load each model the first
time it is sent. A request goes to the replica with the fewest requests in flight. An actor that dies is replaced
and the request retried (``max_retries`` times); what a replica holds is rebuilt from the model kept in Ray's object
store, so a replacement needs nothing from the client. A request the client stops waiting for is cancelled
(:meth:`Pool.cancel`), and its actor serves the next one.
"""

from __future__ import annotations

import logging
import threading
import uuid
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any, Optional

from raysight.errors import RemoteExecutionError
from raysight.graph.schema import Limits

logger = logging.getLogger(__name__)

NAMESPACE = "raysight"
DEFAULT_POOL = "raysight-default"


@dataclass
class PoolConfig:
    """How a pool's actors are made. Validated here, so a bad value fails before any actor starts."""

    name: str
    replicas: int = 1
    num_gpus: float = 0
    num_cpus: float = 1
    device_map: Any = "auto"
    max_retries: int = 2
    start_timeout_s: float = 300.0  # how long serve() waits for every replica to start and load the model
    trusted: bool = True
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a pool needs a non-empty name, got {self.name!r}")
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas must be a positive integer, got {self.replicas!r}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError(f"num_gpus and num_cpus cannot be negative (got {self.num_gpus}, {self.num_cpus})")
        if self.max_retries < 0:
            raise ValueError(f"max_retries cannot be negative, got {self.max_retries}")


class Pool:
    """A named set of model actors. ``pool.run(...)`` sends one request; ``pool.shutdown()`` frees the actors."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._actors: list[Any] = []
        self._in_flight: list[int] = []
        self._models: dict[str, Any] = {}  # key -> ObjectRef of the pickled model, for replacements
        self.restarts = 0
        self.closed = False
        self._check_fits()
        for i in range(config.replicas):
            self._actors.append(self._start(i))
            self._in_flight.append(0)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def actors(self) -> list[Any]:
        return list(self._actors)

    def __repr__(self) -> str:
        state = "shut down" if self.closed else f"{len(self._actors)} replicas"
        return f"<raysight Pool {self.name!r}: {state}, {self.config.num_gpus} GPUs each, models {list(self._models)}>"

    # -- actors ---------------------------------------------------------------------------------------------
    def _check_fits(self) -> None:
        import ray

        c = self.config
        total_cpus = ray.cluster_resources().get("CPU", 0)
        if c.num_cpus * c.replicas > total_cpus:
            raise ValueError(
                f"pool {self.name!r}: {c.replicas} replica(s) x num_cpus={c.num_cpus:g} need "
                f"{c.num_cpus * c.replicas:g} CPUs, but the whole cluster has {total_cpus:g}; ask for fewer replicas "
                "or a smaller num_cpus (a fraction is fine), or add nodes"
            )
        need = c.num_gpus
        if need:
            per_node = [node.get("Resources", {}).get("GPU", 0) for node in ray.nodes() if node.get("Alive")]
            largest = max(per_node, default=0)
            if largest < need:
                raise ValueError(
                    f"pool {self.name!r}: each replica asks for {need} GPU(s), but the largest node of the cluster "
                    f"has {largest:g}; ask for fewer GPUs per replica (the model is sharded over the GPUs of one "
                    "actor), or add a node with more GPUs"
                )

    def _start(self, index: int) -> Any:
        from raysight.distributed.actor import actor_class

        c = self.config
        # one request at a time, in the order their arguments are ready: a part waiting for another part's values
        # does not hold up an independent one sent after it, and cancelling a call whose arguments are not ready
        # leaves the actor's queue whole (in order, Ray's actor would wait 30 s for the call it never gets, then drop
        # the calls queued behind it)
        options = {"num_cpus": c.num_cpus, "num_gpus": c.num_gpus, "max_concurrency": 1, "namespace": NAMESPACE,
                   "allow_out_of_order_execution": True,
                   "name": f"{c.name}-{index}-{uuid.uuid4().hex[:6]}"}  # fmt: skip
        return actor_class().options(**options).remote(c.limits, c.trusted, c.device_map, c.num_gpus)

    def hold(self, key: str, ref: Any) -> None:
        """Load a model on every replica now (``raysight.serve``): a load error surfaces here, not on first use."""
        import ray

        self._models[key] = ref
        results = [actor.load.remote(key, ref) for actor in self._actors]
        timeout = self.config.start_timeout_s
        try:
            ray.get(results, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            free = ray.available_resources()
            raise TimeoutError(
                f"pool {self.name!r}: its {len(results)} replica(s) did not start and load the model within "
                f"{timeout:g} s (num_cpus={self.config.num_cpus:g}, num_gpus={self.config.num_gpus:g} each; the "
                f"cluster has {free.get('CPU', 0):g} CPUs and {free.get('GPU', 0):g} GPUs free). Shut down pools "
                "you no longer need (raysight.pools()), ask for fewer resources, or raise start_timeout_s"
            ) from None
        except ray.exceptions.RayTaskError as exc:
            raise RemoteExecutionError(f"pool {self.name!r} could not load the model: {exc}") from None

    # -- requests -------------------------------------------------------------------------------------------
    def run(self, payload: bytes, keys: list[str], refs: dict[str, Any]) -> bytes:
        """Send one encoded request; return the encoded result (raises the run's error as the client's)."""
        return self.call("run", keys, refs, payload)

    def call(self, method: str, keys: list[str], refs: dict[str, Any], *args: Any,
             abandon: Optional[threading.Event] = None) -> Any:  # fmt: skip
        """Call the actor method ``method(*args, keys, refs)`` on the replica with the fewest requests in flight;
        a dead replica is replaced and the call retried; an error it reports is raised here as the client's. A client
        interrupted while it waits (``KeyboardInterrupt``) cancels the call (:meth:`cancel`), as does setting
        ``abandon`` (for calls waited on in another thread, which an interrupt does not reach): the call then raises
        ``concurrent.futures.CancelledError``."""
        import ray

        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            replica, ref = self.submit(method, keys, refs, *args)
            index = replica[0]
            try:
                if abandon is not None:
                    while not ray.wait([ref], timeout=0.2)[0]:
                        if abandon.is_set():
                            raise CancelledError(f"pool {self.name!r}: the caller no longer waits for this call")
                status, value = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self.done(replica, died=True)  # the pool stays whole whatever happens to this request
                if attempt + 1 == attempts:
                    raise RemoteExecutionError(
                        f"pool {self.name!r}: the actor running this request died {attempts} time(s); last: {exc}. "
                        "Look for an intervention that ends the process or runs out of memory"
                    ) from None
                logger.warning("pool %r: replica %d died (%s); replaced it, retrying", self.name, index,
                               type(exc).__name__)  # fmt: skip
                continue
            except BaseException:  # the client was interrupted while it waited (KeyboardInterrupt, ...)
                self.cancel(replica, ref)
                raise
            self.done(replica)
            if status == "error":
                from raysight.backends.wire import relay_logs

                relay_logs(value.get("logs", ""))
                raise RemoteExecutionError.rebuild(value)
            return value
        raise AssertionError("unreachable")

    def submit(self, method: str, keys: list[str], refs: dict[str, Any], *args: Any, num_returns: int = 1) -> tuple:
        """Start ``method(*args, keys, refs)`` on the replica with the fewest requests in flight without waiting:
        ``(replica, refs of its returns)``. The caller gets the results and then calls :meth:`done` (``replica``)."""
        if self.closed:
            raise RuntimeError(f"pool {self.name!r} was shut down; start another with raysight.serve(...)")
        for key, ref in refs.items():
            self._models.setdefault(key, ref)
        index = self._acquire()
        actor = self._actors[index]
        try:
            returns = getattr(actor, method).options(num_returns=num_returns).remote(*args, keys, refs)
        except BaseException:
            self._release(index)
            raise
        return (index, actor), returns

    def done(self, replica: tuple, died: bool = False) -> None:
        """The call started by :meth:`submit` on ``replica`` is over; ``died``: its actor died (replace it)."""
        index, actor = replica
        self._release(index)
        if died:
            self._replace(index, actor)

    def cancel(self, replica: tuple, returns: Any) -> None:
        """Cancel the call started by :meth:`submit` on ``replica`` (``returns``: its object refs), instead of
        :meth:`done`: the caller no longer wants its result. Ray drops a call still waiting for its arguments; a call
        that runs stops at its next module call (``ModelServer`` checks Ray's cancel flag), one queued on the actor
        within Ray's cancel retry interval (about 2 s) of starting. Its slot counts as in flight until the actor is
        done with it, so the next request goes to a free replica; the actor is not replaced."""
        import ray

        index, _ = replica
        ref = returns[0] if isinstance(returns, (list, tuple)) else returns
        try:
            ray.cancel(ref)
        except Exception as exc:  # finished, or Ray is shutting down: nothing to stop
            logger.debug("pool %r: could not cancel a call (%s)", self.name, exc)
        try:
            ref.future().add_done_callback(lambda _: self._release(index))
        except Exception:  # no future to wait on (Ray shut down): the call is over for this pool
            self._release(index)

    def _acquire(self) -> int:
        with self._lock:
            index = min(range(len(self._in_flight)), key=self._in_flight.__getitem__)
            self._in_flight[index] += 1
            return index

    def _release(self, index: int) -> None:
        with self._lock:
            self._in_flight[index] -= 1

    def _replace(self, index: int, dead: Any) -> None:
        with self._lock:
            if self._actors[index] is not dead:  # another thread replaced it already
                return
            self._actors[index] = self._start(index)
            self.restarts += 1

    def shutdown(self) -> None:
        """Kill the pool's actors and forget the pool (its name can be used again)."""
        import ray

        with self._lock:
            actors, self._actors = self._actors, []
            self.closed = True
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                logger.debug("pool %r: an actor was already gone at shutdown", self.name)
        _REGISTRY.forget(self)


class _Registry:
    """The pools of this driver, and which pool serves which model (by the model's key)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pools: dict[str, Pool] = {}
        self.serving: dict[str, str] = {}  # model (the key's first part) -> pool name
        self.refs: dict[str, Any] = {}  # model key -> ObjectRef of the pickled model
        self.cluster: Optional[str] = None  # the Ray job these belong to

    def check_cluster(self) -> None:
        """Pools and object refs belong to one Ray session: after ray.shutdown() / a new ray.init() start over."""
        import ray

        job = ray.get_runtime_context().get_job_id()
        if job != self.cluster:
            self.pools.clear()
            self.serving.clear()
            self.refs.clear()
            self.cluster = job

    def forget(self, pool: Pool) -> None:
        with self.lock:
            if self.pools.get(pool.name) is pool:
                del self.pools[pool.name]
            for key in [k for k, name in self.serving.items() if name == pool.name]:  # (keys of models)
                del self.serving[key]


_REGISTRY = _Registry()


def registry() -> _Registry:
    return _REGISTRY
