"""Model actors and pools on a real local Ray cluster (SPEC §6): init, serve, pools, routing, replicas, dead actors,
errors and logs coming back, and a LanguageModel that the client never loads."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import pytest
import torch
from helpers import MLP
from lm_helpers import bert_tokenizer, build_lm, encode, oracle_forward, oracle_generate

import raysight
from raysight.backends.ray import model_key

ray = pytest.importorskip("ray")


@pytest.fixture(autouse=True)
def _ray(ray_cluster: Any) -> None:
    """Every test here runs against the session's local Ray cluster."""



def _pid_of_run(model: raysight.NNsight, x: torch.Tensor) -> int:
    with model.trace(x, remote=True):
        pid = raysight.apply(os.getpid).save()
    return pid.value


def _wait_until_dead(actor: Any) -> None:
    """Block until ``actor`` answers with RayActorError (``ray.kill`` acts asynchronously); fail after 30 s."""
    deadline = time.monotonic() + 30
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(actor.pid.remote(), timeout=30)
            time.sleep(0.2)


def test_init_is_idempotent() -> None:
    first = raysight.init()
    again = raysight.init(num_cpus=64)  # already running: nothing changes
    assert ray.is_initialized()
    assert first.get_job_id() == again.get_job_id()
    assert ray.cluster_resources()["CPU"] == 8  # what the first init asked for (tests/conftest.py)


def test_remote_trace_returns_the_values_of_the_local_run(mlp: MLP, x: torch.Tensor) -> None:
    model = raysight.NNsight(mlp)
    with model.trace(x, remote=True):
        hidden = model.layer1.output.clone().save()
        model.layer1.output[:, :3] = 0
        out = model.output.save()
    with torch.no_grad():
        h = mlp.layer1(x)
        edited = h.clone()
        edited[:, :3] = 0
        expected = mlp.layer2(edited)
    assert torch.allclose(hidden.value, h)
    assert torch.allclose(out.value, expected)
    assert _pid_of_run(model, x) != os.getpid()  # it really ran in another process


def test_serve_starts_a_named_pool_that_runs_the_models_traces(mlp: MLP, x: torch.Tensor) -> None:
    model = raysight.NNsight(mlp)
    pool = raysight.serve(model, replicas=2, name="mlp-pool")
    actors = pool.actors
    try:
        assert pool in raysight.pools() and pool.name == "mlp-pool"
        pids = set(ray.get([actor.pid.remote() for actor in pool.actors]))
        assert len(pids) == 2
        for actor in pool.actors:  # serve loads the model on every replica up front
            assert ray.get(actor.models_held.remote()) == [model_key(model)]
        assert _pid_of_run(model, x) in pids
        with model.trace(x, remote=True):
            out = model.output.save()
        with torch.no_grad():
            assert torch.allclose(out.value, mlp(x))
    finally:
        pool.shutdown()
    assert pool not in raysight.pools()
    _wait_until_dead(actors[0])  # its actors are gone


