"""How the runtime puts its hooks on modules: a wrapping instance ``forward`` on a module without hooks of its own
(torch's fast call path), else straight into torch's hook dicts when this torch keeps them there (what
``register_forward_hook`` fills, without the handle), or through torch's API otherwise. Every way must give the
values of hand-written hooks, run in registration order next to the user's own hooks, and leave nothing behind.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.hooks import RemovableHandle

import raysight
import raysight.runtime.hooks as runtime_hooks
from helpers import assert_no_hooks

pytestmark = pytest.mark.local_only


@pytest.fixture(params=["wrap", "direct", "api"])
def install(request: Any, monkeypatch: Any) -> str:
    if request.param != "wrap":
        monkeypatch.setattr(runtime_hooks, "WRAP", False)
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


def test_a_module_without_hooks_gets_a_wrapping_forward_for_the_run_only(model: Any, mlp: Any,
                                                                          x: torch.Tensor) -> None:  # fmt: skip
    """No hook goes into torch's dicts (the module keeps torch's fast call path), the wrapper has the signature of
    the module's own forward (HF's generate inspects it), and after the run the module's forward is its own."""
    import inspect

    seen = {}

    def look(value: Any) -> Any:
        seen["hooks"] = dict(mlp.layer1._forward_hooks), dict(mlp.layer1._forward_pre_hooks)
        seen["signature"] = inspect.signature(mlp.layer1.forward)
        seen["wrapped"] = "forward" in mlp.layer1.__dict__
        return value

    with model.trace(x):
        hidden = raysight.apply(look, model.layer1.output).save()
        model.layer1.input.save()
    assert seen == {"hooks": ({}, {}), "signature": inspect.signature(torch.nn.Linear(1, 1).forward), "wrapped": True}
    torch.testing.assert_close(hidden.value, mlp.layer1(x))
    assert "forward" not in mlp.layer1.__dict__
    assert_no_hooks(mlp)


def test_a_forward_set_on_the_instance_is_wrapped_and_given_back(model: Any, mlp: Any, x: torch.Tensor) -> None:
    """A module whose instance already has a forward (accelerate keeps its own there) is wrapped around it; the
    run reads and edits what that forward gives, and the module has it back afterwards, on error too."""
    own = mlp.layer1.forward

    def doubled(inp: torch.Tensor) -> torch.Tensor:
        return own(inp) * 2

    mlp.layer1.forward = doubled
    try:
        with model.trace(x):
            hidden = model.layer1.output.clone().save()
            model.layer1.output[:, 0] = 0
            logits = model.output.save()
        assert mlp.layer1.__dict__["forward"] is doubled
        h = torch.nn.functional.linear(x, mlp.layer1.weight, mlp.layer1.bias) * 2
        torch.testing.assert_close(hidden.value, h)
        h[:, 0] = 0
        torch.testing.assert_close(logits.value, mlp.layer2(h))
        with pytest.raises(IndexError):
            with model.trace(x):
                model.layer1.output[:, 99] = 0
        assert mlp.layer1.__dict__["forward"] is doubled
    finally:
        del mlp.layer1.forward
    assert_no_hooks(mlp)


def test_a_global_module_hook_makes_the_run_use_real_hooks_after_it(model: Any, mlp: Any, x: torch.Tensor) -> None:
    """With a global forward hook (torch.nn.modules.module.register_module_forward_hook) torch runs it before
    every module's own hooks: the run's hooks go into the module's dicts, so the run sees what the global hook
    returned, as a plain hook of the module would."""
    from torch.nn.modules.module import register_module_forward_hook

    handle = register_module_forward_hook(lambda m, a, o: o + 1 if m is mlp.layer1 else None)
    try:
        with model.trace(x):
            hidden = model.layer1.output.save()
        torch.testing.assert_close(hidden.value, mlp.layer1(x))  # (the global hook adds 1 to this call too)
    finally:
        handle.remove()
    torch.testing.assert_close(hidden.value, mlp.layer1(x) + 1)
    assert_no_hooks(mlp)


