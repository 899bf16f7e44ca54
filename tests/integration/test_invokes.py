"""Several invokes batched into one forward pass, each seeing its own rows."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_no_hooks


@pytest.mark.same_process
def test_invokes_run_in_one_forward_pass(model, mlp, x, xb, count_calls):
    seen_batch = []
    handle = mlp.register_forward_pre_hook(lambda m, a: seen_batch.append(a[0].shape[0]))
    try:
        with count_calls(mlp, mlp.layer1, mlp.layer2) as calls:
            with model.trace() as tracer:
                with tracer.invoke(x):
                    model.layer1.output.save()
                with tracer.invoke(xb):
                    model.layer2.output.save()
    finally:
        handle.remove()
    assert calls.counts == [1, 1, 1]
    assert seen_batch == [x.shape[0] + xb.shape[0]]


def test_invoke_values_are_narrowed_to_its_rows(model, mlp, x, xb):
    with model.trace() as tracer:
        with tracer.invoke(x):
            h0 = model.layer1.output.save()
            o0 = model.output.save()
        with tracer.invoke(xb):
            h1 = model.layer1.output.save()
            i1 = model.layer2.input.save()
            o1 = model.output.save()
    assert h0.shape == (2, 10) and h1.shape == (3, 10)
    assert torch.allclose(h0.value, mlp.layer1(x), atol=1e-6)
    assert torch.allclose(h1.value, mlp.layer1(xb), atol=1e-6)
    assert torch.allclose(i1.value, mlp.layer1(xb), atol=1e-6)
    assert torch.allclose(o0.value, mlp(x), atol=1e-6)
    assert torch.allclose(o1.value, mlp(xb), atol=1e-6)


def test_inplace_edit_in_an_invoke_hits_only_its_rows(model, mlp, x, xb):
    with model.trace() as tracer:
        with tracer.invoke(x):
            o0 = model.output.save()
        with tracer.invoke(xb):
            model.layer1.output[:] = 0
            o1 = model.output.save()
        full = model.output.save()
    expected0 = mlp(x)
    expected1 = mlp.layer2(torch.zeros(3, 10))
    assert torch.allclose(o0.value, expected0, atol=1e-6)
    assert torch.allclose(o1.value, expected1, atol=1e-6)
    assert torch.allclose(full.value, torch.cat([expected0, expected1]), atol=1e-6)


def test_replacing_an_invokes_output_changes_only_its_rows(model, mlp, x, xb):
    with model.trace() as tracer:
        with tracer.invoke(x):
            model.layer1.output = model.layer1.output * 2
        with tracer.invoke(xb):
            pass
        full = model.output.save()
    expected = torch.cat([mlp.layer2(mlp.layer1(x) * 2), mlp(xb)])
    assert torch.allclose(full.value, expected, atol=1e-6)


def test_an_invoke_can_use_a_value_read_in_an_earlier_invoke(model, mlp, x, xb):
    with model.trace() as tracer:
        with tracer.invoke(x):
            h0 = model.layer1.output.save()
        with tracer.invoke(xb):
            model.layer1.output[:] = h0.mean(0)
            o1 = model.output.save()
    mean = mlp.layer1(x).mean(0)
    assert torch.allclose(o1.value, mlp.layer2(mean.expand(3, 10)), atol=1e-6)


def test_access_outside_invokes_sees_the_full_batch(model, mlp, x, xb):
    with model.trace() as tracer:
        with tracer.invoke(x):
            pass
        with tracer.invoke(xb):
            pass
        full = model.layer1.output.save()
    assert full.shape == (5, 10)
    assert torch.allclose(full.value, mlp.layer1(torch.cat([x, xb])), atol=1e-6)


def test_invoker_inputs_and_batch_size_are_available_on_entering(model, x, xb):
    with model.trace() as tracer:
        with tracer.invoke(x) as inv0:
            assert inv0.batch_size == x.shape[0]
            (arg,), kwargs = inv0.inputs  # nnsight 0.4: the prepared (args, kwargs)
            assert torch.equal(arg, x) and kwargs == {}
        with tracer.invoke(xb) as inv1:
            assert inv1.batch_size == xb.shape[0]
            assert torch.equal(inv1.inputs[0][0], xb)


def test_keyword_tensors_of_every_invoke_are_batched(kw_model, kw_net, x4):
    xb = x4.flip(0) + 1
    m0 = torch.tensor([[1.0, 0.0, 1.0, 0.0]]).expand(2, 4)
    m1 = torch.tensor([[0.0, 2.0, 0.0, 3.0]]).expand(2, 4)
    with kw_model.trace() as tracer:
        with tracer.invoke(x4, mask=m0):
            o0 = kw_model.output.save()
        with tracer.invoke(xb, mask=m1):
            o1 = kw_model.output.save()
    assert torch.allclose(o0.value, kw_net(x4, mask=m0), atol=1e-6)
    assert torch.allclose(o1.value, kw_net(xb, mask=m1), atol=1e-6)


@pytest.mark.parametrize("alias", ["invoker_args", "invoker_kwargs"])
def test_invoker_args_go_to_input_preparation(kw_model, kw_net, x4, alias):
    with kw_model.trace(x4, **{alias: {"scale": 4.0}}):
        out = kw_model.output.save()
    assert torch.allclose(out.value, kw_net(x4, scale=4.0))
    assert not torch.allclose(out.value, kw_net(x4))


@pytest.mark.same_process
def test_trace_false_runs_at_once_and_returns_the_output(model, mlp, x, count_calls):
    with count_calls(mlp) as calls:
        out = model.trace(x, trace=False)
    assert calls[0] == 1
    assert torch.allclose(out, mlp(x))
    assert_no_hooks(mlp)


def test_trace_false_passes_forward_kwargs(kw_model, kw_net, x4):
    out = kw_model.trace(x4, scale=0.5, trace=False)
    assert torch.allclose(out, kw_net(x4, scale=0.5))

