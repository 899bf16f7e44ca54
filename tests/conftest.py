"""Shared fixtures: the tiny models of ``helpers.py``, built with a fixed seed, and the test options.

Tests import models and oracle helpers from ``helpers`` (this file only holds fixtures and pytest hooks).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import pytest
import torch

import raysight
from helpers import MLP, AutoEncoder, BNNet, CallCounter, KwNet, Loop, RealCallCounter, RNNLike, Stack, TupleNet


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def model(mlp: MLP) -> raysight.NNsight:
    return raysight.NNsight(mlp)


@pytest.fixture
def ae() -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder()


@pytest.fixture
def ae_model(ae: AutoEncoder) -> raysight.NNsight:
    return raysight.NNsight(ae)


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, generator=g)


@pytest.fixture
def xb() -> torch.Tensor:
    """A second input of another batch size (3 rows)."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 5, generator=g)


@pytest.fixture
def stack() -> Stack:
    torch.manual_seed(0)
    return Stack()


@pytest.fixture
def stack_model(stack: Stack) -> raysight.NNsight:
    return raysight.NNsight(stack)


@pytest.fixture
def x4() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, generator=g)


@pytest.fixture
def tuple_net() -> TupleNet:
    torch.manual_seed(0)
    return TupleNet()


@pytest.fixture
def tuple_model(tuple_net: TupleNet) -> raysight.NNsight:
    return raysight.NNsight(tuple_net)


@pytest.fixture
def kw_net() -> KwNet:
    torch.manual_seed(0)
    return KwNet()


@pytest.fixture
def kw_model(kw_net: KwNet) -> raysight.NNsight:
    return raysight.NNsight(kw_net)


@pytest.fixture
def count_calls() -> Callable[..., CallCounter]:
    return CallCounter


@pytest.fixture
def loop() -> Loop:
    torch.manual_seed(0)
    return Loop()


@pytest.fixture
def loop_model(loop: Loop) -> raysight.NNsight:
    return raysight.NNsight(loop)


@pytest.fixture
def rnn() -> RNNLike:
    torch.manual_seed(0)
    return RNNLike()


@pytest.fixture
def rnn_model(rnn: RNNLike) -> raysight.NNsight:
    return raysight.NNsight(rnn)


@pytest.fixture
def xseq() -> torch.Tensor:
    """(batch 2, time 4, features 3) for :class:`RNNLike`."""
    g = torch.Generator().manual_seed(4)
    return torch.randn(2, 4, 3, generator=g)


@pytest.fixture
def bn_net() -> BNNet:
    torch.manual_seed(0)
    net = BNNet()
    net.train()
    return net


@pytest.fixture
def bn_model(bn_net: BNNet) -> raysight.NNsight:
    return raysight.NNsight(bn_net)


@pytest.fixture
def count_real_calls() -> Callable[..., RealCallCounter]:
    return RealCallCounter


@pytest.fixture(scope="session")
def ray_cluster() -> Any:
    """A local Ray cluster for the whole test session (started on first use, ~10 s), shut down at the end. It
    declares 8 logical CPUs (on 2 real cores) so several pools fit; its workers import the test helpers (models
    defined in tests/) from PYTHONPATH."""
    ray = pytest.importorskip("ray")
    import raysight

    here = pathlib.Path(__file__).resolve().parent
    paths = [str(here), str(here / "integration"), str(here / "distributed"), str(here / "data"), *filter(None, [os.environ.get("PYTHONPATH")])]
    raysight.init(num_cpus=8, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}})
    yield ray
    ray.shutdown()


# -- the backends integration tests run on (see tests/integration/conftest.py) ---------------------------------
def pytest_addoption(parser: Any) -> None:
    parser.addoption("--backend", default="all", choices=("all", "local", "wire", "ray"),
                     help="integration tests run on the local backend, through the wire format (remote='local') and "
                          "on a Ray actor of a local Ray cluster (remote=True); choose one to run only that")


@pytest.fixture
def restore_config() -> Any:
    """Put every ``raysight.CONFIG`` setting back as it was after the test."""
    config = raysight.CONFIG
    saved = {section: dict(vars(getattr(config, section))) for section in ("API", "APP")}
    yield
    for section, values in saved.items():
        for name, value in values.items():
            setattr(getattr(config, section), name, value)