def _layer1_after(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One trace reading layer1's output and editing it: (what it read, the logits after the edit)."""
    with model.trace(x):
        hidden = model.layer1.output.clone().save()
        model.layer1.output[:, 0] = 0
        logits = model.output.save()
    return hidden.value, logits.value


def _hand_layer1_after(mlp: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = mlp.layer1(x)
    edited = h.clone()
    edited[:, 0] = 0
    return h, mlp.layer2(edited)


def test_one_wrapping_forward_serves_later_runs_and_holds_nothing_between_them(model: Any, mlp: Any,
                                                                              x: torch.Tensor) -> None:  # fmt: skip
    """The runtime keeps one wrapping forward per module for the model's later runs (made once, not per trace):
    each run gets the same one, the module is its own between runs, and what the wrapper keeps holds no value or
    interleaver of a finished run (a call of it then is the module's own forward, without events)."""
    import gc

    from raysight.runtime.interpreter import Interleaver

    seen = []

    def look(value: Any) -> Any:
        seen.append(mlp.layer1.__dict__["forward"])
        return value

    for scale in (1.0, 2.0, 3.0):
        with model.trace(x * scale):
            out = raysight.apply(look, model.layer1.output).save()
        torch.testing.assert_close(out.value, mlp.layer1(x * scale))
        assert "forward" not in mlp.layer1.__dict__
    assert seen[0] is seen[1] is seen[2]
    relay = seen[0]
    torch.testing.assert_close(relay(x), mlp.layer1(x))  # between runs: no events, the module's own result
    reachable, level = [], [cell.cell_contents for cell in relay.__closure__]
    for _ in range(3):  # (the box, what it holds, what that holds: a bound on_event holds its interleaver)
        reachable += level
        level = [o for value in level for o in gc.get_referents(value) if not isinstance(o, torch.nn.Module)]
    assert not any(isinstance(o, Interleaver) for o in reachable)  # no run's values reachable through it
    assert_no_hooks(mlp)


def test_a_forward_set_on_the_instance_after_a_run_is_the_one_the_next_run_wraps(model: Any, mlp: Any,
                                                                                 x: torch.Tensor) -> None:  # fmt: skip
    torch.testing.assert_close(_layer1_after(model, x), _hand_layer1_after(mlp, x))  # (the wrapper is made now)
    own = mlp.layer1.forward
    mlp.layer1.forward = lambda inp: own(inp) * 2
    try:
        hidden, logits = _layer1_after(model, x)
        want = mlp.layer1(x)  # doubled
        torch.testing.assert_close(hidden, want)
        want = want.clone()
        want[:, 0] = 0
        torch.testing.assert_close(logits, mlp.layer2(want))
    finally:
        del mlp.layer1.forward
    torch.testing.assert_close(_layer1_after(model, x), _hand_layer1_after(mlp, x))  # and back to its own
    assert_no_hooks(mlp)


def test_a_forward_changed_on_the_class_after_a_run_is_the_one_the_next_run_calls(model: Any, mlp: Any,
                                                                                  x: torch.Tensor) -> None:  # fmt: skip
    class Tripled(torch.nn.Linear):
        pass

    layer = Tripled(5, 10)
    layer.load_state_dict(mlp.layer1.state_dict())
    model.layer1 = layer  # (through the wrapper: its envoy follows)
    torch.testing.assert_close(_layer1_after(model, x), _hand_layer1_after(mlp, x))
    Tripled.forward = lambda self, inp: torch.nn.functional.linear(inp, self.weight, self.bias) * 3
    hidden, logits = _layer1_after(model, x)
    torch.testing.assert_close(hidden, torch.nn.functional.linear(x, layer.weight, layer.bias) * 3)
    torch.testing.assert_close((hidden, logits), _hand_layer1_after(mlp, x))
    assert_no_hooks(mlp)


def test_a_module_replaced_after_a_run_is_the_one_the_next_run_reads(model: Any, mlp: Any, x: torch.Tensor) -> None:
    torch.testing.assert_close(_layer1_after(model, x), _hand_layer1_after(mlp, x))
    old = mlp.layer1
    torch.manual_seed(7)
    model.layer1 = torch.nn.Linear(5, 10)  # (through the wrapper: its envoy follows)
    try:
        assert mlp.layer1 is not old
        torch.testing.assert_close(_layer1_after(model, x), _hand_layer1_after(mlp, x))
        assert "forward" not in old.__dict__ and "forward" not in mlp.layer1.__dict__
    finally:
        model.layer1 = old
    assert_no_hooks(mlp)


def test_a_copy_of_a_model_that_has_run_calls_its_own_modules(model: Any, mlp: Any, x: torch.Tensor) -> None:
    """A deep copy or pickle of a wrapped model (what a Ray actor gets) does not take the runtime's wrappers, which
    are bound to the original's modules: the copy's runs read and edit the copy's weights."""
    import copy
    import pickle

    _layer1_after(model, x)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        module = twin._module
        with torch.no_grad():
            module.layer1.weight.mul_(-1)
        torch.testing.assert_close(_layer1_after(twin, x), _hand_layer1_after(module, x))
        torch.testing.assert_close(_layer1_after(model, x), _hand_layer1_after(mlp, x))
        assert_no_hooks(module)
    assert_no_hooks(mlp)
