"""How the runtime puts its hooks on modules: straight into torch's hook dicts when this torch keeps them there
(what ``register_forward_hook`` fills, without the handle), or through torch's API otherwise. Both ways must give
the values of hand-written hooks, run in registration order next to the user's own hooks, and leave nothing behind.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.hooks import RemovableHandle

import raysight.runtime.hooks as runtime_hooks
from helpers import assert_no_hooks

pytestmark = pytest.mark.local_only


@pytest.fixture(params=["direct", "api"])
def install(request: Any, monkeypatch: Any) -> str:
    if request.param == "api":
        monkeypatch.setattr(runtime_hooks, "_DIRECT", False)
    else:
        runtime_hooks._direct_hooks_supported()
        assert runtime_hooks._DIRECT, "this torch keeps its forward hooks in the dicts the runtime writes"
    return request.param


def test_this_torch_takes_hooks_put_straight_into_its_dicts() -> None:
    assert runtime_hooks._direct_hooks_supported() is True


def test_reads_and_writes_equal_hand_hooks(install: str, model: Any, mlp: Any, x: torch.Tensor) -> None:
    with model.trace(x):
        hidden = model.layer1.output.clone().save()
        model.layer2.input[:, 0] = 0  # a pre-hook with kwargs
        logits = model.output.save()
    seen = {}
    h1 = mlp.layer1.register_forward_hook(lambda m, a, o: seen.setdefault("h", o.clone()))

    def zero(m: Any, args: tuple, kwargs: dict) -> Any:
        h = args[0].clone()
        h[:, 0] = 0
        return (h,), kwargs

    h2 = mlp.layer2.register_forward_pre_hook(zero, with_kwargs=True)
    try:
        expected = mlp(x)
    finally:
        h1.remove()
        h2.remove()
    torch.testing.assert_close(hidden.value, seen["h"])
    torch.testing.assert_close(logits.value, expected)
    assert_no_hooks(mlp)


def test_a_users_hook_runs_first_and_stays(install: str, model: Any, mlp: Any, x: torch.Tensor) -> None:
    """A hook the user registered before the trace runs before the trace's own (dict order), so the trace sees
    its result; it is still there after the run, and its handle still removes it."""
    doubled = mlp.layer1.register_forward_hook(lambda m, a, o: o * 2)
    try:
        with model.trace(x):
            hidden = model.layer1.output.save()
        assert list(mlp.layer1._forward_hooks) == [doubled.id]
        torch.testing.assert_close(hidden.value, mlp.layer1(x))  # (the hook doubles this call too)
        torch.testing.assert_close(hidden.value, 2 * torch.nn.functional.linear(x, mlp.layer1.weight, mlp.layer1.bias))
    finally:
        doubled.remove()
    assert_no_hooks(mlp)


def test_handles_made_after_a_run_get_fresh_ids(install: str, model: Any, mlp: Any, x: torch.Tensor) -> None:
    before = RemovableHandle.next_id
    with model.trace(x):
        model.layer1.output.save()
        model.layer2.input.save()
    handle = mlp.layer2.register_forward_pre_hook(lambda m, a: None)
    try:
        assert handle.id >= before + (2 if install == "direct" else 0)
    finally:
        handle.remove()
    assert_no_hooks(mlp)


def test_a_failing_run_removes_its_hooks(install: str, model: Any, mlp: Any, x: torch.Tensor) -> None:
    with pytest.raises(IndexError):
        with model.trace(x):
            model.layer1.output.save()
            model.layer2.input[:, 99] = 0  # out of range: fails inside the pre-hook
    assert_no_hooks(mlp)
    torch.testing.assert_close(model._module(x), mlp(x))


def test_a_module_that_cannot_be_found_midway_leaves_no_hooks(install: str, model: Any, mlp: Any,
                                                                x: torch.Tensor) -> None:  # fmt: skip
    """Hooks put on before the lookup that fails are taken off again."""
    from raysight.graph.node import Location
    from raysight.runtime.hooks import HookSet
    from raysight.runtime.interpreter import Interleaver

    looked_up = []

    def module_at(path: str) -> Any:  # the first lookup succeeds, the second fails
        looked_up.append(path)
        if len(looked_up) > 1:
            raise KeyError(path)
        return mlp.layer1

    locations = [Location("layer1", "output", 0), Location("layer2", "input", 0)]
    hooks = HookSet(module_at, locations, Interleaver([], [], module_at))
    with pytest.raises(KeyError):
        hooks.__enter__()
    assert len(looked_up) == 2
    assert_no_hooks(mlp)
