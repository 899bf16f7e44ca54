"""Pools of model actors: replicas of :class:`~raysight.distributed.actor.ModelServer` behind one name.

``raysight.serve(model, replicas=2)`` starts a named pool holding that model; a remote run of a model that no
pool serves goes to the *default pool* (one replica, started on first use), whose actors load each model the first
time it is sent. A request goes to the replica with the fewest requests in flight. An actor that dies is replaced
and the request retried (``max_retries`` times); what a replica holds is rebuilt from the model kept in Ray's object
store, so a replacement needs nothing from the client. A request the client stops waiting for is cancelled
(:meth:`Pool.cancel`), and its actor serves the next one.

A *shared* pool (``raysight.serve(model, name=..., detached=True)``, or ``raysight serve`` on the command line)
outlives the driver that started it: its actors are detached, and a :class:`PoolKeeper` (a detached actor named
``raysight-pool:<name>`` that takes no CPU) keeps its configuration, the models it serves and its replicas. Any
driver of the cluster finds it by name (``raysight.pools()``, ``serve`` with the same name, ``pool=``); a replica
that dies is restarted by Ray and reloads its models from the keeper, so it needs no particular driver.
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
KEEPER_PREFIX = "raysight-pool:"  # a shared pool's keeper is the detached actor KEEPER_PREFIX + its name


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
    detached: bool = False  # a shared pool: outlives this driver, found by name from any driver of the cluster

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

    def __init__(self, config: PoolConfig, _running: Optional[tuple] = None) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._actors: list[Any] = []
        self._in_flight: list[int] = []
        self._models: dict[str, Any] = {}  # key -> ObjectRef of the pickled model, for replacements
        self.fingerprints: dict[str, Optional[str]] = {}  # a shared pool's: model key -> model_fingerprint
        self.labels: dict[str, str] = {}  # a shared pool's: model key -> what the model is (its checkpoint's name)
        self._keeper: Any = None
        self.restarts = 0
        self.closed = False
        if _running is not None:  # a shared pool that runs already (see attach): use its actors
            self._keeper, actors, self.fingerprints, self.labels = _running
            self._actors, self._in_flight = list(actors), [0] * len(actors)
            return
        self._check_fits()
        if config.detached:
            self._keeper = _start_keeper(config)
        try:
            for i in range(config.replicas):
                self._actors.append(self._start(i))
                self._in_flight.append(0)
            if self._keeper is not None:
                import ray

                ray.get(self._keeper.set_replicas.remote(self._actors))
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def attach(cls, name: str) -> Optional["Pool"]:
        """The shared pool ``name`` running on the cluster (started by any driver), or None when there is none."""
        import ray

        try:
            keeper = ray.get_actor(KEEPER_PREFIX + name, namespace=NAMESPACE)
            info = ray.get(keeper.describe.remote())
        except (ValueError, ray.exceptions.RayActorError):  # no such actor, or it is being shut down
            return None
        return cls(info["config"], _running=(keeper, info["replicas"], info["fingerprints"], info["labels"]))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def shared(self) -> bool:
        """Whether the pool outlives its driver and serves every driver of the cluster (``detached=True``)."""
        return self.config.detached

    @property
    def actors(self) -> list[Any]:
        return list(self._actors)

    def __repr__(self) -> str:
        state = "shut down" if self.closed else f"{len(self._actors)} replicas"
        kind = "shared Pool" if self.shared else "Pool"
        models = list(self.labels.values()) if self.shared else list(self._models)
        return f"<raysight {kind} {self.name!r}: {state}, {self.config.num_gpus} GPUs each, models {models}>"

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
        if c.detached:  # Ray restarts a replica that dies, whichever driver is connected; it reloads from the keeper
            options.update(lifetime="detached", max_restarts=-1)
        return actor_class().options(**options).remote(c.limits, c.trusted, c.device_map, c.num_gpus, self._keeper)

    def hold(self, key: str, ref: Any, fingerprint: Optional[str] = None, label: str = "") -> None:
        """Load a model on every replica now (``raysight.serve``): a load error surfaces here, not on first use. A
        shared pool also keeps it on its keeper, with its ``fingerprint`` and ``label`` (what `raysight pools`
        shows)."""
        import ray

        self._models[key] = ref
        if self._keeper is not None:  # first, so that a replica restarted from now on finds the model there
            ray.get(self._keeper.remember.remote(key, ref, fingerprint, label))
            self.fingerprints[key], self.labels[key] = fingerprint, label
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
        if self.shared:  # Ray restarts it (max_restarts=-1), whichever driver is connected
            self._check_running()
            self._wait_restarted(dead)
            with self._lock:
                self.restarts += 1
            return
        with self._lock:
            if self._actors[index] is not dead:  # another thread replaced it already
                return
            self._actors[index] = self._start(index)
            self.restarts += 1

    def adopt(self, model: Any, fingerprint: str) -> str:
        """Route ``model`` to the model this shared pool serves, matched by fingerprint (see
        ``backends.ray.model_fingerprint``: its class, checkpoint and module tree, not its weights): the model takes
        the pool's key, so its runs use the weights the pool loaded. Returns the key."""
        for key, served in self.fingerprints.items():
            if served == fingerprint:
                model.__dict__["_remote_key"] = key.rpartition("-")[0]
                return key
        served = ", ".join(f"{self.labels.get(k, '?')} (fingerprint {f})" for k, f in self.fingerprints.items())
        raise ValueError(
            f"the shared pool {self.name!r} serves another model: {served}; this model's fingerprint is "
            f"{fingerprint!r} (its class, checkpoint or module tree differ). Pass another name= to start a pool for "
            "this model, or shut that one down (raysight.pools(), `raysight unserve NAME`)"
        )

    def _wait_restarted(self, actor: Any) -> None:
        """Until Ray's restart of a shared pool's replica answers (a call sent while it restarts fails as
        unavailable, and would use up the request's retries), for at most ``start_timeout_s``."""
        import time

        import ray

        deadline = time.monotonic() + self.config.start_timeout_s
        while True:
            try:
                ray.get(actor.pid.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    return  # the retry reports it
                time.sleep(0.2)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return  # dead for good (killed without restart) or still starting: the retry reports it

    def _check_running(self) -> None:
        """A shared pool whose keeper is gone was shut down (by another driver, say): forget it, and say so."""
        import ray

        try:
            ray.get(self._keeper.describe.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            self.closed = True
            _REGISTRY.forget(self)
            raise RuntimeError(f"the shared pool {self.name!r} was shut down (its keeper is gone); start it again "
                               "with raysight.serve(model, name=..., detached=True) or `raysight serve`") from None

    def shutdown(self) -> None:
        """Kill the pool's actors and forget the pool (its name can be used again). A shared pool stops for every
        driver of the cluster."""
        import ray

        with self._lock:
            actors, self._actors = self._actors, []
            self.closed = True
        if self._keeper is not None:  # a shared pool: for every driver (its name can be used again at once)
            actors.append(self._keeper)
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


class PoolKeeper:
    """A shared pool's record on the cluster: its configuration, the models it serves (pickled, by key, with their
    fingerprints) and its replicas. A detached actor that needs no CPU, named ``KEEPER_PREFIX + name``."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.models: dict[str, bytes] = {}
        self.fingerprints: dict[str, Optional[str]] = {}
        self.labels: dict[str, str] = {}
        self.replicas: list[Any] = []

    def remember(self, key: str, data: bytes, fingerprint: Optional[str], label: str) -> None:
        self.models[key] = data
        self.fingerprints[key], self.labels[key] = fingerprint, label

    def model(self, key: str) -> Optional[bytes]:
        return self.models.get(key)

    def set_replicas(self, replicas: list[Any]) -> None:
        self.replicas = list(replicas)

    def describe(self) -> dict[str, Any]:
        return {"config": self.config, "fingerprints": dict(self.fingerprints), "labels": dict(self.labels),
                "replicas": self.replicas}


def _start_keeper(config: PoolConfig) -> Any:
    import ray

    try:
        return (
            ray.remote(PoolKeeper)
            .options(name=KEEPER_PREFIX + config.name, namespace=NAMESPACE, lifetime="detached", num_cpus=0)
            .remote(config)
        )
    except ValueError as exc:  # another driver started a pool of that name just now
        raise ValueError(f"a shared pool named {config.name!r} already runs on the cluster ({exc}); call "
                         "raysight.serve again to use it, or pass another name=") from None


def shared_pool_names() -> list[str]:
    """The names of the shared pools running on the cluster (whichever driver started them)."""
    import ray.util

    return sorted(
        entry["name"][len(KEEPER_PREFIX):]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry.get("namespace") == NAMESPACE and entry["name"].startswith(KEEPER_PREFIX)
    )


def registry() -> _Registry:
    return _REGISTRY
