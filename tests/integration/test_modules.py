"""Ad-hoc module calls, attached modules and parameter access."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_no_hooks


def test_ad_hoc_call_of_a_module_equals_the_real_output(model, mlp, x):
    with model.trace(x):
        again = model.layer2(model.layer1.output).save()
        out = model.output.save()
    assert torch.allclose(again.value, mlp(x))
    assert torch.allclose(again.value, out.value)


def test_ad_hoc_call_on_an_edited_value(model, mlp, x):
    with model.trace(x):
        y = model.layer2(model.layer1.output * -1).save()
    assert torch.allclose(y.value, mlp.layer2(-mlp.layer1(x)))


def test_ad_hoc_call_of_a_module_whose_output_is_read_does_not_feed_that_read(model, mlp, x):
    """The ad-hoc call (on layer1's negated output) runs before the real call of layer2: without hook=True it
    delivers no event, so layer2's own output is the real forward's."""
    with model.trace(x):
        again = model.layer2(model.layer1.output * -1).save()
        out = model.layer2.output.save()
    assert torch.allclose(again.value, mlp.layer2(-mlp.layer1(x)))
    assert torch.allclose(out.value, mlp(x))


@pytest.mark.same_process
def test_ad_hoc_call_without_hook_does_not_fire_hooks(model, mlp, x, count_calls):
    with count_calls(mlp.layer2) as calls:
        with model.trace(x):
            model.layer2(model.layer1.output).save()
    assert calls[0] == 1  # only the real forward pass


@pytest.mark.same_process
def test_ad_hoc_call_with_hook_fires_hooks(model, mlp, x, count_calls):
    with count_calls(mlp.layer2) as calls:
        with model.trace(x):
            model.layer2(model.layer1.output, hook=True).save()
    assert calls[0] == 2  # the real forward pass and the ad-hoc call


def test_ad_hoc_call_with_hook_makes_its_output_visible(model, mlp, x):
    extra = torch.nn.Linear(10, 4)
    model.extra = extra
    with model.trace(x):
        h = model.layer1.output
        y = model.extra(h * 2, hook=True).save()
        seen = model.extra.output.save()
    expected = extra(mlp.layer1(x) * 2)
    assert torch.allclose(y.value, expected)
    assert torch.allclose(seen.value, expected)
    assert_no_hooks(mlp)


def test_attached_module_joins_the_tree_and_runs_only_when_called(model, mlp, x, count_calls):
    torch.manual_seed(5)
    sae = torch.nn.Linear(10, 10)
    model.layer1.sae = sae
    assert mlp.layer1.sae is sae
    assert "sae" in repr(model)
    with count_calls(sae) as calls:
        with model.trace(x):
            out = model.output.save()
    assert calls[0] == 0
    assert torch.allclose(out.value, mlp(x))
    with model.trace(x):
        rec = model.layer1.sae(model.layer1.output).save()
    assert torch.allclose(rec.value, sae(mlp.layer1(x)))


def test_attached_module_output_can_replace_a_module_output(model, mlp, x):
    torch.manual_seed(6)
    sae = torch.nn.Linear(10, 10)
    model.layer1.sae = sae
    with model.trace(x):
        model.layer1.output = model.layer1.sae(model.layer1.output)
        out = model.output.save()
    assert torch.allclose(out.value, mlp.layer2(sae(mlp.layer1(x))))


def test_parameter_inside_a_trace_is_a_copy(model, mlp, x):
    weight_before = mlp.layer1.weight.detach().clone()
    bias_before = mlp.layer1.bias.detach().clone()
    with model.trace(x):
        w = model.layer1.weight
        w[:] = 0
        zeroed = w.save()
        b = model.layer1.bias
        b += 100
        out = model.output.save()
    assert torch.equal(zeroed.value, torch.zeros_like(weight_before))  # the edit hit the copy
    assert zeroed.value.data_ptr() != mlp.layer1.weight.data_ptr()
    assert torch.equal(mlp.layer1.weight, weight_before)
    assert torch.equal(mlp.layer1.bias, bias_before)
    assert torch.allclose(out.value, mlp(x))  # the model ran with its real weights


def test_parameter_copy_has_the_real_values(model, mlp, x):
    with model.trace(x):
        w = model.layer2.weight.clone().save()
        b = model.layer2.bias.save()
    assert torch.equal(w.value, mlp.layer2.weight)
    assert torch.equal(b.value, mlp.layer2.bias)


def test_parameter_outside_a_trace_is_the_real_tensor(model, mlp):
    assert model.layer1.weight is mlp.layer1.weight
    assert model.layer2.bias is mlp.layer2.bias


def test_parameters_used_in_computation(model, mlp, x):
    with model.trace(x):
        manual = (model.layer1.input @ model.layer1.weight.T + model.layer1.bias).save()
    assert torch.allclose(manual.value, mlp.layer1(x), atol=1e-6)


def test_ad_hoc_call_of_an_unrelated_module_leaves_no_hooks(stack_model, stack, x4):
    with stack_model.trace(x4):
        y = stack_model.layers[0](stack_model.embed.output, hook=True).save()
    assert torch.allclose(y.value, stack.layers[0](stack.embed(x4)))
    assert_no_hooks(stack)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_block_of_a_modulelist_can_be_called_ad_hoc(stack_model, stack, x4, index):
    with stack_model.trace(x4):
        y = stack_model.layers[index](stack_model.embed.output).save()
    assert torch.allclose(y.value, stack.layers[index](stack.embed(x4)))


def test_a_module_assigned_over_an_existing_child_replaces_it_by_name_and_index(stack_model, stack, x4):
    replacement = torch.nn.Linear(6, 6)
    assert stack_model.layers[1]._module is stack.layers[1]  # indexed once before the swap
    setattr(stack_model.layers, "1", replacement)
    assert stack_model.layers[1]._module is replacement
    assert stack_model.layers["1"]._module is replacement
    assert [e._module for e in stack_model.layers] == list(stack.layers)
    with stack_model.trace(x4):
        out = stack_model.layers[1].output.save()
    h = stack.layers[0](stack.embed(x4))
    assert torch.allclose(out.value, replacement(h))


def test_a_torch_module_built_inside_a_trace_has_real_parameters(model, mlp, x):
    """Only the public names (torch.nn.Parameter, torch.nn.Linear, ...) record while tracing; torch's own code keeps
    the originals, so a LayerNorm made in the trace is a real module and can be applied to a proxy."""
    with model.trace(x):
        norm = torch.nn.LayerNorm(10)
        normed = norm(model.layer1.output).save()
        scale = torch.nn.Parameter(torch.full((10,), 2.0))  # the public name still records a node
        scaled = (model.layer1.output * scale).save()
    assert type(norm.weight) is torch.nn.Parameter and torch.equal(norm.weight, torch.ones(10))
    hidden = mlp.layer1(x)
    torch.testing.assert_close(normed.value, torch.nn.functional.layer_norm(hidden, (10,)))
    torch.testing.assert_close(scaled.value, hidden * 2)
