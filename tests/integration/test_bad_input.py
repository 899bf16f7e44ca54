"""Bad input gives a clear, specific error, runs nothing, and leaves the torch module as it was (no hooks, same
weights)."""

from __future__ import annotations

import contextvars
import threading

import pytest
import torch

import raysight
from helpers import notes_text, unchanged

UNSET_MESSAGE = r"Accessing value before it's been set\."


def test_reading_a_missing_module_in_a_trace(stack_model, stack, x4, count_calls):
    with unchanged(stack), count_calls(stack) as calls:
        with pytest.raises(AttributeError, match="decoder") as info:
            with stack_model.trace(x4):
                stack_model.decoder.output.save()
    assert "model" in str(info.value)
    assert calls[0] == 0


def test_indexing_past_a_modulelist_in_a_trace(stack_model, stack, x4, count_calls):
    with unchanged(stack), count_calls(stack) as calls:
        with pytest.raises(IndexError, match=r"model\.layers") as info:
            with stack_model.trace(x4):
                stack_model.layers[7].output.save()
    assert "7" in str(info.value)
    assert calls[0] == 0


def test_setting_a_tensor_output_to_a_tuple_raises_structure_error(model, mlp, x):
    with unchanged(mlp):
        with pytest.raises(raysight.StructureError, match=r"layer1\.output"):
            with model.trace(x):
                model.layer1.output = (torch.zeros(2, 10),)


def test_setting_a_tuple_output_to_a_tensor_raises_structure_error(tuple_model, tuple_net, x4):
    with unchanged(tuple_net):
        with pytest.raises(raysight.StructureError, match=r"pair\.output"):
            with tuple_model.trace(x4):
                tuple_model.pair.output = tuple_model.pair.output[0]


def test_setting_a_tuple_output_to_a_shorter_tuple_raises_structure_error(tuple_model, tuple_net, x4):
    with unchanged(tuple_net):
        with pytest.raises(raysight.StructureError):
            with tuple_model.trace(x4):
                tuple_model.pair.output = (tuple_model.pair.output[0],)


def test_replacing_an_invokes_rows_with_the_wrong_shape_raises_structure_error(model, mlp, x, xb):
    with unchanged(mlp):
        with pytest.raises(raysight.StructureError):
            with model.trace() as tracer:
                with tracer.invoke(x):
                    model.layer1.output = torch.zeros(4, 10)
                with tracer.invoke(xb):
                    pass


def test_a_write_of_another_shape_is_named_when_the_model_fails_after_it(model, mlp, x):
    with torch.no_grad():
        shape = tuple(mlp.layer1(x).shape)
    with unchanged(mlp):
        with pytest.raises(RuntimeError, match="mat1 and mat2") as info:  # torch's own error, from layer2
            with model.trace(x):
                model.layer1.output = torch.zeros(len(x), 7)  # 7 wide where layer2 takes 10
                model.output.save()
    notes = notes_text(info.value)
    assert f"layer1.output was set to a value of shape {(len(x), 7)} where the module gave {shape}" in notes
    assert "torch.zeros(len(x), 7)  # 7 wide where layer2 takes 10" in notes
    assert "validate=True" in notes


def test_a_write_of_another_shape_that_the_model_accepts_runs(model, mlp, x):
    with model.trace(x):
        model.layer2.output = torch.ones(len(x), 4)  # the last module: nothing after it needs its shape
        out = model.output.save()
    assert torch.equal(out.value, torch.ones(len(x), 4))


def test_value_too_early_inside_the_with_block(model, mlp, x, count_calls):
    with unchanged(mlp), count_calls(mlp) as calls:
        with pytest.raises(ValueError, match=UNSET_MESSAGE):
            with model.trace(x):
                model.output.save().value
    assert calls[0] == 0


