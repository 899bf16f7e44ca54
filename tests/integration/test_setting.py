"""Writing module values: swaps, tuple rebuilds, in-place edits, attribute sets. Oracles are forward hooks."""

from __future__ import annotations

import torch

from helpers import run_with_hook


def test_swapping_the_whole_output(model, mlp, x):
    with model.trace(x):
        model.layer1.output = torch.zeros(2, 10)
        out = model.output.save()
    assert torch.allclose(out.value, mlp.layer2(torch.zeros(2, 10)))


def test_swapping_the_output_with_a_function_of_it(model, mlp, x):
    with model.trace(x):
        model.layer1.output = torch.relu(model.layer1.output) * 3
        out = model.output.save()
    expected = run_with_hook(mlp, mlp.layer1, lambda o: torch.relu(o) * 3, x)
    assert torch.allclose(out.value, expected)


def test_rebuilding_a_tuple_output(tuple_model, tuple_net, x4):
    with tuple_model.trace(x4):
        out = tuple_model.pair.output
        tuple_model.pair.output = (torch.zeros_like(out[0]),) + out[1:]
        final = tuple_model.output.save()
    expected = run_with_hook(tuple_net, tuple_net.pair, lambda o: (torch.zeros_like(o[0]),) + o[1:], x4)
    assert torch.allclose(final.value, expected)
    assert not torch.allclose(final.value, tuple_net(x4))


def test_inplace_edit_of_one_tuple_element(tuple_model, tuple_net, x4):
    with tuple_model.trace(x4):
        tuple_model.pair.output[1][:] = 1
        final = tuple_model.output.save()

    def edit(o):
        o[1][:] = 1

    expected = run_with_hook(tuple_net, tuple_net.pair, edit, x4)
    assert torch.allclose(final.value, expected)


def test_inplace_slice_assignment(model, mlp, x):
    with model.trace(x):
        model.layer1.output[:, 0] = 0
        h = model.layer1.output.save()
        out = model.output.save()

    def edit(o):
        o[:, 0] = 0

    expected = run_with_hook(mlp, mlp.layer1, edit, x)
    assert torch.all(h.value[:, 0] == 0)
    assert torch.allclose(out.value, expected)


def test_augmented_assignment_on_the_output(model, mlp, x):
    with model.trace(x):
        model.layer1.output += 1
        out = model.output.save()
    expected = run_with_hook(mlp, mlp.layer1, lambda o: o + 1, x)
    assert torch.allclose(out.value, expected)


def test_augmented_assignment_on_an_indexed_row(model, mlp, x):
    y = torch.arange(10.0)
    with model.trace(x):
        model.layer1.output[1] += y
        out = model.output.save()

    def edit(o):
        o = o.clone()
        o[1] += y
        return o

    expected = run_with_hook(mlp, mlp.layer1, edit, x)
    assert torch.allclose(out.value, expected)


def test_later_reads_see_an_edit_and_clone_keeps_the_pre_edit_value(model, mlp, x):
    with model.trace(x):
        before = model.layer1.output.clone().save()
        model.layer1.output[:] = 5
        after = model.layer1.output.save()
    assert torch.allclose(before.value, mlp.layer1(x))
    assert torch.equal(after.value, torch.full((2, 10), 5.0))


def test_setting_a_proxy_attribute(model, mlp, x):
    with model.trace(x):
        h = model.layer1.output.detach()
        was = h.requires_grad.save()
        h.requires_grad = True
        now = h.requires_grad.save()
        hs = h.save()
    oracle = mlp.layer1(x).detach()
    assert was.value is oracle.requires_grad
    oracle.requires_grad = True
    assert now.value is oracle.requires_grad is True
    assert hs.value.requires_grad


def test_setting_the_input(model, mlp, x):
    with model.trace(x):
        model.layer2.input = model.layer2.input * 0
        out = model.output.save()
    assert torch.allclose(out.value, mlp.layer2(torch.zeros(2, 10)))


def test_setting_inputs_with_args_and_kwargs(kw_model, kw_net, x4):
    with kw_model.trace(x4):
        args, kwargs = kw_model.scaler.inputs[0], kw_model.scaler.inputs[1]
        kw_model.scaler.inputs = ((args[0] + 1,), {"scale": 3.0, "mask": None})
        out = kw_model.output.save()
    assert torch.allclose(out.value, (kw_net.lin(x4) + 1) * 3.0)
