"""Gradients inside a trace: reading, editing and replacing ``.grad``, several backward passes, ``retain_grad``,
``requires_grad`` on inputs, and bad ``.grad`` reads / backward calls.

Every oracle is a plain PyTorch run: a forward hook that registers a tensor hook (``tensor.register_hook``), or
``torch.autograd.grad`` on a hand-written forward pass.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

import raysight
from helpers import assert_no_hooks, layer1_output_grad, notes_text, unchanged

THIS_FILE = os.path.basename(__file__)


# -- oracle helpers ------------------------------------------------------------------------------------------
def hand_grad_run(
    root: nn.Module,
    module: nn.Module,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] = lambda out: out.sum(),
    edit: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None,
) -> dict[str, Any]:
    """Forward ``root(x)`` with a forward hook on ``module`` that registers a tensor hook on its output; backward
    ``loss_fn(output)``. Return the gradient the tensor hook saw and every parameter's ``.grad`` (then zero them)."""
    seen: dict[str, Any] = {}

    def tensor_hook(g: torch.Tensor) -> Optional[torch.Tensor]:
        seen["grad"] = g.detach().clone()
        return edit(g) if edit is not None else None

    def fwd_hook(mod: nn.Module, a: tuple, out: torch.Tensor) -> None:
        out.register_hook(tensor_hook)

    root.zero_grad(set_to_none=True)
    handle = module.register_forward_hook(fwd_hook)
    try:
        loss_fn(root(x)).backward()
    finally:
        handle.remove()
    seen["params"] = {n: p.grad.detach().clone() for n, p in root.named_parameters() if p.grad is not None}
    root.zero_grad(set_to_none=True)
    return seen


def line_of(text: str) -> int:
    """The line number of ``text`` in this file (it must occur exactly once)."""
    with open(__file__) as f:
        hits = [i for i, line in enumerate(f, 1) if text in line and "line_of(" not in line]
    assert len(hits) == 1, hits
    return hits[0]