def test_nesting_invokes_raises_trace_error(model, mlp, x, xb, count_calls):
    with unchanged(mlp), count_calls(mlp) as calls:
        with pytest.raises(raysight.TraceError, match="nested"):
            with model.trace() as tracer:
                with tracer.invoke(x):
                    with tracer.invoke(xb):
                        pass
    assert calls[0] == 0


def test_invoke_inside_a_trace_given_an_input_raises_trace_error(model, mlp, x, xb, count_calls):
    with unchanged(mlp), count_calls(mlp) as calls:
        with pytest.raises(raysight.TraceError):
            with model.trace(x) as tracer:
                with tracer.invoke(xb):
                    pass
    assert calls[0] == 0


def test_trace_with_no_input_raises_trace_error(model, mlp, count_calls):
    with unchanged(mlp), count_calls(mlp) as calls:
        with pytest.raises(raysight.TraceError, match="invoke"):
            with model.trace():
                model.layer1.output.save()
    assert calls[0] == 0


def test_nested_traces_raise_trace_error(model, mlp, x, count_calls):
    with unchanged(mlp), count_calls(mlp) as calls:
        with pytest.raises(raysight.TraceError):
            with model.trace(x):
                with model.trace(x):
                    pass
    assert calls[0] == 0


def test_exception_in_the_with_block_propagates_and_nothing_runs(model, mlp, x, count_calls):
    class Boom(Exception):
        pass

    with unchanged(mlp), count_calls(mlp, mlp.layer1, mlp.layer2) as calls:
        with pytest.raises(Boom):
            with model.trace(x):
                model.layer1.output[:] = 0
                model.output.save()
                raise Boom("user code failed")
    assert calls.counts == [0, 0, 0]


def test_model_works_normally_after_a_failed_trace(model, mlp, x):
    with pytest.raises(raysight.StructureError):
        with model.trace(x):
            model.layer1.output = (torch.zeros(2, 10),)
    with pytest.raises(raysight.OutOfOrderError):
        with model.trace(x):
            model.layer2.output.save()
            model.layer1.output.save()
    with model.trace(x):
        h = model.layer1.output.save()
        out = model.output.save()
    assert torch.allclose(h.value, mlp.layer1(x))
    assert torch.allclose(out.value, mlp(x))
    # and the plain torch module is untouched by the failures
    assert torch.allclose(mlp(x), mlp.layer2(mlp.layer1(x)))


def test_runtime_failure_after_modules_fired_leaves_no_hooks(stack_model, stack, x4):
    with unchanged(stack):
        with pytest.raises(RuntimeError):
            with stack_model.trace(x4):
                h = stack_model.layers[1].output
                stack_model.layers[1].output = h @ torch.ones(5, 5)  # wrong inner dimension


def test_wrapping_something_that_is_not_a_module_raises_type_error():
    with pytest.raises(TypeError, match="Module"):
        raysight.NNsight(lambda t: t)


_INSIDE, _RELEASE = threading.Event(), threading.Event()


def _hold(value):
    """Called by the first thread's trace: says it is inside, then waits (module level: travels by name)."""
    _INSIDE.set()
    _RELEASE.wait(30)
    return value


@pytest.mark.same_process  # the two threads share this process's model
def test_a_trace_while_another_thread_traces_the_same_model_is_refused(model, mlp, x):
    _INSIDE.clear()
    _RELEASE.clear()
    seen = {}

    def first():
        with model.trace(x):
            out = raysight.apply(_hold, model.output).save()
        seen["out"] = out.value

    thread = threading.Thread(target=contextvars.copy_context().run, args=(first,))  # the same backend
    thread.start()
    try:
        assert _INSIDE.wait(30)
        with pytest.raises(RuntimeError, match="running a trace in another thread"):
            with model.trace(x):
                model.output.save()
    finally:
        _RELEASE.set()
        thread.join(30)
    with torch.no_grad():
        assert torch.allclose(seen["out"], mlp(x))  # the first trace was not disturbed
    with model.trace(x):  # and the model is free again
        again = model.output.save()
    assert torch.allclose(again.value, seen["out"])
