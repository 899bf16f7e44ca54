"""Fixtures of the pool and session-split tests (the cluster itself is ``ray_cluster`` of tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def x() -> torch.Tensor:
    """Three rows for the MLP (``mlp`` is the shared fixture of tests/conftest.py)."""
    return torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
