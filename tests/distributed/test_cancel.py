"""Cancelling remote work the client no longer waits for, on a real local Ray cluster: a split session whose first
failing part decides its error, or a client interrupted while it waits (a split session, a whole one, a trace),
cancels the Ray tasks still running. The actors stop at their next module call, are free for the next request at
once (not replaced), and the pools count nothing in flight afterwards."""

from __future__ import annotations

import _thread
import pathlib
import threading
import time
from typing import Any

import pytest
import torch
from helpers import MLP

import raysight
from raysight.backends.ray import RayBackend

ray = pytest.importorskip("ray")

SLOW_S = 8.0  # how long a slow forward pass runs when nothing stops it


@pytest.fixture(autouse=True)
def _ray(ray_cluster: Any) -> None:
    """Every test here runs against the session's local Ray cluster."""


class SlowNet(torch.nn.Module):
    """A forward pass that runs ``x[0, 0]`` seconds: it touches ``started-<s>`` in ``folder``, calls a small layer
    every 50 ms until the time is up, then touches ``finished-<s>``. Its output is its input when ``x[0, 0] == 0``."""

    def __init__(self, folder: pathlib.Path) -> None:
        super().__init__()
        self.step = torch.nn.Linear(5, 5)
        self.folder = str(folder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seconds = float(x[0, 0])
        pathlib.Path(self.folder, f"started-{seconds:g}").touch()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            x = self.step(x) * 0 + x  # the module call where a cancelled request stops
            time.sleep(0.05)
        pathlib.Path(self.folder, f"finished-{seconds:g}").touch()
        return x


def _input(seconds: float) -> torch.Tensor:
    x = torch.zeros(3, 5)
    x[0, 0] = seconds
    x[1:] = torch.arange(10.0).reshape(2, 5)
    return x


def _wait_for(path: str) -> None:
    """Block until ``path`` exists (at most 30 s): used inside a graph, so a part fails only once another runs."""
    deadline = time.monotonic() + 30
    while not pathlib.Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _interrupt_when(*paths: pathlib.Path) -> threading.Thread:
    """Interrupt the main thread (as Ctrl-C does) once every path exists; give up after 30 s."""

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(p.exists() for p in paths):
                _thread.interrupt_main()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _assert_free_and_whole(pool: Any, actors: list[Any]) -> None:
    """Every actor of ``pool`` answers at once (nothing runs there any more), none was replaced, and once the
    cancelled calls are over the pool counts nothing in flight."""
    assert pool.actors == actors and pool.restarts == 0
    start = time.monotonic()
    ray.get([actor.pid.remote() for actor in actors], timeout=20)
    assert time.monotonic() - start < 3.0, "a cancelled request kept its actor busy"
    deadline = time.monotonic() + 5
    while any(pool._in_flight) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool._in_flight == [0] * len(actors)


def test_a_failing_part_cancels_the_part_still_running(mlp: MLP, x: torch.Tensor, tmp_path: pathlib.Path) -> None:
    fast, slow, backend = raysight.NNsight(mlp), raysight.NNsight(SlowNet(tmp_path)), RayBackend()
    pools = [raysight.serve(fast, name="cancel-fast"), raysight.serve(slow, name="cancel-slow")]
    actors = pools[1].actors
    try:
        start = time.monotonic()
        with pytest.raises(IndexError, match="100"):
            with fast.session(backend=backend):
                with fast.trace(x):  # first in program order: its error is the session's, whatever the other does
                    raysight.apply(_wait_for, str(tmp_path / f"started-{SLOW_S:g}"))  # the slow part is running
                    fast.output[:, 100].save()
                with slow.trace(_input(SLOW_S)):
                    slow.output.save()
        assert time.monotonic() - start < SLOW_S - 2, "the error waited for the slow part"
        assert backend.last_plan.pools == ["cancel-fast", "cancel-slow"]
        assert (tmp_path / f"started-{SLOW_S:g}").exists()
        _assert_free_and_whole(pools[1], actors)
        assert not (tmp_path / f"finished-{SLOW_S:g}").exists()  # it stopped early
        assert pools[0]._in_flight == [0]
        with slow.trace(_input(0), remote=True):  # the same actor runs the next request
            out = slow.output.save()
        assert torch.equal(out.value, _input(0)) and (tmp_path / "finished-0").exists()
    finally:
        for pool in pools:
            pool.shutdown()


def test_an_error_that_a_running_part_could_precede_waits_for_it(mlp: MLP, x: torch.Tensor,
                                                                  tmp_path: pathlib.Path) -> None:  # fmt: skip
    fast, slow, backend = raysight.NNsight(mlp), raysight.NNsight(SlowNet(tmp_path)), RayBackend()
    pools = [raysight.serve(fast, name="precede-fast"), raysight.serve(slow, name="precede-slow")]
    try:
        with pytest.raises(IndexError, match="200"):  # the slow part's error, first in program order
            with fast.session(backend=backend):
                with slow.trace(_input(1.5)):
                    slow.output[:, 200].save()
                with fast.trace(x):
                    fast.output[:, 100].save()  # fails at once, but after the slow part's node
        assert backend.last_plan.pools == ["precede-slow", "precede-fast"]
        assert (tmp_path / "finished-1.5").exists()  # not cancelled: it was waited for
    finally:
        for pool in pools:
            pool.shutdown()


def test_an_interrupted_split_session_cancels_its_parts(tmp_path: pathlib.Path) -> None:
    slow, backend = raysight.NNsight(SlowNet(tmp_path)), RayBackend()
    pool = raysight.serve(slow, replicas=2, name="cancel-split")
    actors = pool.actors
    try:
        watcher = _interrupt_when(tmp_path / f"started-{SLOW_S:g}", tmp_path / f"started-{SLOW_S + 1:g}")
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            with slow.session(backend=backend):
                with slow.trace(_input(SLOW_S)):
                    slow.output.save()
                with slow.trace(_input(SLOW_S + 1)):
                    slow.output.save()
        watcher.join()
        assert time.monotonic() - start < SLOW_S - 2
        assert len(backend.last_plan.parts) == 2
        _assert_free_and_whole(pool, actors)
        assert not list(tmp_path.glob("finished-*"))
        with slow.session(backend=backend):  # the pool runs the next session on both replicas
            with slow.trace(_input(0)):
                first = slow.output.save()
            with slow.trace(_input(0) * 2):
                second = slow.output.save()
        assert torch.equal(first.value, _input(0)) and torch.equal(second.value, _input(0) * 2)
        assert pool._in_flight == [0, 0]
    finally:
        pool.shutdown()


@pytest.mark.parametrize("how", ["trace", "whole session"])
def test_an_interrupted_remote_run_cancels_it(how: str, tmp_path: pathlib.Path) -> None:
    slow = raysight.NNsight(SlowNet(tmp_path))
    pool = raysight.serve(slow, name=f"cancel-{how.replace(' ', '-')}")
    actors = pool.actors
    try:
        watcher = _interrupt_when(tmp_path / f"started-{SLOW_S:g}")
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            if how == "trace":
                with slow.trace(_input(SLOW_S), remote=True):
                    slow.output.save()
            else:
                with slow.session(backend=RayBackend(split=False)):
                    with slow.trace(_input(SLOW_S)):
                        slow.output.save()
                    with slow.trace(_input(SLOW_S)):
                        slow.output.save()
        watcher.join()
        assert time.monotonic() - start < SLOW_S - 2
        _assert_free_and_whole(pool, actors)
        assert not list(tmp_path.glob("finished-*"))
        with slow.trace(_input(0), remote=True):
            out = slow.output.save()
        assert torch.equal(out.value, _input(0))
    finally:
        pool.shutdown()


def test_an_interrupted_chain_leaves_the_pool_that_waited_usable(mlp: MLP, x: torch.Tensor,
                                                                  tmp_path: pathlib.Path) -> None:  # fmt: skip
    slow, fast, backend = raysight.NNsight(SlowNet(tmp_path)), raysight.NNsight(mlp), RayBackend()
    pools = [raysight.serve(slow, name="chain-slow"), raysight.serve(fast, name="chain-fast")]
    actors = [pool.actors for pool in pools]
    try:
        watcher = _interrupt_when(tmp_path / f"started-{SLOW_S:g}")
        with pytest.raises(KeyboardInterrupt):
            with slow.session(backend=backend):
                with slow.trace(_input(SLOW_S)):
                    hidden = slow.output
                with fast.trace(hidden):  # waits for the slow part's value: cancelled before it could start
                    fast.output.save()
        watcher.join()
        assert backend.last_plan.pools == ["chain-slow", "chain-fast"]
        for pool, held in zip(pools, actors):
            _assert_free_and_whole(pool, held)
        with fast.trace(x, remote=True):
            out = fast.output.save()
        with torch.no_grad():
            assert torch.allclose(out.value, mlp(x))
    finally:
        for pool in pools:
            pool.shutdown()


class FailOnceSlowRuns:
    """An extraction preprocess: the batch whose first value is negative fails, once the slow batch has started."""

    def __init__(self, started: str) -> None:
        self.started = started

    def __call__(self, batch: dict) -> dict:
        x = torch.tensor(batch["x"])
        if float(x[0, 0]) < 0:
            _wait_for(self.started)
            raise RuntimeError("this batch is bad")
        return {**batch, "x": x}


def _slow_output(model: Any, batch: dict) -> dict:
    with model.trace(batch["x"]):
        return {"out": model.output}


def test_a_failed_extraction_cancels_the_shards_still_running(tmp_path: pathlib.Path) -> None:
    """Shard 0 runs for SLOW_S seconds on one replica; shard 1 fails on the other once shard 0 runs. The error comes
    back at once, shard 0 is cancelled on its actor (it never finishes), and the pool is whole and free."""
    slow = raysight.NNsight(SlowNet(tmp_path))
    pool = raysight.serve(slow, replicas=2, name="cancel-extract")
    actors = pool.actors
    started = tmp_path / f"started-{SLOW_S:g}"
    rows = [{"x": [SLOW_S, 0.0, 1.0, 2.0, 3.0]}, {"x": [-1.0, 0.0, 0.0, 0.0, 0.0]}]  # shard 0 is slow, shard 1 fails
    try:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="this batch is bad"):
            raysight.extract(slow, rows, _slow_output, batch_size=1, pool=pool, output=tmp_path / "out",
                             preprocess=FailOnceSlowRuns(str(started)), progress=False)  # fmt: skip
        assert time.monotonic() - start < SLOW_S - 2, "the error waited for the slow shard"
        assert started.exists()
        _assert_free_and_whole(pool, actors)
        assert not (tmp_path / f"finished-{SLOW_S:g}").exists()  # cancelled, not run to its end
        assert not list((tmp_path / "out").glob("part-*.parquet"))  # nothing half-done was written
    finally:
        pool.shutdown()


