"""``envoy.skip(value)``: a module that does not run, its output replaced by a value (nnsight's module skipping).

Oracles: the plain torch module with a forward hook replacing the skipped module's output (which gives the same
downstream values), and plain forward hooks counting which modules really ran.
"""

from __future__ import annotations

import pytest
import torch
from helpers import CallCounter, Loop, assert_no_hooks, run_with_hook

import raysight


def _stack_from(stack, x4, skip_at, value_fn):
    """Plain torch: run the Stack with layers[skip_at]'s output replaced by value_fn(its input)."""
    h = stack.embed(x4)
    for i, layer in enumerate(stack.layers):
        h = value_fn(h) if i == skip_at else layer(h)
    return stack.head(h)


def test_skipped_block_passes_its_input_through(stack, stack_model, x4):
    with torch.no_grad():
        with stack_model.trace(x4):
            stack_model.layers[1].skip(stack_model.layers[0].output)
            out = stack_model.output.save()
        expected = _stack_from(stack, x4, 1, lambda h: h)
    assert torch.allclose(out.value, expected, atol=1e-6)
    assert not torch.allclose(out.value, stack(x4), atol=1e-4)  # it really changed something
    assert_no_hooks(stack)
    assert "forward" not in stack.layers[1].__dict__  # the run's forward is gone again


@pytest.mark.same_process
def test_a_skipped_module_and_its_children_do_not_run(stack, stack_model, x4):
    with CallCounter(stack.layers[1], stack.layers[1].linear, stack.layers[2]) as counts:
        with torch.no_grad(), stack_model.trace(x4):
            stack_model.layers[1].skip(stack_model.layers[0].output)
            stack_model.output.save()
    # the forward hooks of layers[1] still fire (with the skip value), but its linear never runs
    assert (counts[0], counts[1], counts[2]) == (1, 0, 1)


def test_the_skipped_module_output_is_the_value_and_later_reads_see_it(stack, stack_model, x4):
    with torch.no_grad():
        with stack_model.trace(x4):
            h0 = stack_model.layers[0].output
            stack_model.layers[1].skip(h0 * 2)
            seen = stack_model.layers[1].output.save()
            after = stack_model.layers[2].output.save()
        h0_ref = stack.layers[0](stack.embed(x4))
    assert torch.allclose(seen.value, h0_ref * 2, atol=1e-6)
    assert torch.allclose(after.value, stack.layers[2](h0_ref * 2), atol=1e-6)


def test_skip_with_a_value_computed_from_the_module_input(stack, stack_model, x4):
    with torch.no_grad():
        with stack_model.trace(x4):
            layer = stack_model.layers[2]
            layer.skip(layer.input + 1)
            out = stack_model.output.save()
        expected = _stack_from(stack, x4, 2, lambda h: h + 1)
    assert torch.allclose(out.value, expected, atol=1e-6)


def test_skip_in_one_invoke_replaces_only_its_rows(stack, stack_model, x4):
    a, b = x4[:1], x4[1:]
    with torch.no_grad():
        with stack_model.trace() as tracer:
            with tracer.invoke(a):
                stack_model.layers[1].skip(stack_model.layers[0].output)
                out_a = stack_model.output.save()
            with tracer.invoke(b):
                out_b = stack_model.output.save()
        expected_a = _stack_from(stack, a, 1, lambda h: h)
    assert torch.allclose(out_a.value, expected_a, atol=1e-6)
    assert torch.allclose(out_b.value, stack(b), atol=1e-6)


def test_skip_of_a_module_returning_a_tuple(tuple_net, tuple_model):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with tuple_model.trace(x):
            h = tuple_model.pair.input
            tuple_model.pair.skip((torch.ones(3, 6), h.sum(-1, keepdim=True).expand(3, 6)))
            out = tuple_model.output.save()
        gate = x.sum(-1, keepdim=True).expand(3, 6)
        expected = tuple_net.head(torch.ones(3, 6) * gate)
    assert torch.allclose(out.value, expected, atol=1e-6)


def test_skip_every_call_of_a_loop_cell(loop, loop_model):
    net, model = loop, loop_model
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with model.trace(x):
            with model.cell.all():
                model.cell.skip(model.cell.input * 0.5)
            out = model.output.save()
        expected = net.head(x * 0.5**Loop.STEPS)
    assert torch.allclose(out.value, expected, atol=1e-6)


def test_skip_only_the_second_call_of_a_loop_cell(loop, loop_model):
    net, model = loop, loop_model
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        with model.trace(x):
            model.cell.next().skip(model.cell.next(0).input)  # call 1 passes its input through
            out = model.output.save()
        h = net.cell(x)
        h = net.cell(h)  # calls 0 and 2 run; call 1 is the identity
        expected = net.head(h)
    assert torch.allclose(out.value, expected, atol=1e-6)


def test_a_persistent_skip_through_edit(stack, stack_model, x4):
    with stack_model.edit() as edited:
        edited.layers[0].skip(edited.layers[0].input)
    with torch.no_grad():
        with edited.trace(x4):
            out = edited.output.save()
        with stack_model.trace(x4):
            base = stack_model.output.save()
        expected = _stack_from(stack, x4, 0, lambda h: h)
    assert torch.allclose(out.value, expected, atol=1e-6)
    assert torch.allclose(base.value, stack(x4), atol=1e-6)  # the base model is not edited


def test_skip_with_gradients_flows_through_the_value(stack, stack_model, x4):
    with stack_model.trace(x4):
        h0 = stack_model.layers[0].output
        g = h0.grad.save()
        stack_model.layers[1].skip(h0)
        stack_model.output.sum().backward()
    # oracle: the same function in plain torch with layers[1] replaced by the identity
    leaf = stack.layers[0](stack.embed(x4)).detach().requires_grad_(True)
    h = stack.layers[2](leaf)
    stack.head(h).sum().backward()
    assert torch.allclose(g.value, leaf.grad, atol=1e-6)


def test_skip_value_of_the_wrong_shape_under_validate_is_refused_at_its_line(stack, stack_model, x4):
    with pytest.raises(Exception) as info:
        with stack_model.trace(x4, validate=True):
            stack_model.layers[1].skip((stack_model.layers[0].output, stack_model.layers[0].output))
    assert "layers.1" in str(info.value)
    assert_no_hooks(stack)


def test_skipping_the_root_is_refused(model, x):
    with pytest.raises(raysight.TraceError, match="root module cannot be skipped"):
        with model.trace(x):
            model.skip(model.layer1.output)


def test_skip_outside_a_trace_is_refused(stack_model):
    with pytest.raises(raysight.TraceError, match="skip"):
        stack_model.layers[1].skip(torch.zeros(1))


def test_a_hook_skip_equals_the_hand_written_replacement_hook(mlp, model, x):
    """layer1 skipped with a constant: the same as a forward hook returning that constant."""
    value = torch.full((2, 10), 0.25)
    with torch.no_grad():
        with model.trace(x):
            model.layer1.skip(value)
            out = model.output.save()
        expected = run_with_hook(mlp, mlp.layer1, lambda o: value, x)
    assert torch.allclose(out.value, expected, atol=1e-6)
