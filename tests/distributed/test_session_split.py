"""Remote sessions split by their data dependencies (SPEC §7), on a real local Ray cluster: independent traces run
at once on different replicas, a chain over two pools passes its values actor to actor, training stays on one
actor, errors and logs come back in program order, and the values equal plain PyTorch."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch
from helpers import MLP, notes_text

import raysight
from raysight.backends.ray import RayBackend

ray = pytest.importorskip("ray")


@pytest.fixture(autouse=True)
def _ray(ray_cluster: Any) -> None:
    """Every test here runs against the session's local Ray cluster."""



@pytest.fixture
def other() -> MLP:
    torch.manual_seed(5)
    return MLP()


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_independent_traces_run_at_once_on_different_replicas(mlp: MLP, x: torch.Tensor) -> None:
    model, backend = raysight.NNsight(mlp), RayBackend()
    pool = raysight.serve(model, replicas=2, name="split-two")
    try:
        with model.session(backend=backend):
            with model.trace(x):
                raysight.apply(_sleep, 1.0)
                first_pid = raysight.apply(os.getpid).save()
                first = model.output.save()
            with model.trace(x * 2):
                raysight.apply(_sleep, 1.0)
                second_pid = raysight.apply(os.getpid).save()
                second = model.output.save()
        assert len(backend.last_plan.parts) == 2
        assert first_pid.value != second_pid.value  # two replicas, one part each
        assert {first_pid.value, second_pid.value} == set(ray.get([a.pid.remote() for a in pool.actors]))
        with torch.no_grad():
            assert torch.allclose(first.value, mlp(x)) and torch.allclose(second.value, mlp(x * 2))
    finally:
        pool.shutdown()


def test_a_chain_over_two_pools_passes_values_between_actors(mlp: MLP, other: MLP, x: torch.Tensor) -> None:
    base, tuned, backend = raysight.NNsight(mlp), raysight.NNsight(other), RayBackend()
    pools = [raysight.serve(base, name="split-base"), raysight.serve(tuned, name="split-tuned")]
    try:
        with base.session(backend=backend):
            with base.trace(x):
                hidden = base.layer1.output[:, :5]  # not saved: it goes to the other pool's actor, not here
                base_pid = raysight.apply(os.getpid).save()
            with tuned.trace(hidden):
                out = tuned.output.save()
                tuned_pid = raysight.apply(os.getpid).save()
            with base.trace(out.sum(-1, keepdim=True).expand(3, 5)):
                final = base.output.save()
        plan = backend.last_plan
        assert plan.pools == ["split-base", "split-tuned", "split-base"]
        assert plan.parts[1].needs == {hidden.node.index} and plan.parts[1].after == {0}
        assert base_pid.value != tuned_pid.value
        with pytest.raises(ValueError):  # the intermediate never reached the client
            hidden.value
        with torch.no_grad():
            expected = other(mlp.layer1(x)[:, :5])
            assert torch.allclose(out.value, expected)
            assert torch.allclose(final.value, mlp(expected.sum(-1, keepdim=True).expand(3, 5)))
    finally:
        for pool in pools:
            pool.shutdown()


def test_a_training_loop_stays_on_one_actor_and_matches_a_local_run(mlp: MLP, x: torch.Tensor) -> None:
    def train(model: Any, backend: Any) -> tuple:
        with model.session(backend=backend) as session:
            bias = torch.nn.Parameter(torch.zeros(2))
            opt = torch.optim.SGD([bias], lr=0.5)
            with session.iter([x, x * 2]) as batch:
                with model.trace(batch):
                    loss = (model.output + bias).pow(2).sum()
                    loss.backward()
                opt.step()
                opt.zero_grad()
            with model.trace(x):
                after = (model.output + bias).save()
        return after.value, backend

    remote_after, backend = train(raysight.NNsight(mlp), RayBackend())
    assert len(backend.last_plan.parts) == 1
    local_after, _ = train(raysight.NNsight(mlp), raysight.backends.local.LocalBackend())
    assert torch.allclose(remote_after, local_after)
    bias = torch.zeros(2, requires_grad=True)  # the plain PyTorch loop
    opt = torch.optim.SGD([bias], lr=0.5)
    for batch in (x, x * 2):
        (mlp(batch) + bias).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert torch.allclose(remote_after, mlp(x) + bias)