def test_concurrent_requests_go_to_different_replicas(mlp: MLP, x: torch.Tensor) -> None:
    model = raysight.NNsight(mlp)
    pool = raysight.serve(model, replicas=2, name="mlp-concurrent")
    barrier = threading.Barrier(2)
    pids: list[int] = []

    def slow_run() -> None:
        barrier.wait()
        with model.trace(x, remote=True):
            raysight.apply(_sleep, 1.0)
            pid = raysight.apply(os.getpid).save()
        pids.append(pid.value)

    try:
        threads = [threading.Thread(target=slow_run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(set(pids)) == 2, "two requests in flight at once should use both replicas"
    finally:
        pool.shutdown()


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_a_killed_actor_is_replaced_and_the_request_runs(mlp: MLP, x: torch.Tensor) -> None:
    model = raysight.NNsight(mlp)
    pool = raysight.serve(model, name="mlp-kill")
    try:
        before = _pid_of_run(model, x)
        killed = pool.actors[0]
        ray.kill(killed)
        _wait_until_dead(killed)  # ray.kill acts asynchronously: a request sent at once may still reach it
        with model.trace(x, remote=True):
            out = model.output.save()
        with torch.no_grad():
            assert torch.allclose(out.value, mlp(x))
        assert pool.restarts == 1
        assert _pid_of_run(model, x) != before
    finally:
        pool.shutdown()


def test_an_actor_dying_in_flight_is_retried_then_reported(mlp: MLP, x: torch.Tensor) -> None:
    model = raysight.NNsight(mlp)
    pool = raysight.serve(model, name="mlp-exit", max_retries=1)
    try:
        with pytest.raises(raysight.RemoteExecutionError, match=r"died 2 time\(s\)"):
            with model.trace(x, remote=True):
                raysight.apply(os._exit, 1)  # the process running the request ends
        assert pool.restarts == 2  # retried once, and the pool replaced the second dead actor too
        with model.trace(x, remote=True):  # the pool still serves
            out = model.output.save()
        with torch.no_grad():
            assert torch.allclose(out.value, mlp(x))
    finally:
        pool.shutdown()


def test_an_intervention_error_comes_back_with_its_type_and_the_users_line(mlp: MLP, x: torch.Tensor) -> None:
    model = raysight.NNsight(mlp)
    with pytest.raises(IndexError) as info:
        with model.trace(x, remote=True):
            model.layer1.output[:, 99].save()  # the line the error must name
    assert isinstance(info.value, raysight.RemoteExecutionError)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "test_pools.py" in notes and "model.layer1.output[:, 99].save()" in notes
    assert "traceback where it ran" in notes


def test_raysight_errors_come_back_as_themselves(mlp: MLP, x: torch.Tensor) -> None:
    model = raysight.NNsight(mlp)
    with pytest.raises(raysight.OutOfOrderError, match="model.layer1.output"):
        with model.trace(x, remote=True):
            model.layer2.output.save()
            model.layer1.output.save()


def test_tracer_log_lines_reach_the_client(mlp: MLP, x: torch.Tensor, capsys: Any) -> None:
    model = raysight.NNsight(mlp)
    with model.trace(x, remote=True) as tracer:
        tracer.log("shape", model.layer1.output.shape)
    assert "shape torch.Size([3, 10])" in capsys.readouterr().out


def test_a_pool_that_needs_more_gpus_than_a_node_has_is_refused(mlp: MLP) -> None:
    with pytest.raises(ValueError, match=r"asks for 1 GPU\(s\), but the largest node of the cluster has 0"):
        raysight.serve(raysight.NNsight(mlp), num_gpus=1, name="too-big")
    assert "too-big" not in [p.name for p in raysight.pools()]


def test_a_pool_larger_than_the_cluster_is_refused(mlp: MLP) -> None:
    with pytest.raises(ValueError, match=r"need 16 CPUs, but the whole cluster has 8"):
        raysight.serve(raysight.NNsight(mlp), replicas=16, name="too-many")


def test_a_pool_that_cannot_start_in_time_says_what_is_missing(mlp: MLP) -> None:
    with pytest.raises(TimeoutError, match=r"did not start and load the model within 2 s .* CPUs .* free"):
        raysight.serve(raysight.NNsight(mlp), replicas=1, num_cpus=8, name="no-room", start_timeout_s=2)
    assert "no-room" not in [p.name for p in raysight.pools()]


def test_a_second_pool_of_the_same_name_is_refused(mlp: MLP) -> None:
    pool = raysight.serve(raysight.NNsight(mlp), name="twice")
    try:
        with pytest.raises(ValueError, match="a pool named 'twice' is already running"):
            raysight.serve(raysight.NNsight(mlp), name="twice")
    finally:
        pool.shutdown()


def test_remote_must_be_true_false_or_local(mlp: MLP, x: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="remote='yes'"):
        raysight.NNsight(mlp).trace(x, remote="yes")


def test_a_language_model_run_remotely_is_never_loaded_on_the_client(tmp_path: Any) -> None:
    from transformers import AutoModelForCausalLM

    tok = bert_tokenizer()
    path = build_lm("gpt2", tmp_path / "gpt2", tok)
    model = raysight.LanguageModel(str(path))
    with model.trace("a remote prompt", remote=True):
        hidden = model.transformer.h[0].output.save()
        logits = model.output.logits.save()
    assert not model.dispatched
    assert all(p.device.type == "meta" for p in model._module.parameters())
    ref = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    expected = oracle_forward(ref, encode(ref, tok, "a remote prompt"))
    assert torch.allclose(logits.value, expected.logits, atol=1e-5)
    assert torch.allclose(hidden.value, expected.hidden_states[1], atol=1e-5)


def test_session_remote_true_runs_every_trace_on_the_actor(mlp: MLP, x: torch.Tensor) -> None:
    model = raysight.NNsight(mlp)
    with model.session(remote=True):
        with model.trace(x):
            hidden = model.layer1.output  # not saved: passed on inside the session, on the actor
            pid = raysight.apply(os.getpid).save()
        with model.trace(x):
            model.layer1.output = hidden * 2
            out = model.output.save()
    with torch.no_grad():
        assert torch.allclose(out.value, mlp.layer2(mlp.layer1(x) * 2))
    assert pid.value != os.getpid()


def test_generate_remote_true_matches_plain_generate(tmp_path: Any) -> None:
    from transformers import AutoModelForCausalLM

    tok = bert_tokenizer()
    path = build_lm("llama", tmp_path / "llama", tok)
    model = raysight.LanguageModel(str(path))
    with model.generate("the cat sat", max_new_tokens=3, remote=True):
        tokens = model.generator.output.save()
    assert not model.dispatched
    ref = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    expected = oracle_generate(ref, encode(ref, tok, "the cat sat"), 3, exact=False)
    assert torch.equal(tokens.value, expected)


def test_a_module_attached_after_a_remote_run_reaches_the_actor(mlp: MLP, x: torch.Tensor) -> None:
    model = raysight.NNsight(mlp)
    with model.trace(x, remote=True):
        model.output.save()
    torch.manual_seed(3)
    probe = torch.nn.Linear(10, 4)
    model.layer1.probe = probe  # attached after the model was sent
    with model.trace(x, remote=True):
        read = model.layer1.probe(model.layer1.output).save()
    with torch.no_grad():
        assert torch.allclose(read.value, probe(mlp.layer1(x)))


def test_a_model_and_its_edited_copy_in_one_remote_session_keep_their_own_edits(mlp: MLP, x: torch.Tensor) -> None:
    from raysight.backends.ray import RayBackend

    model = raysight.NNsight(mlp)
    with model.trace(x, remote=True):  # the model is on the actor before the edited copy exists
        model.output.save()
    with model.edit() as edited:
        model.layer1.output[:] = 0
    for split in (True, False):
        with model.session(backend=RayBackend(split=split)):
            with model.trace(x):
                plain = model.output.save()
            with edited.trace(x):
                zeroed = (edited.output + 0 * plain).save()
        with torch.no_grad():
            assert torch.allclose(plain.value, mlp(x)), split
            assert torch.allclose(zeroed.value, mlp.layer2.bias.expand(3, 2)), split


# -- shared pools in one driver (across drivers, and `raysight serve`: test_shared_pools.py) --------------------
def test_serving_a_shared_pool_again_uses_the_running_one_and_its_weights(mlp: MLP, x: torch.Tensor,
                                                                         caplog: Any) -> None:  # fmt: skip
    from raysight.backends.ray import RayBackend, model_fingerprint

    pool = raysight.serve(raysight.NNsight(mlp), name="shared-here", detached=True)
    try:
        assert pool.shared and "shared-here" in [p.name for p in raysight.pools()]
        pid = ray.get(pool.actors[0].pid.remote())
        torch.manual_seed(5)
        other = MLP()  # the same architecture with other weights
        model = raysight.NNsight(other)
        assert model_fingerprint(model) == model_fingerprint(raysight.NNsight(mlp))
        assert raysight.serve(model, name="shared-here", detached=True) is pool  # found, not started again
        with caplog.at_level(logging.WARNING, logger="raysight"):
            assert raysight.serve(model, name="shared-here", replicas=2, detached=True) is pool
        assert "runs as it was started: replicas=1 (asked 2)" in caplog.text and len(pool.actors) == 1
        assert ray.get(pool.actors[0].pid.remote()) == pid
        with model.trace(x, backend=RayBackend(pool="shared-here")):
            out = model.output.save()
        with torch.no_grad():
            assert torch.allclose(out.value, mlp(x)) and not torch.allclose(out.value, other(x))
        with pytest.raises(ValueError, match="serves another model: MLP"):
            raysight.serve(raysight.NNsight(torch.nn.Linear(5, 2)), name="shared-here", detached=True)
    finally:
        pool.shutdown()
    assert "shared-here" not in [p.name for p in raysight.pools()]
    with pytest.raises(ValueError, match="no pool named 'shared-here' is running"):
        with model.trace(x, backend=RayBackend(pool="shared-here")):
            model.output.save()


def test_a_shared_pool_another_driver_shut_down_leaves_the_list_and_says_so(mlp: MLP, x: torch.Tensor) -> None:
    from raysight.distributed.pool import KEEPER_PREFIX, NAMESPACE

    def serve_then_kill_as_another_driver_would(name: str) -> tuple[raysight.NNsight, Any]:
        model = raysight.NNsight(mlp)
        pool = raysight.serve(model, name=name, detached=True)
        keeper = ray.get_actor(KEEPER_PREFIX + name, namespace=NAMESPACE)
        for actor in [*pool.actors, keeper]:  # what pool.shutdown() in another driver does
            ray.kill(actor)
        for actor in pool.actors:
            _wait_until_dead(actor)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(keeper.describe.remote(), timeout=30)
        return model, pool

    model, pool = serve_then_kill_as_another_driver_would("shared-gone")
    with pytest.raises(RuntimeError, match="shared pool 'shared-gone' was shut down"):  # a run finds out
        with model.trace(x, remote=True):
            model.output.save()
    assert pool.closed
    _, pool = serve_then_kill_as_another_driver_would("shared-gone-2")
    assert "shared-gone-2" not in [p.name for p in raysight.pools()] and pool.closed  # so does the list


def test_a_restricted_pool_runs_allow_listed_graphs_and_refuses_others_by_name(mlp: MLP, x: torch.Tensor) -> None:
    model = raysight.NNsight(mlp)
    pool = raysight.serve(model, name="service", trusted=False)  # a model service running others' graphs
    try:
        with model.trace(x, remote=True):
            summed = torch.nn.functional.relu(model.layer1.output).sum(dim=-1).save()
        with torch.no_grad():
            assert torch.allclose(summed.value, torch.relu(mlp.layer1(x)).sum(-1))
        # refused on the client, before anything is sent, naming the callable and the line that used it
        with pytest.raises(raysight.RaysightError, match=r"the callable \S*<lambda> is not on the allow-list \(created "
                           r"at .*test_pools.py:\d+"):  # fmt: skip
            with model.trace(x, remote=True):
                raysight.apply(lambda t: t * 2, model.layer1.output).save()
        with pytest.raises(raysight.RaysightError, match=r"the callable \S*<lambda> is not on the allow-list"):
            with model.session(remote=True):
                with model.trace(x):
                    raysight.apply(lambda t: t * 2, model.layer1.output).save()
        with pytest.raises(PermissionError, match="pool 'service' is restricted"):  # before any shard runs
            raysight.extract(model, [{"x": row} for row in x], _layer1_of, remote=True)
    finally:
        pool.shutdown()


def _layer1_of(model: raysight.NNsight, batch: dict) -> dict:
    with model.trace(batch["x"]):
        return {"h": model.layer1.output}
