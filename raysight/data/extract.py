"""``raysight.extract``: a traced function over a whole dataset, streaming, to Arrow rows or Parquet files.

The driver reads the input in shards of ``batch_size`` rows (``sources.py``), traces ``fn`` once on the first
(``plan.py``), and sends each shard to the model's pool (or runs it here with ``remote=False``); a bounded number of
shards is in flight, so memory stays flat whatever the dataset's size. Each shard comes back as an Arrow table
(``shard.py``) and, with ``output=``, is written at once as a Parquet part (``sink.py``: local paths or any pyarrow
filesystem URI; a part is whole or absent). The directory records the job; a run that finds it skips the parts
already written, so a crashed extraction resumes and every input row is in the output exactly once, ordered by
``id`` (the row's position in the input).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import os
import threading
import uuid
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from raysight.backends.base import Request
from raysight.data.plan import Plan, plan_extraction
from raysight.data.shard import ShardJob, run_shard
from raysight.data.sink import Sink
from raysight.data.sources import as_source
from raysight.progress import progress_bar

logger = logging.getLogger(__name__)


def extract(
    model: Any,
    data: Any,
    fn: Callable[[Any, dict], dict],
    *,
    output: Union[str, os.PathLike, None] = None,
    batch_size: int = 32,
    remote: Union[bool, str] = True,
    pool: Any = None,
    preprocess: Optional[Callable[[dict], dict]] = None,
    keep_columns: Sequence[str] = (),
    strip_padding: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    max_in_flight: Optional[int] = None,
    progress: bool = True,
) -> Any:
    """Run ``fn(model, batch)`` over every row of ``data`` and return a ``ray.data.Dataset`` with one row per example:
    ``id``, ``tokens`` (for a ``LanguageModel``), the ``keep_columns``, and one tensor column per name ``fn``
    returns. ``fn`` opens one trace on a batch column and returns a dict of proxies::

        def fn(model, batch):
            with model.trace(batch["text"]):
                return {"h3": model.transformer.h[3].output[0]}

    ``output=`` writes Parquet files there (and the dataset reads them); a rerun resumes. ``remote=True`` runs the
    shards on the model's pool (``raysight.serve``, else the default pool), ``remote=False`` in this process.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if remote not in (True, False):
        raise ValueError(f"extract(remote=) is True (the model's Ray pool) or False (this process), got {remote!r}")
    source = as_source(data)
    shards = source.shards(batch_size)
    first = next(shards, None)
    if first is None:
        raise ValueError(f"the extraction's input ({source.description}) has no rows")
    plan = plan_extraction(model, fn, first[2], preprocess=preprocess, strip_padding=strip_padding,
                           keep_columns=tuple(keep_columns))  # fmt: skip
    sink = (Sink.directory_for(output, plan, source, first[2], batch_size, resume, overwrite) if output is not None
            else Sink())  # fmt: skip
    runner = _RayRunner(plan, pool, max_in_flight) if remote else _LocalRunner(plan)
    bar = progress_bar(source.total, "extract", enabled=progress)
    read = _Tally(first, shards)
    try:
        runner.run(iter(read), sink, bar)
    finally:
        bar.close()
    sink.finish(read.rows)
    return sink.dataset()


class _Tally:
    """The shards, the first one (read already) first, counting the rows read."""

    def __init__(self, first: Any, rest: Iterator) -> None:
        self.first, self.rest, self.rows = first, rest, 0

    def __iter__(self) -> Iterator:
        for shard in itertools.chain([self.first], self.rest):
            self.rows += len(next(iter(shard[2].values())))
            yield shard


def _shard_job(plan: Plan) -> ShardJob:
    return ShardJob(plan.inputs, plan.outputs, plan.preprocess, plan.strip_padding, plan.keep_columns)


class _LocalRunner:
    """Shards run one after another in this process."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def run(self, shards: Iterator, sink: "Sink", bar: Any) -> None:
        request, job = self.plan.request, _shard_job(self.plan)
        graph = request.graph
        for shard, first_id, batch in shards:
            rows = len(next(iter(batch.values())))
            if sink.has(shard):
                bar.update(rows)
                continue
            table = run_shard(self.plan.model, graph, request.forward_kwargs, request.method, job, first_id, batch)
            sink.put(shard, table)
            bar.update(rows)


class _RayRunner:
    """Shards run on the replicas of the model's pool, a bounded number at a time; results are kept in shard order
    by the sink, whatever order they finish in."""

    def __init__(self, plan: Plan, pool: Any, max_in_flight: Optional[int]) -> None:
        from raysight.backends.ray import RayBackend, init, model_key, model_ref
        from raysight.distributed.pool import registry

        init()
        registry().check_cluster()  # a Ray that was shut down and started again: forget its pools and refs
        self.plan = plan
        self.keys = [model_key(plan.model)]
        self.refs = {self.keys[0]: model_ref(plan.model, self.keys[0])}
        self.pool = RayBackend(pool)._pool_for(self.keys)
        if not self.pool.config.trusted:  # (its actors would refuse every shard; say so before any runs)
            raise PermissionError(f"pool {self.pool.name!r} is restricted (trusted=False): extraction sends its input "
                                  "template and preprocess by value, which a restricted pool refuses; extract on a "
                                  "pool served with trusted=True, or with remote=False")  # fmt: skip
        if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise ValueError(f"max_in_flight must be a positive int (or None: twice the replicas), got {max_in_flight!r}")
        self.in_flight = max_in_flight or 2 * max(1, len(self.pool.actors))

    def run(self, shards: Iterator, sink: "Sink", bar: Any) -> None:
        import cloudpickle
        import ray

        from raysight.graph.serialize import encode_request

        request = self.plan.request
        models: list[Any] = []
        template = Request(request.graph, [], request.forward_kwargs, request.method)
        payload = encode_request(template, models, trusted=True, model=self.plan.model)
        job_ref = ray.put(cloudpickle.dumps((payload, _shard_job(self.plan))))
        job_key = uuid.uuid4().hex
        abandon = threading.Event()  # set when the run fails or is interrupted: the shards in flight are cancelled
        with cf.ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="raysight-extract") as workers:
            running: dict[cf.Future, tuple[int, int]] = {}
            try:
                for shard, first_id, batch in shards:
                    rows = len(next(iter(batch.values())))
                    if sink.has(shard):
                        bar.update(rows)
                        continue
                    while len(running) >= self.in_flight:
                        self._collect(running, sink, bar, cf.FIRST_COMPLETED)
                    future = workers.submit(self.pool.call, "extract", self.keys, self.refs, job_key, job_ref,
                                            first_id, batch, abandon=abandon)  # fmt: skip
                    running[future] = (shard, rows)
                while running:
                    self._collect(running, sink, bar, cf.FIRST_COMPLETED)
            except BaseException:
                for future in running:
                    future.cancel()
                abandon.set()  # the shards that run are cancelled on their actors (Pool.cancel)
                self._keep_finished(running, sink)  # what finished is written, so a resume does not redo it
                raise

    @staticmethod
    def _collect(running: dict, sink: "Sink", bar: Any, when: str) -> None:
        done, _ = cf.wait(list(running), return_when=when)
        for future in done:
            shard, rows = running.pop(future)
            sink.put(shard, future.result())
            bar.update(rows)

    @staticmethod
    def _keep_finished(running: dict, sink: "Sink") -> None:
        cf.wait([f for f in running if not f.cancelled()])
        for future, (shard, _) in running.items():
            if not future.cancelled() and future.exception() is None:
                sink.put(shard, future.result())
