"""nnsight 0.4's module-level API and trace options: ``raysight.iter``, the ``@raysight.trace`` decorator,
``raysight.Envoy``, ``raysight.util.WrapperModule``, ``envoy.to(...)``, and ``model.trace(x, method=..., debug=...,
blocking=...)``; each checked against plain PyTorch."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_no_hooks, unchanged

import raysight
from raysight.util import WrapperModule


# -- raysight.iter ---------------------------------------------------------------------------------------------
def test_raysight_iter_in_a_session_runs_its_trace_once_per_element(model, mlp):
    torch.manual_seed(1)
    batches = [torch.randn(2, 5) for _ in range(3)]
    with model.session():
        sums = raysight.list().save()
        with raysight.iter(batches) as batch:
            with model.trace(batch):
                sums.append(model.layer1.output.sum())
    expected = [mlp.layer1(b).sum() for b in batches]
    assert len(sums.value) == len(expected)
    for got, want in zip(sums.value, expected):
        torch.testing.assert_close(got, want)


def test_raysight_iter_inside_a_trace_is_the_tracers_loop(model, mlp, x):
    scales = [1.0, -2.0, 0.5]
    with model.trace(x):
        scaled = raysight.list().save()
        with raysight.iter(scales) as k:
            scaled.append(model.layer1.output * k)
    h = mlp.layer1(x)
    assert len(scaled.value) == len(scales)
    for got, k in zip(scaled.value, scales):
        torch.testing.assert_close(got, h * k)


def test_raysight_iter_with_return_context_stops_only_its_loop(model):
    items = [0, 1, 2, 3]
    with model.session():
        seen = raysight.list().save()
        with raysight.iter(items, return_context=True) as (item, loop):
            with loop.cond(item == 2):
                loop.stop()
            seen.append(item)
        seen.append(-1)  # after the loop: runs
    assert seen.value == [*itertools.takewhile(lambda i: i != 2, items), -1]


def test_module_level_stop_and_cond_in_a_session_loop_end_that_loop_only(model):
    """The walkthrough's ``with session.iter(items) as item: with nnsight.cond(item == 2): nnsight.stop()``: the
    module-level stop in a session is the session's, so it ends the loop (not an error, not the whole session)."""
    items = [0, 1, 2, 3]
    with model.session() as session:
        seen = raysight.list().save()
        with session.iter(items) as item:
            seen.append(item)
            with raysight.cond(item == 2):
                raysight.stop()
        seen.append(-1)
    assert seen.value == [*itertools.takewhile(lambda i: i != 3, items), -1]


def test_module_level_stop_in_a_session_ends_the_session(model, mlp, x):
    with model.session():
        with model.trace(x):
            first = model.layer1.output.save()
        raysight.stop()
        with model.trace(x):
            second = model.layer1.output.save()
    torch.testing.assert_close(first.value, mlp.layer1(x))
    with pytest.raises(ValueError, match="never produced"):
        second.value


def test_raysight_iter_nests(model):
    rows = [[1, 2], [3], [4, 5, 6]]
    with model.session():
        flat = raysight.list().save()
        with raysight.iter(rows) as row:
            with raysight.iter(row) as value:
                flat.append(value * 10)
    assert flat.value == [v * 10 for row in rows for v in row]


@pytest.mark.local_only
def test_raysight_iter_outside_a_trace_is_a_trace_error():
    with pytest.raises(raysight.TraceError, match=r"raysight\.iter\(\) can only be used inside"):
        raysight.iter([1, 2])


@pytest.mark.local_only
def test_raysight_iter_over_a_generator_names_the_fix(model, x):
    with pytest.raises(TypeError, match=r"wrap a generator in list"):
        with model.trace(x):
            raysight.iter(i for i in range(3))


# -- @raysight.trace ---------------------------------------------------------------------------------------------
@raysight.trace
def top_unit(h: torch.Tensor) -> int:
    """Plain Python on the real value (int(), bool(), a Python if): traced through, it would raise a TraceError."""
    best = int(h[0].argmax())
    return best if bool(h[0, best] > h[0].min()) else -1


def test_trace_decorator_calls_the_function_as_one_node_on_real_values(model, mlp, x):
    with model.trace(x):
        unit = top_unit(model.layer1.output).save()
        picked = model.layer1.output[0, unit].save()  # its result is a proxy that later nodes use
    h = mlp.layer1(x)
    best = int(h[0].argmax())
    assert unit.value == best
    torch.testing.assert_close(picked.value, h[0, best])


