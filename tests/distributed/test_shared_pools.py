"""Shared pools (``raysight.serve(..., detached=True)``, ``raysight serve``): a pool that outlives the driver that
started it and serves every driver of the cluster. Each scenario runs on a real Ray head of its own
(``ray.cluster_utils.Cluster``) with each driver a separate Python process, as jobs on a cluster are; the oracle is
the plain torch module (or the transformers model) run with the weights the pool was started with."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from helpers import assert_extracted_blocks_match_hf

pytest.importorskip("ray")

ROOT = pathlib.Path(__file__).resolve().parents[2]

COMMON = textwrap.dedent(
    """
    import os, torch, ray, raysight

    raysight.init(os.environ["RAY_ADDRESS"])
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))

    def net_of(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(5, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))

    def pid(pool):
        return ray.get(pool.actors[0].pid.remote())
    """
)

# The first driver starts the shared pool, checks a run, and exits without shutting it down.
STARTER = COMMON + textwrap.dedent(
    """
    net = net_of(0)
    torch.save(net.state_dict(), os.environ["WEIGHTS"])
    model = raysight.NNsight(net)
    pool = raysight.serve(model, name="shared", detached=True)
    assert pool.shared
    with model.trace(x, remote=True):
        out = model.output.save()
    with torch.no_grad():
        assert torch.allclose(out.value, net(x))
    print("PID", pid(pool))
    """
)

# Two drivers at once, each with its own inputs: the pool's one replica serves both, each gets its own values.
CONCURRENT = COMMON + textwrap.dedent(
    """
    import sys

    served = net_of(1)
    served.load_state_dict(torch.load(os.environ["WEIGHTS"]))
    model = raysight.NNsight(net_of(int(sys.argv[1])))
    raysight.serve(model, name="shared", detached=True)
    for step in range(5):
        xi = torch.randn(3, 5, generator=torch.Generator().manual_seed(100 * int(sys.argv[1]) + step))
        with model.trace(xi, remote=True):
            out = model.output.save()
        with torch.no_grad():
            assert torch.allclose(out.value, served(xi)), step
    print("CONCURRENT OK", sys.argv[1])
    """
)

# A second driver, after the first one ended: finds the pool, runs on the weights the pool holds (its own module has
# other weights), survives a replica that dies, refuses a different model under that name, then shuts the pool down.
USER = COMMON + textwrap.dedent(
    """
    import sys

    listed = [p for p in raysight.pools() if p.shared]
    assert [p.name for p in listed] == ["shared"], listed
    served = net_of(1)
    served.load_state_dict(torch.load(os.environ["WEIGHTS"]))
    mine = net_of(2)  # same architecture, other weights: the pool's weights are the ones used
    model = raysight.NNsight(mine)
    pool = raysight.serve(model, name="shared", detached=True)
    assert pid(pool) == int(sys.argv[1]), "a new actor was started instead of the running one"
    with torch.no_grad():
        expected, hidden_expected = served(x), served[1](served[0](x))
        assert not torch.allclose(mine(x), expected)
    with model.trace(x, remote=True):
        hidden = model[1].output.save()
        out = model.output.save()
    assert torch.allclose(out.value, expected) and torch.allclose(hidden.value, hidden_expected)

    with model.session(remote=True) as session:  # a session: two traces, the second fed by the first
        with model.trace(x):
            h = model[0].output.save()
        with model.trace(x):
            model[0].output[:] = h * 2
            doubled = model.output.save()
    with torch.no_grad():
        assert torch.allclose(doubled.value, served[2](served[1](served[0](x) * 2)))

    ray.kill(pool.actors[0], no_restart=False)  # the replica dies: Ray restarts it, it reloads from the keeper
    with model.trace(x, remote=True):
        out = model.output.save()
    assert torch.allclose(out.value, expected)
    assert pid(pool) != int(sys.argv[1]) and pool.restarts == 1

    try:
        raysight.serve(raysight.NNsight(torch.nn.Linear(5, 2)), name="shared", detached=True)
        raise AssertionError("another model was accepted")
    except ValueError as exc:
        assert "serves another model: Sequential" in str(exc), exc
    try:
        raysight.serve(model, name="shared")
        raise AssertionError("a driver pool took a shared pool's name")
    except ValueError as exc:
        assert "pass detached=True" in str(exc), exc
    pool.shutdown()
    assert [p for p in raysight.pools() if p.shared] == []
    print("USER OK")
    """
)

# A third driver: the pool is gone for everyone; its name can be used again, and the model runs on its own weights.
AFTER = COMMON + textwrap.dedent(
    """
    assert [p for p in raysight.pools() if p.shared] == []
    net = net_of(2)
    model = raysight.NNsight(net)
    pool = raysight.serve(model, name="shared", detached=True)
    with model.trace(x, remote=True):
        out = model.output.save()
    with torch.no_grad():
        assert torch.allclose(out.value, net(x))
    pool.shutdown()
    print("AFTER OK")
    """
)


def _cluster_run(scenario: str, tmp_path: pathlib.Path) -> str:
    """Run ``scenario`` (a script that gets ``run(code, *args)`` and ``cli(*args)``) next to a fresh Ray head."""
    harness = textwrap.dedent(
        """
        import os, subprocess, sys
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
        env = dict(os.environ, RAY_ADDRESS=cluster.address)

        def run_at_once(*scripts):
            started = [subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True) for code, *args in scripts]
            outs = [p.communicate(timeout=240) for p in started]
            for p, (out, err) in zip(started, outs):
                assert p.returncode == 0, out[-3000:] + err[-6000:]
            return "".join(out for out, _ in outs)

        def run(code, *args):
            done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                                  timeout=240)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
            return done.stdout

        def cli(*args, code=0):
            done = subprocess.run([sys.executable, "-m", "raysight", *args], env=env, capture_output=True, text=True,
                                  timeout=240)
            assert done.returncode == code, done.stdout[-3000:] + done.stderr[-6000:]
            return done.stdout + done.stderr

        try:
            exec(open(sys.argv[1]).read())
        finally:
            cluster.shutdown()
        """
    )
    (tmp_path / "scenario.py").write_text(scenario)
    env = dict(os.environ, WEIGHTS=str(tmp_path / "weights.pt"))
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", harness, str(tmp_path / "scenario.py")], capture_output=True,
                          text=True, timeout=600, cwd=str(ROOT), env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


@pytest.mark.slow
def test_a_shared_pool_outlives_its_driver_and_serves_the_next(tmp_path: pathlib.Path) -> None:
    scenario = textwrap.dedent(
        f"""
        started = run({STARTER!r})
        pid = started.split("PID ")[1].split()[0]
        print(run_at_once(({CONCURRENT!r}, "3"), ({CONCURRENT!r}, "4")), end="")
        print(run({USER!r}, pid), end="")
        print(run({AFTER!r}), end="")
        """
    )
    out = _cluster_run(scenario, tmp_path)
    assert "CONCURRENT OK 3" in out and "CONCURRENT OK 4" in out
    assert "USER OK" in out and "AFTER OK" in out


LM_USER = textwrap.dedent(
    """
    import os, torch, raysight
    from transformers import AutoModelForCausalLM
    from raysight.models.tiny import tiny_lm_path

    raysight.init(os.environ["RAY_ADDRESS"])
    path = str(tiny_lm_path())
    model = raysight.LanguageModel(path)
    pool = raysight.serve(model, name="lm", detached=True)  # the pool `raysight serve` started
    assert len(pool.actors) == 2 and not model.dispatched
    prompt = "The Eiffel Tower is in the city of"
    with model.trace(prompt, remote=True):
        hidden = model.transformer.h[1].output.save()
        logits = model.output.logits.save()
    assert not model.dispatched  # the client never loads the weights
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    seen = []
    hf.transformer.h[1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = hf(**model.tokenizer(prompt, return_tensors="pt"))
    assert torch.allclose(logits.value, out.logits, atol=1e-5)
    assert torch.allclose(hidden.value, seen[0], atol=1e-5)
    print("LM OK")
    """
)


@pytest.mark.slow
def test_raysight_serve_keeps_a_checkpoint_served_for_jobs(tmp_path: pathlib.Path) -> None:
    scenario = textwrap.dedent(
        f"""
        print(cli("serve", "tiny", "--name", "lm", "--replicas", "2", "--num-cpus", "0.5"))
        print(cli("serve", "tiny", "--name", "lm"))  # running already: found, not started again
        print(cli("serve", "tiny", "--name", "lm", "--dtype", "float16", code=2))  # another checkpoint: refused
        print(cli("pools"))
        print(run({LM_USER!r}), end="")
        out_dir = {str(tmp_path / "acts")!r}
        run(open("jobs/extract.py").read(), "--pool", "lm", "--rows", "6", "--layers", "1", "--output", out_dir,
            "--address", env["RAY_ADDRESS"])
        print(cli("unserve", "nope", code=2))
        print(cli("unserve", "lm"))
        print(cli("pools"))
        """
    )
    out = _cluster_run(scenario, tmp_path)
    assert "LM OK" in out
    lines = out.strip().splitlines()
    table = [line for line in lines if line.startswith("lm ")]
    assert table and table[0].split()[:5] == ["lm", "2", "0", "0.5", "trusted"], out
    assert sum(line.startswith("lm ") for line in lines) == 3, out  # serve, serve again, pools
    assert "raysight serve: error: the shared pool 'lm' serves another model: tiny-gpt2" in out
    assert "Traceback" not in out
    assert "no shared pool named 'nope'" in out and "pool lm shut down" in out
    assert lines[-1] == "no shared pools", out
    assert_extracted_blocks_match_hf(tmp_path / "acts", 6)
