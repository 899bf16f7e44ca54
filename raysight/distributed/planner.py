"""The session planner (SPEC §7): a remote session split by its data dependencies into Ray tasks.

``split_session`` (graph/passes.py) cuts the session into parts: traces that share no data are separate parts, and
a chain of traces whose models live in different pools is cut where the pool changes. Every part goes to an actor
of its pool at once, with the parts it depends on passed as object refs: Ray starts a part when the parts before
it are done and hands it their values from the object store, so intermediate values go from actor to actor and
never through the client. Independent parts run at the same time on different replicas. The client then collects
each part's saved values in program order; the first failed part's error is raised, as a local run would raise it.
Once that error is known (no part still running could fail before it), or when the client is interrupted, the parts
still running are cancelled. A dead actor is replaced and the whole session run again (``max_retries`` of its
pool).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from raysight.errors import RemoteExecutionError
from raysight.graph.passes import Part, split_session

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """How a session ran: its parts and the pool of each (``RayBackend.last_plan``, for inspection)."""

    parts: list[Part]
    pools: list[str]

    def __str__(self) -> str:
        lines = [f"session plan: {len(self.parts)} part(s)"]
        for part, pool in zip(self.parts, self.pools):
            after = f", after part(s) {sorted(part.after)}" if part.after else ""
            lines.append(f"  part {part.index} on {pool!r}: top-level nodes {part.nodes}{after}; "
                         f"takes {sorted(part.needs)}, passes on {sorted(part.exports)}")  # fmt: skip
        return "\n".join(lines)


def plan_session(graph: Any, pool_of: Callable[[Any], Any]) -> tuple[list[Part], list[Any]]:
    """The parts of ``graph`` and the pool each runs on (``pool_of(model)``; parts are placed by pool name)."""
    pools: dict[str, Any] = {}

    def place(model: Any) -> str:
        pool = pool_of(model)
        pools[pool.name] = pool
        return pool.name

    parts = split_session(graph, place)
    if parts[0].label is None:  # a session that runs no model: wherever the default pool is
        parts[0].label = place(None)
    return parts, [pools[p.label] for p in parts]


def run_parts(payload: bytes, parts: list[Part], pools: list[Any], model_index: Callable[[Any], int],
              keys: list[str], refs: dict[str, Any]) -> list[tuple[str, Any]]:  # fmt: skip
    """Start every part, then wait for them; return each part's reply ``(status, value)`` in program order. An actor
    that died makes this raise ``_ActorDied`` after it is replaced (once every part is over).

    Parts still running are cancelled (``Pool.cancel``; their replies read ``("cancelled", None)``) once a failed
    part's error is the one to raise, that is when none of them could fail at an earlier node, and when the client
    stops waiting (``KeyboardInterrupt``, or any error here)."""
    import ray

    running: dict[int, tuple[Any, tuple, Any]] = {}  # part index -> (pool, replica, reply ref), until collected
    exports: dict[int, Any] = {}
    replies: list[tuple[str, Any]] = [("cancelled", None)] * len(parts)
    first_node = [min(part.nodes) for part in parts]  # (a trace's node comes before the nodes of its body)
    died = False
    try:
        for part, pool in zip(parts, pools):
            spec = {"nodes": part.nodes, "exports": sorted(part.exports), "needs": sorted(part.needs),
                    "models": sorted(model_index(m) for m in part.models.values())}  # fmt: skip
            imports = [exports[p] for p in sorted(part.after)]
            replica, (reply, exported) = pool.submit("run_part", keys, refs, payload, spec, *imports, num_returns=2)
            running[part.index] = (pool, replica, reply)
            exports[part.index] = exported
        while running and (died or not _error_decided(replies, running, first_node)):
            waiting = {reply: k for k, (_, _, reply) in running.items()}
            ready, _ = ray.wait(list(waiting), num_returns=1)
            for ref in ready:
                k = waiting[ref]
                pool, replica, reply = running[k]
                try:
                    replies[k] = ray.get(reply)
                except ray.exceptions.RayActorError as exc:
                    # this part's own actor died, or (ActorDiedError of an argument) the actor of a part before it
                    own = getattr(exc, "actor_id", None) in (None, replica[1]._actor_id.hex())
                    died = True
                    del running[k]
                    pool.done(replica, died=own)
                    replies[k] = ("died", None)
                    continue
                except ray.exceptions.RayTaskError as exc:  # a value could not travel between parts (unpicklable)
                    replies[k] = ("error", _travel_error(exc))
                del running[k]
                pool.done(replica)
    finally:
        for pool, replica, reply in running.values():  # not needed any more, or the client was interrupted
            pool.cancel(replica, reply)
    if died:
        raise _ActorDied()
    return replies


def _failing_node(info: dict) -> float:
    """The index of the node a part failed at (an error of no node, e.g. a model that did not load, ranks last)."""
    node = info.get("node")
    return float("inf") if node is None else node


def _error_decided(replies: list[tuple[str, Any]], running: dict[int, Any], first_node: list[int]) -> bool:
    """A part failed, and none of the parts still running could fail earlier in program order (all their nodes come
    after the failing one): its error is what the session raises, whatever they do."""
    failed = [_failing_node(value) for status, value in replies if status == "error"]
    return bool(failed) and all(first_node[k] > min(failed) for k in running)


def collect(replies: list[tuple[str, Any]], max_saved_bytes: Optional[int] = None) -> dict[int, Any]:
    """The saved values of all parts, their ``tracer.log`` lines printed in part order. When parts failed, the error
    of the failing node first in program order is raised (as a local run would raise it)."""
    from raysight.backends.wire import relay_logs
    from raysight.graph.serialize import WireError, decode_result

    failed = [(_failing_node(value), k) for k, (status, value) in enumerate(replies) if status == "error"]
    first = min(failed)[1] if failed else None
    size = sum(len(value) for status, value in replies if status == "ok")
    if first is None and max_saved_bytes is not None and size > max_saved_bytes:
        raise WireError(f"the session's saved values take {size} bytes over its parts, over the limit of "
                        f"{max_saved_bytes}; save less (e.g. slices or reductions) or raise Limits.max_saved_bytes")  # fmt: skip
    saved: dict[int, Any] = {}
    for k, (status, value) in enumerate(replies):
        if k == first:
            relay_logs(value.get("logs", ""))
            raise RemoteExecutionError.rebuild(value)
        if status == "ok":
            values, logs = decode_result(value)
            relay_logs(logs)
            saved.update(values)
    return saved


def _travel_error(exc: Any) -> dict:
    from raysight.distributed.actor import error_info

    cause = getattr(exc, "cause", None) or exc
    info = error_info(cause)
    info["message"] = (f"a value could not be passed between the parts of this session ({info['message']}); values "
                       "that later traces use must be picklable (tensors, numbers, lists, dicts)")  # fmt: skip
    return info


class _ActorDied(Exception):
    """An actor running a part died (it has been replaced); the session is run again."""


def run_split(payload: bytes, parts: list[Part], pools: list[Any], model_index: Callable[[Any], int],
              keys: list[str], refs: dict[str, Any]) -> dict[int, Any]:  # fmt: skip
    """:func:`run_parts` and :func:`collect`, run again when an actor died, up to the pools' ``max_retries``."""
    attempts = 1 + min(pool.config.max_retries for pool in pools)
    for attempt in range(attempts):
        try:
            replies = run_parts(payload, parts, pools, model_index, keys, refs)
        except _ActorDied:
            if attempt + 1 == attempts:
                raise RemoteExecutionError(
                    f"an actor running this session died {attempts} time(s); look for an intervention that ends the "
                    "process or runs out of memory"
                ) from None
            logger.warning("an actor running a part of the session died; replaced it, running the session again")
            continue
        return collect(replies, min(pool.config.limits.max_saved_bytes for pool in pools))
    raise AssertionError("unreachable")