def test_the_first_failing_part_is_raised_after_the_logs_of_those_before(mlp: MLP, other: MLP, x: torch.Tensor,
                                                                          capsys: Any) -> None:  # fmt: skip
    base, tuned, backend = raysight.NNsight(mlp), raysight.NNsight(other), RayBackend()
    pools = [raysight.serve(base, name="split-err-a"), raysight.serve(tuned, name="split-err-b")]
    try:
        with pytest.raises(RuntimeError, match="mat1 and mat2") as info:
            with base.session(backend=backend) as session:
                with base.trace(x):
                    session.log("first part ran")
                    hidden = base.layer1.output
                with tuned.trace(hidden[:, :7]):  # the wrong width for the tuned model's first layer
                    tuned.output.save()
                with base.trace(tuned.output if False else x):
                    base.output.save()
        assert isinstance(info.value, raysight.RemoteExecutionError)
        assert "test_session_split.py" in notes_text(info.value)  # the user's line of the failing trace
        assert "first part ran" in capsys.readouterr().out
    finally:
        for pool in pools:
            pool.shutdown()


def test_a_loop_and_an_independent_trace_split_and_equal_plain_pytorch(mlp: MLP, x: torch.Tensor) -> None:
    model, backend = raysight.NNsight(mlp), RayBackend()
    with model.session(backend=backend) as session:
        outs = raysight.list().save()
        with session.iter([x, x + 1, x - 1]) as batch:
            with model.trace(batch):
                outs.append(model.output)
        with model.trace(x * 3):
            alone = model.output.save()
    assert len(backend.last_plan.parts) == 2
    with torch.no_grad():
        for got, batch in zip(outs.value, [x, x + 1, x - 1]):
            assert torch.allclose(got, mlp(batch))
        assert torch.allclose(alone.value, mlp(x * 3))


def test_a_list_appended_to_on_two_pools_is_whole_where_it_is_read(mlp: MLP, other: MLP, x: torch.Tensor) -> None:
    base, tuned, backend = raysight.NNsight(mlp), raysight.NNsight(other), RayBackend()
    pools = [raysight.serve(base, name="split-list-a"), raysight.serve(tuned, name="split-list-b")]
    try:
        with base.session(backend=backend):
            outs = raysight.list().save()
            with base.trace(x):
                outs.append(base.output)
            with tuned.trace(x):
                outs.append(tuned.output)
            with base.trace(x):
                count = raysight.apply(len, outs).save()
        assert len(backend.last_plan.parts) == 3
        assert count.value == 2
        with torch.no_grad():
            assert len(outs.value) == 2  # the client gets the list as the last part left it
            assert torch.allclose(outs.value[0], mlp(x)) and torch.allclose(outs.value[1], other(x))
    finally:
        for pool in pools:
            pool.shutdown()


def test_of_two_failing_parts_the_error_first_in_program_order_is_raised(mlp: MLP, x: torch.Tensor) -> None:
    model, backend = raysight.NNsight(mlp), RayBackend()

    def session(backend: Any) -> None:
        with model.session(backend=backend):
            with model.trace(x):
                first = model.output
            with model.trace(x):  # independent of the others: its own part, after the first part in program order
                model.output[:, 100].save()
            with model.trace(first[:, :1].expand(3, 5)):  # with the first trace: part 0
                (model.output + first[:, 200]).save()

    with pytest.raises(IndexError) as local:
        session(raysight.backends.local.LocalBackend())
    with pytest.raises(IndexError) as remote:
        session(backend)
    assert len(backend.last_plan.parts) == 2 and backend.last_plan.parts[0].nodes[-1] > backend.last_plan.parts[1].nodes[0]
    assert "100" in str(local.value) and "100" in str(remote.value)


def test_the_saved_bytes_limit_holds_for_the_whole_split_session(mlp: MLP) -> None:
    from raysight.graph.schema import Limits

    model, backend = raysight.NNsight(mlp), RayBackend()
    big = torch.randn(64, 5)  # each trace saves 64 x 2 float32 = 512 bytes, plus the reply's header
    pool = raysight.serve(model, name="split-limit", limits=Limits(max_saved_bytes=1200))
    try:
        with model.session(backend=backend):  # one trace alone fits
            with model.trace(big):
                alone = model.output.save()
        assert alone.value.shape == (64, 2)
        with pytest.raises(raysight.graph.serialize.WireError, match="over its parts, over the limit of 1200"):
            with model.session(backend=backend):
                for scale in (1, 2, 3):
                    with model.trace(big * scale):
                        model.output.save()
        assert len(backend.last_plan.parts) == 3
    finally:
        pool.shutdown()