@pytest.mark.local_only
def test_trace_decorator_outside_a_trace_runs_the_function_and_keeps_its_name():
    h = torch.tensor([[0.5, 3.0, -1.0]])
    assert top_unit(h) == 1
    assert top_unit.__name__ == "top_unit" and "Plain Python" in top_unit.__doc__


@pytest.mark.local_only
def test_trace_decorator_refuses_a_non_callable():
    with pytest.raises(TypeError, match=r"raysight\.trace decorates a function.*model\.trace"):
        raysight.trace(torch.zeros(2))


# -- raysight.local ---------------------------------------------------------------------------------------------
def test_local_block_runs_its_body_in_place_like_a_non_remote_nnsight_trace(model, mlp, x):
    """The 0.4 guide's ``with nnsight.local(): hs = my_local_fn(hs)`` then ``layers[-1].output[:] = hs``."""
    with model.trace(x) as tracer:
        hs = model.layer1.output
        with raysight.local():
            hs = top_unit(hs) * 0 + hs * 2
        with tracer.local():
            doubled = hs.save()
        model.layer1.output[:] = hs
        out = model.output.save()
    h = mlp.layer1(x)
    torch.testing.assert_close(doubled.value, h * 2)
    torch.testing.assert_close(out.value, mlp.layer2(h * 2))


def test_local_as_a_decorator_is_one_node(model, mlp, x):
    local_top = raysight.local(top_unit.__wrapped__)
    with model.session() as session:
        with model.trace(x):
            hidden = model.layer1.output.save()
            unit = local_top(hidden).save()
        with session.local():
            negated = local_top(hidden * -1).save()  # a session-level node, after the trace
    h = mlp.layer1(x)
    assert unit.value == int(h[0].argmax())
    assert negated.value == int((-h)[0].argmax())


@pytest.mark.local_only
def test_local_of_a_non_callable_names_both_forms():
    with pytest.raises(TypeError, match=r"with raysight\.local\(\):.*@raysight\.local.*Tensor"):
        raysight.local(torch.zeros(1))


@pytest.mark.local_only
def test_local_outside_a_trace_is_a_trace_error():
    with pytest.raises(raysight.TraceError, match=r"raysight\.local\(\) can only be used inside"):
        with raysight.local():
            pass


# -- Envoy, envoy.to, util.WrapperModule ----------------------------------------------------------------------
@pytest.mark.local_only
def test_envoy_is_exported_and_to_returns_the_envoy(model, mlp, x):
    envoy = model.layer1
    assert isinstance(envoy, raysight.Envoy) and isinstance(model, raysight.Envoy)
    assert envoy.to(torch.float64) is envoy
    assert mlp.layer1.weight.dtype == torch.float64 and mlp.layer2.weight.dtype == torch.float32
    assert model.to(torch.float64) is model
    with model.trace(x.double()):
        out = model.output.save()
    torch.testing.assert_close(out.value, mlp(x.double()))


def test_wrapper_module_returns_its_input():
    a, b = torch.randn(2), torch.randn(3)
    point = WrapperModule()
    assert point(a) is a
    got = point(a, b, ignored=1)
    assert type(got) is tuple and got[0] is a and got[1] is b


def test_wrapper_module_attached_as_a_hook_point(model, mlp, x):
    """nnsight 0.4's test_editing pattern: an attached WrapperModule called with hook=True shows its own output."""
    model.layer1.point = WrapperModule()
    with model.trace(x):
        h = model.layer1.output
        model.layer1.output = model.layer1.point(h * 2, hook=True)
        seen = model.layer1.point.output.save()
        out = model.output.save()
    h = mlp.layer1(x)
    torch.testing.assert_close(seen.value, h * 2)
    torch.testing.assert_close(out.value, mlp.layer2(h * 2))


# -- model.trace(x, method=...) --------------------------------------------------------------------------------
def test_trace_method_runs_that_method_with_its_keyword_arguments(ae_model, ae, x):
    with ae_model.trace(x, method="encode", scale=2.0):
        pre = ae_model.enc.output.clone().save()
        ae_model.enc.output[:, 0] = 0  # an edit inside the method's run
        z = ae_model.output.save()  # the root's output: what the method returned
        z_in = ae_model.input.save()
    h = ae.enc(x)
    edited = h.clone()
    edited[:, 0] = 0
    torch.testing.assert_close(pre.value, h)
    torch.testing.assert_close(z.value, torch.tanh(edited) * 2.0)
    torch.testing.assert_close(z_in.value, x)