def param_grads(root: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in root.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


# -- reading ---------------------------------------------------------------------------------------------------
def test_saved_grad_equals_the_gradient_a_tensor_hook_sees(model, mlp, x):
    oracle = hand_grad_run(mlp, mlp.layer1, x)
    with model.trace(x):
        h = model.layer1.output
        g = h.grad.save()
        model.output.sum().backward()
    assert g.value.shape == (2, 10)
    assert torch.allclose(g.value, oracle["grad"], atol=1e-6)


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_backward_in_a_trace_fills_parameter_grads_like_plain_backward(model, mlp, x):
    oracle = hand_grad_run(mlp, mlp.layer1, x)
    with model.trace(x):
        model.output.sum().backward()
    assert_same_grads(param_grads(mlp), oracle["params"])


def test_grad_of_a_weight_read_before_backward_is_that_weights_gradient(model, mlp, x):
    """``model.layer2.weight`` in a trace is a copy, but its ``.grad`` is the gradient of the weight itself."""
    oracle = hand_grad_run(mlp, mlp.layer1, x)
    with model.trace(x):
        g = model.layer2.weight.grad.save()
        model.output.sum().backward()
    assert torch.allclose(g.value, oracle["params"]["layer2.weight"], atol=1e-6)


def test_grad_of_a_weight_read_after_backward_is_its_grad_attribute(model, mlp, x):
    oracle = hand_grad_run(mlp, mlp.layer1, x)
    mlp.zero_grad(set_to_none=True)
    with model.trace(x):
        model.output.sum().backward()
        g = model.layer1.bias.grad.save()
    assert torch.allclose(g.value, oracle["params"]["layer1.bias"], atol=1e-6)
    mlp.zero_grad(set_to_none=True)


def test_grad_of_a_computed_value_that_replaces_an_output_equals_autograd_grad(model, mlp, x):
    h = mlp.layer1(x)
    a = torch.relu(h) * 3
    (want,) = torch.autograd.grad((mlp.layer2(a) ** 2).sum(), a)
    with model.trace(x):
        a = torch.relu(model.layer1.output) * 3
        model.layer1.output = a
        g = a.grad.save()
        (model.output**2).sum().backward()
    assert torch.allclose(g.value, want, atol=1e-6)


# -- editing -----------------------------------------------------------------------------------------------------
@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_zeroing_grad_in_place_zeroes_upstream_parameter_grads(model, mlp, x):
    oracle = hand_grad_run(mlp, mlp.layer1, x, edit=lambda g: torch.zeros_like(g))
    assert oracle["params"]["layer1.weight"].abs().sum() == 0  # the oracle really blocks layer1's gradient
    with model.trace(x):
        h = model.layer1.output
        h.grad[:] = 0
        model.output.sum().backward()
    assert_same_grads(param_grads(mlp), oracle["params"])


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_zeroing_grad_in_place_leaves_downstream_parameter_grads(model, mlp, x):
    plain = hand_grad_run(mlp, mlp.layer1, x)
    with model.trace(x):
        h = model.layer1.output
        h.grad[:] = 0
        model.output.sum().backward()
    got = param_grads(mlp)
    assert torch.allclose(got["layer2.weight"], plain["params"]["layer2.weight"], atol=1e-6)
    assert torch.allclose(got["layer2.bias"], plain["params"]["layer2.bias"], atol=1e-6)


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_replacing_grad_with_its_double_doubles_upstream_parameter_grads(model, mlp, x):
    oracle = hand_grad_run(mlp, mlp.layer1, x, edit=lambda g: g * 2)
    plain = hand_grad_run(mlp, mlp.layer1, x)
    assert torch.allclose(oracle["params"]["layer1.weight"], 2 * plain["params"]["layer1.weight"], atol=1e-6)
    with model.trace(x):
        h = model.layer1.output
        h.grad = h.grad * 2
        model.output.sum().backward()
    assert_same_grads(param_grads(mlp), oracle["params"])


def test_grad_saved_after_an_in_place_edit_sees_the_edit(model, mlp, x):
    oracle = hand_grad_run(mlp, mlp.layer1, x)
    with model.trace(x):
        h = model.layer1.output
        h.grad[:, 0] = 0
        g = h.grad.save()
        model.output.sum().backward()
    want = oracle["grad"].clone()
    want[:, 0] = 0
    assert torch.allclose(g.value, want, atol=1e-6)


# -- several backward passes -------------------------------------------------------------------------------------
def test_retain_graph_two_backward_passes_each_see_their_own_grad(model, mlp, x):
    h = mlp.layer1(x)
    out = mlp.layer2(h)
    (want1,) = torch.autograd.grad(out.sum(), h, retain_graph=True)
    (want2,) = torch.autograd.grad((out**2).sum(), h)
    assert not torch.allclose(want1, want2)
    with model.trace(x):
        h = model.layer1.output
        out = model.output
        g1 = h.grad.save()
        out.sum().backward(retain_graph=True)
        g2 = h.grad.save()
        (out**2).sum().backward()
    assert torch.allclose(g1.value, want1, atol=1e-6)
    assert torch.allclose(g2.value, want2, atol=1e-6)


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_retain_graph_two_backward_passes_accumulate_parameter_grads(model, mlp, x):
    first = hand_grad_run(mlp, mlp.layer1, x, loss_fn=lambda o: o.sum())
    second = hand_grad_run(mlp, mlp.layer1, x, loss_fn=lambda o: (o**2).sum())
    with model.trace(x):
        out = model.output
        out.sum().backward(retain_graph=True)
        (out**2).sum().backward()
    got = param_grads(mlp)
    for name in first["params"]:
        assert torch.allclose(got[name], first["params"][name] + second["params"][name], atol=1e-5), name


def test_retain_grad_then_grad_after_backward(model, mlp, x):
    oracle = hand_grad_run(mlp, mlp.layer1, x)
    with model.trace(x):
        h = model.layer1.output
        h.retain_grad()
        model.output.sum().backward()
        g = h.grad.save()
    assert torch.allclose(g.value, oracle["grad"], atol=1e-6)


# -- requires_grad -----------------------------------------------------------------------------------------------
def _freeze(net: nn.Module) -> None:
    for p in net.parameters():
        p.requires_grad_(False)


def test_setting_requires_grad_on_the_input_of_a_frozen_model(model, mlp, x):
    _freeze(mlp)
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(mlp(xr).sum(), xr)
    with model.trace(x.clone()):
        inp = model.layer1.input
        inp.requires_grad = True
        g = inp.grad.save()
        model.output.sum().backward()
    assert torch.allclose(g.value, want, atol=1e-6)
    assert all(p.grad is None for p in mlp.parameters())


def test_requires_grad_method_on_a_hidden_value_of_a_frozen_model(model, mlp, x):
    _freeze(mlp)
    h = mlp.layer1(x).requires_grad_(True)
    (want,) = torch.autograd.grad((mlp.layer2(h) ** 2).sum(), h)
    with model.trace(x):
        h = model.layer1.output
        h.requires_grad_(True)
        g = h.grad.save()
        (model.output**2).sum().backward()
    assert torch.allclose(g.value, want, atol=1e-6)


def test_grad_of_a_frozen_model_without_requires_grad_raises_intervention_error(model, mlp, x):
    _freeze(mlp)
    with unchanged(mlp):
        with pytest.raises(raysight.InterventionError) as info:
            with model.trace(x):
                h = model.layer1.output
                h.grad.save()  # nothing requires grad here
                model.output.sum().backward()
    assert "requires_grad" in notes_text(info.value)


# -- bad input -----------------------------------------------------------------------------------------------------
def test_grad_of_a_detached_value_raises_intervention_error_naming_the_line(model, mlp, x):
    with unchanged(mlp):
        with pytest.raises(raysight.InterventionError) as info:
            with model.trace(x):
                d = model.layer1.output.detach()
                d.grad.save()  # detached: never part of the backward pass
                model.output.sum().backward()
    text = notes_text(info.value)
    assert THIS_FILE in text
    assert "d.grad.save()  # detached: never part of the backward pass" in text


def test_grad_of_a_value_not_upstream_of_the_loss_raises_intervention_error_naming_the_line(model, mlp, x):
    with unchanged(mlp):
        with pytest.raises(raysight.InterventionError) as info:
            with model.trace(x):
                side = model.layer1.output * 2  # requires grad, but the loss does not use it
                side.grad.save()  # the .grad read
                model.output.sum().backward()
    text = notes_text(info.value)
    assert "%" in text  # names the node
    assert f"{THIS_FILE}:{line_of('side.grad.save()  # the .grad read')}" in text


def test_grad_with_no_backward_after_it_raises_naming_the_location_and_line(model, mlp, x):
    """Without a backward pass after it, the gradient of a hidden value is never computed (plain torch would
    give None and a warning): a clear error, not a silent None."""
    with unchanged(mlp):
        with pytest.raises(raysight.InterventionError, match=r"`\.grad` of model\.layer1\.output is never computed: "
                           r"no backward\(\) comes after it") as info:  # fmt: skip
            with model.trace(x):
                hidden = model.layer1.output
                model.output.sum().backward()
                hidden.grad.save()  # read after the backward pass
    assert "hidden.grad.save()  # read after the backward pass" in notes_text(info.value)


def test_backward_of_a_non_scalar_raises_runtime_error_noting_the_line(model, mlp, x):
    with unchanged(mlp):
        with pytest.raises(RuntimeError) as info:
            with model.trace(x):
                h = model.layer1.output
                h.grad.save()
                model.output.backward()  # not a scalar
    notes = "\n".join(getattr(info.value, "__notes__", []) or [])
    assert THIS_FILE in notes
    assert "model.output.backward()  # not a scalar" in notes


def test_no_hooks_remain_after_a_successful_gradient_trace(model, mlp, x):
    with model.trace(x):
        h = model.layer1.output
        h.grad = h.grad * 2
        model.output.sum().backward()
    assert_no_hooks(mlp)


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_a_trace_after_a_gradient_error_runs_like_plain_torch(model, mlp, x):
    with pytest.raises(RuntimeError):
        with model.trace(x):
            h = model.layer1.output
            h.grad[:] = 0
            model.output.backward()
    mlp.zero_grad(set_to_none=True)
    plain = hand_grad_run(mlp, mlp.layer1, x)
    with model.trace(x):
        g = model.layer1.output.grad.save()
        model.output.sum().backward()
    assert torch.allclose(g.value, plain["grad"], atol=1e-6)
    assert_same_grads(param_grads(mlp), plain["params"])


# -- several invokes and several calls -----------------------------------------------------------------------------
def _hidden_grad(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = mlp.layer1(x)
    (g,) = torch.autograd.grad(mlp.layer2(h).sum(), h)
    return g


def test_grad_in_a_single_explicit_invoke(model, mlp, x):
    want = _hidden_grad(mlp, x)
    with model.trace() as tracer:
        with tracer.invoke(x):
            g = model.layer1.output.grad.save()
            model.output.sum().backward()
    assert torch.allclose(g.value, want, atol=1e-6)


def test_grad_and_backward_inside_the_second_of_two_invokes(model, mlp, x, xb):
    """The loss sums invoke 1's rows only; MLP rows are independent, so the gradient of invoke 1's hidden rows is
    that of ``mlp(xb).sum()``."""
    want = _hidden_grad(mlp, xb)
    with model.trace() as tracer:
        with tracer.invoke(x):
            pass
        with tracer.invoke(xb):
            g = model.layer1.output.grad.save()
            model.output.sum().backward()
    assert torch.allclose(g.value, want, atol=1e-6)


def test_grad_read_in_an_invoke_with_backward_recorded_after_the_invokes(model, mlp, x, xb):
    """``.grad`` is the gradient in the next backward() recorded after it: here a full-batch loss after both
    invokes, so invoke 0 sees its own rows of the full gradient."""
    want = _hidden_grad(mlp, torch.cat([x, xb]))[: x.shape[0]]
    with model.trace() as tracer:
        with tracer.invoke(x):
            g = model.layer1.output.grad.save()
        with tracer.invoke(xb):
            pass
        model.output.sum().backward()
    assert g.value is not None
    assert torch.allclose(g.value, want, atol=1e-6)


def _cell_outputs(loop: Any, x: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Oracle: every call's output of the reused cell, and the final output (graph kept for autograd.grad)."""
    outs: list = []
    handle = loop.cell.register_forward_hook(lambda m, a, out: outs.append(out))
    try:
        final = loop(x)
    finally:
        handle.remove()
    return outs, final


def test_grad_of_the_second_call_of_a_reused_module(loop_model, loop, x4):
    outs, final = _cell_outputs(loop, x4)
    (want,) = torch.autograd.grad(final.sum(), outs[1])
    loop.zero_grad(set_to_none=True)
    with loop_model.trace(x4):
        g = loop_model.cell.next().output.grad.save()
        loop_model.output.sum().backward()
    assert torch.allclose(g.value, want, atol=1e-6)


def test_grad_under_all_gives_each_calls_gradient(loop_model, loop, x4):
    outs, final = _cell_outputs(loop, x4)
    want = torch.autograd.grad(final.sum(), outs)
    loop.zero_grad(set_to_none=True)
    with loop_model.trace(x4):
        acc = raysight.list().save()
        with loop_model.cell.all():
            acc.append(loop_model.cell.output.grad)
        loop_model.output.sum().backward()
    assert len(acc.value) == 3
    assert all(g is not None for g in acc.value)
    # each append runs when its call's gradient arrives, and backward reaches the last call first
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(acc.value, reversed(want)))


def test_grad_set_from_one_read_is_seen_by_a_later_read_of_the_same_output(model, mlp, x):
    """nnsight 0.4's own pattern: each `.output` is a new read, but they are one tensor and share one gradient."""
    captured = {"g": layer1_output_grad(mlp, x)}
    with model.trace(x):
        l1_grad = model.layer1.output.grad.clone().save()
        model.layer1.output.grad = model.layer1.output.grad.clone() * 2
        l1_grad_double = model.layer1.output.grad.save()
        model.output.sum().backward()
    assert torch.allclose(l1_grad.value, captured["g"])
    assert torch.equal(l1_grad.value * 2, l1_grad_double.value)


def test_grad_of_an_indexed_view_is_that_part_of_the_outputs_gradient(model, mlp):
    """`output[0].grad` (a view the loss does not use directly) gives row 0 of the output's gradient, and editing it
    in place edits what flows upstream."""
    xb = torch.randn(3, 5, generator=torch.Generator().manual_seed(7))
    captured = {"g": layer1_output_grad(mlp, xb)}
    with model.trace(xb):
        row = model.layer1.output[0].grad.clone().save()
        model.layer1.output[1].grad[:] = 0
        model.output.sum().backward()
    assert torch.allclose(row.value, captured["g"][0])
    if mlp.layer1.weight.grad is not None:  # local run: row 1's zeroed gradient reached the weights
        g = captured["g"].clone()
        g[1] = 0
        assert torch.allclose(mlp.layer1.weight.grad, g.T @ xb, atol=1e-6)
    mlp.zero_grad(set_to_none=True)


# -- replacing a gradient with any value, and gradient edits once per call ---------------------------------------
@pytest.mark.local_only  # inspects state of the client's own torch module or objects
@pytest.mark.parametrize("make", [lambda h: torch.zeros(2, 10), lambda h: torch.zeros_like(h), lambda h: h * 0 + 1])
def test_grad_set_to_a_value_not_computed_from_the_grad_replaces_it(model, mlp, make):
    """`h.grad = torch.zeros(...)`: the value replaces the gradient flowing back (not just the attribute), and a
    later `.grad` read sees it."""
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    replacement = make(torch.ones(2, 10))
    oracle = hand_grad_run(mlp, mlp.layer1, x, edit=lambda g: replacement.clone())
    with model.trace(x):
        h = model.layer1.output
        h.grad = make(h)
        seen = model.layer1.output.grad.save()
        model.output.sum().backward()
    assert_same_grads(param_grads(mlp), oracle["params"])
    assert torch.equal(seen.value, replacement)


def _doubling_oracle(loop: Any, x: torch.Tensor, calls: set) -> dict[str, torch.Tensor]:
    """Parameter gradients of sum(loop(x)) with the gradient at the chosen calls' outputs doubled by tensor hooks."""
    count = [0]

    def hook(module: Any, args: Any, out: torch.Tensor) -> None:
        if count[0] in calls:
            out.register_hook(lambda g: g * 2)
        count[0] += 1

    loop.zero_grad(set_to_none=True)
    handle = loop.cell.register_forward_hook(hook)
    try:
        loop(x).sum().backward()
    finally:
        handle.remove()
    grads = param_grads(loop)
    loop.zero_grad(set_to_none=True)
    return grads


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
@pytest.mark.parametrize("selection", ["all", [0, 1, 2], [0, 2], [1, 2]])
def test_grad_edited_once_per_call_edits_each_calls_gradient(loop_model, loop, x4, selection):
    """Under `.all()` / `.iter[[...]]` each call's gradient is doubled, as a hook on each call's output does: the
    edit of call k uses call k's output and gradient, though the backward pass reaches it after later calls."""
    calls = {0, 1, 2} if selection == "all" else set(selection)
    oracle = _doubling_oracle(loop, x4, calls)
    plain = _doubling_oracle(loop, x4, set())
    assert not torch.allclose(oracle["cell.lin.weight"], plain["cell.lin.weight"])  # the edit matters
    loop.zero_grad(set_to_none=True)
    with loop_model.trace(x4):
        scope = loop_model.cell.all() if selection == "all" else loop_model.cell.iter[selection]
        with scope:
            loop_model.cell.output.grad = loop_model.cell.output.grad * 2
        loop_model.output.sum().backward()
    assert_same_grads(param_grads(loop), oracle)
    loop.zero_grad(set_to_none=True)


def test_grad_set_to_a_wrong_shape_names_the_line(model, mlp, x):
    with pytest.raises(raysight.InterventionError, match=r"`.grad` of model.layer1.output was set to a tensor of "
                       r"shape \(1, 10\), but its gradient has shape \(2, 10\)") as info:  # fmt: skip
        with model.trace(x):
            h = model.layer1.output
            h.grad = h.grad[:1]  # the wrong-shape gradient
            model.output.sum().backward()
    assert f"{THIS_FILE}:{line_of('the wrong-shape gradient')}" in notes_text(info.value)
    assert_no_hooks(mlp)


def test_grad_of_a_tuple_output_says_it_is_not_a_tensor(model, x):
    lstm = raysight.NNsight(nn.Sequential(nn.LSTM(5, 3, batch_first=True)))
    with pytest.raises(raysight.InterventionError, match=r"`.grad` of model.0.output cannot be observed: it is a "
                       r"tuple, not a tensor") as info:  # fmt: skip
        with lstm.trace(x[:, None, :]):
            g = lstm[0].output.grad.save()  # the grad of a tuple
            lstm.output[0].sum().backward()
    assert f"{THIS_FILE}:{line_of('the grad of a tuple')}" in notes_text(info.value)
