"""Ray as a user's script meets it, each in a subprocess (a driver connects to one cluster at a time, and the rest of
the suite shares the local cluster of ``tests/conftest.py``): a pool spread over the nodes of a real multi-node
cluster (``ray.cluster_utils.Cluster``: a head and a second node, one CPU each), and a function of the script itself
(``__main__``) used in a remote graph."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ray")

SCRIPT = textwrap.dedent(
    """
    import torch, ray, raysight
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    raysight.init(address=cluster.address)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    model = raysight.NNsight(net)
    pool = raysight.serve(model, replicas=2, name="spread")  # one CPU each: one replica per node
    nodes = set(ray.get([actor.node_id.remote() for actor in pool.actors]))
    assert len(nodes) == 2, nodes
    x = torch.randn(4, 5)
    with model.trace(x, remote=True):
        hidden = model[1].output.save()
        out = model.output.save()
    with torch.no_grad():
        assert torch.allclose(hidden.value, net[1](net[0](x)))
        assert torch.allclose(out.value, net(x))
    pool.shutdown()
    ray.shutdown()
    cluster.shutdown()
    print("MULTINODE OK", len(nodes))
    """
)


@pytest.mark.slow
def test_a_pool_spreads_over_two_nodes_and_returns_local_values() -> None:
    tests = pathlib.Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=str(tests.parent))  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "MULTINODE OK 2" in done.stdout


SCRIPT_FUNCTION = textwrap.dedent(
    """
    import torch, raysight

    def double(t):  # defined in the script (__main__): travels by value
        return t * 2

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    model = raysight.NNsight(net)
    x = torch.randn(2, 3)
    raysight.init(num_cpus=1)
    with model.trace(x, remote=True):
        out = raysight.apply(double, model.output).save()
    with torch.no_grad():
        assert torch.allclose(out.value, net(x) * 2)
    print("SCRIPT FUNCTION OK")
    """
)


@pytest.mark.slow
def test_a_function_of_the_users_script_runs_on_the_actor() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT_FUNCTION], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "SCRIPT FUNCTION OK" in done.stdout