def test_trace_method_modules_the_method_never_calls_have_no_value(ae_model, ae, x):
    with ae_model.trace(x, method="encode"):
        z = ae_model.enc.output.save()
        never = ae_model.dec.output.save()
    torch.testing.assert_close(z.value, ae.enc(x))
    with pytest.raises(ValueError, match="Accessing value before it's been set"):
        never.value


def test_trace_method_with_trace_false_returns_the_methods_result(ae_model, ae, x):
    z = torch.randn(2, 3)
    got = ae_model.trace(z, method="decode", trace=False)
    torch.testing.assert_close(got, ae.decode(z))


def test_trace_method_with_scan_gives_the_methods_shapes(ae_model, x):
    with ae_model.trace(x, method="encode", scan=True):
        enc_shape = ae_model.enc.output.shape
        shape = ae_model.output.shape
        z = ae_model.output.save()
    assert tuple(shape) == (x.shape[0], 3) == tuple(z.value.shape)
    assert tuple(enc_shape) == (x.shape[0], 3)


def test_trace_method_in_a_session_feeds_a_later_forward(ae_model, ae, x):
    with ae_model.session():
        with ae_model.trace(x, method="encode"):
            z = ae_model.output
        with ae_model.trace(z, method="decode"):
            back = ae_model.output.save()
        with ae_model.trace(x):
            full = ae_model.output.save()
    torch.testing.assert_close(back.value, ae.decode(ae.encode(x)))
    torch.testing.assert_close(full.value, ae(x))


@pytest.mark.local_only
@pytest.mark.parametrize(
    "method, error, match",
    [
        ("missing", AttributeError, r"method='missing': AutoEncoder has no method 'missing'"),
        ("_private", ValueError, r"method= names a public method.*got '_private'"),
        ("enc", AttributeError, r"method='enc': that is a submodule of AutoEncoder, not a method"),
        (3, ValueError, r"method= names a public method.*got 3"),
    ],
)
def test_trace_method_bad_names_fail_before_anything_runs(ae_model, ae, x, method, error, match):
    with unchanged(ae):
        with pytest.raises(error, match=match):
            with ae_model.trace(x, method=method):
                ae_model.enc.output.save()


@pytest.mark.local_only
def test_trace_method_is_refused_in_restricted_mode(ae_model, x):
    from raysight.backends.wire import WireBackend
    from raysight.errors import RaysightError

    with pytest.raises(RaysightError, match=r"restricted mode: running the model's method 'encode' is refused"):
        with ae_model.trace(x, method="encode", backend=WireBackend(trusted=False)):
            ae_model.output.save()
    with ae_model.trace(x, backend=WireBackend(trusted=False)):  # forward is allowed
        out = ae_model.output.save()
    torch.testing.assert_close(out.value, ae_model._module(x))
    assert_no_hooks(ae_model._module)


# -- debug=, blocking= -------------------------------------------------------------------------------------------
def test_debug_is_accepted_and_errors_name_the_users_line(model, mlp, x):
    with model.trace(x, debug=True):
        out = model.output.save()
    torch.testing.assert_close(out.value, mlp(x))
    with pytest.raises(IndexError) as info:
        with model.trace(x, debug=True):
            model.layer1.output[:, 99].save()
    assert "test_module_api.py" in "\n".join(getattr(info.value, "__notes__", [])) + str(info.value)
    with model.session(debug=True):
        with model.trace(x):
            again = model.output.save()
    torch.testing.assert_close(again.value, mlp(x))


@pytest.mark.local_only
@pytest.mark.parametrize("where", ["trace", "session"])
def test_blocking_false_is_refused_with_the_alternative(model, mlp, x, where):
    with unchanged(mlp):
        with pytest.raises(ValueError, match=r"blocking=False: raysight runs every trace and session to the end"):
            if where == "trace":
                model.trace(x, remote=True, blocking=False)
            else:
                model.session(remote=True, blocking=False)
    with model.trace(x, blocking=True):  # the default, spelled out
        out = model.output.save()
    torch.testing.assert_close(out.value, mlp(x))