def _touch(path: str, *after: Any) -> None:
    """Touch ``path`` (``after``: values it must wait for, so it runs after the nodes that make them)."""
    pathlib.Path(path).touch()


def test_an_interrupted_session_loop_that_never_calls_a_model_stops(tmp_path: pathlib.Path) -> None:
    """A loop of plain nodes (no module call, so no layer hook sees it) stops between nodes once cancelled. The
    session's trace of ``slow`` puts it on ``slow``'s pool (a session of plain nodes only would go to the default
    pool, whose start the timing would include)."""
    slow = raysight.NNsight(SlowNet(tmp_path))
    pool = raysight.serve(slow, name="cancel-loop")
    actors = pool.actors
    try:
        watcher = _interrupt_when(tmp_path / "loop-started")
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            with slow.session(backend=RayBackend(split=False)) as session:
                with slow.trace(_input(0)):
                    hidden = slow.output
                raysight.apply(_touch, str(tmp_path / "loop-started"), hidden)
                with session.iter(range(int(SLOW_S / 0.02))):  # SLOW_S seconds of 20 ms steps
                    raysight.apply(time.sleep, 0.02)
                raysight.apply(_touch, str(tmp_path / "loop-finished"))
        watcher.join()
        assert time.monotonic() - start < SLOW_S - 2
        _assert_free_and_whole(pool, actors)
        assert not (tmp_path / "loop-finished").exists()
    finally:
        pool.shutdown()


def test_only_the_layers_are_watched_for_a_cancel_and_only_while_a_request_runs() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from raysight.distributed.actor import checkpoints

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    expected = {id(model), id(model.transformer), id(model.lm_head), *(id(block) for block in model.transformer.h)}
    assert {id(m) for m in checkpoints(model)} == expected
    assert len(checkpoints(model)) == len(expected) == 6

    @ray.remote
    def hooks_during_and_after(module: torch.nn.Module) -> tuple[list[int], list[int]]:
        from raysight.distributed.actor import stops_when_cancelled

        def counts() -> list[int]:
            return [len(m._forward_pre_hooks) for m in module.modules()]

        with stops_when_cancelled() as watch:
            watch.watch([raysight.NNsight(module)])
            watch.watch([module])  # a module watched twice gets one hook
            during = counts()
        return during, counts()

    during, after = ray.get(hooks_during_and_after.remote(model), timeout=60)
    assert during == [1 if id(m) in expected else 0 for m in model.modules()]
    assert after == [0] * len(during)
