"""The root module's own values (``model.input``, ``model.inputs``, ``model.output``): read, swapped and edited.

In a forward pass the root's events are delivered around its one call rather than by hooks (see
``raysight/runtime/hooks.py``), so these tests pin down that both paths behave the same. Oracles are plain calls of
the torch module.
"""

from __future__ import annotations

import torch


def test_reading_the_root_output_equals_the_module_output(model, mlp, x):
    with model.trace(x):
        out = model.output.save()
    assert torch.equal(out.value, mlp(x))


def test_swapping_the_root_output(model, mlp, x):
    with model.trace(x):
        model.output = model.output * 2 + 1
        out = model.output.save()
    assert torch.allclose(out.value, mlp(x) * 2 + 1)


def test_inplace_edit_of_the_root_output(model, mlp, x):
    with model.trace(x):
        model.output[:, 0] = 0
        out = model.output.save()
    expected = mlp(x).detach().clone()
    expected[:, 0] = 0
    assert torch.allclose(out.value, expected)


def test_swapping_the_root_input_changes_the_whole_pass(model, mlp, x):
    with model.trace(x):
        model.input = torch.zeros_like(model.input)
        hidden = model.layer1.output.save()
        out = model.output.save()
    zeros = torch.zeros_like(x)
    assert torch.allclose(hidden.value, mlp.layer1(zeros))
    assert torch.allclose(out.value, mlp(zeros))


def test_reading_and_setting_the_root_inputs(model, mlp, x):
    other = torch.randn_like(x)
    with model.trace(x):
        args = model.inputs.save()
        model.inputs = ((other,), {})
        out = model.output.save()
    assert torch.equal(args.value[0][0], x) and args.value[1] == {}
    assert torch.allclose(out.value, mlp(other))


def test_root_values_are_narrowed_per_invoke(model, mlp, x):
    a, b = x[:1], x[1:]
    with model.trace() as tracer:
        with tracer.invoke(a):
            first = model.input.save()
            out_a = model.output.save()
        with tracer.invoke(b):
            model.output = torch.zeros_like(model.output)
            out_b = model.output.save()
    assert torch.allclose(out_a.value, mlp(a))
    assert torch.equal(first.value, a)
    assert torch.equal(out_b.value, torch.zeros_like(mlp(b)))


def test_an_ad_hoc_root_call_with_hook_fires_the_root_events(model, mlp, x):
    other = x + 1
    with model.trace(x):
        first = model.output.save()
        again = model(other, hook=True).save()
        second = model.next().output.save()
    assert torch.allclose(first.value, mlp(x))
    assert torch.allclose(again.value, mlp(other))
    assert torch.allclose(second.value, mlp(other))


def test_the_root_output_of_a_stopped_pass_is_never_set(model, x):
    import pytest

    with model.trace(x):
        model.layer1.output.stop()
        out = model.output.save()
    with pytest.raises(ValueError, match="before it's been set"):
        out.value


def test_a_subclass_with_the_older_execute_signature_still_sees_the_root(mlp, x):
    import raysight

    class Legacy(raysight.NNsight):
        def _execute(self, method, args, kwargs, dispatch=True):  # no `call`: the root is hooked instead
            return self._module(*args, **kwargs)

    model = Legacy(mlp)
    with model.trace(x):
        model.output = model.output + 1
        out = model.output.save()
    assert torch.allclose(out.value, mlp(x) + 1)
