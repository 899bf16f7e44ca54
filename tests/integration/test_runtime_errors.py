"""Errors raised while the graph runs: out-of-order reads, and the user's source line on any failure."""

from __future__ import annotations

import os

import pytest
import torch

import raysight
from helpers import assert_no_hooks, notes_text, unchanged

THIS_FILE = os.path.basename(__file__)


def test_reading_an_earlier_module_after_a_later_one_raises_out_of_order_error(model, mlp, x):
    with unchanged(mlp):
        with pytest.raises(raysight.OutOfOrderError) as info:
            with model.trace(x):
                model.layer2.output.save()
                model.layer1.output.save()
    text = notes_text(info.value)
    assert "layer1" in text and "layer2" in text


def test_out_of_order_within_one_of_several_invokes(model, mlp, x, xb):
    with unchanged(mlp):
        with pytest.raises(raysight.OutOfOrderError):
            with model.trace() as tracer:
                with tracer.invoke(x):
                    model.layer1.output.save()
                with tracer.invoke(xb):
                    model.layer2.output.save()
                    model.layer1.output.save()


def test_separate_invokes_may_read_in_any_order(model, mlp, x, xb):
    with model.trace() as tracer:
        with tracer.invoke(x):
            o = model.layer2.output.save()
        with tracer.invoke(xb):
            h = model.layer1.output.save()
    assert torch.allclose(o.value, mlp(x), atol=1e-6)
    assert torch.allclose(h.value, mlp.layer1(xb), atol=1e-6)


def test_runtime_error_keeps_its_type_and_names_the_user_line(model, mlp, x):
    with unchanged(mlp):
        with pytest.raises(IndexError) as info:
            with model.trace(x):
                h = model.layer1.output
                h[:, 100].save()  # the failing line
    text = notes_text(info.value)
    assert THIS_FILE in text
    assert "h[:, 100].save()  # the failing line" in text


def test_runtime_error_in_a_torch_function_names_the_user_line(model, mlp, x):
    with unchanged(mlp):
        with pytest.raises(RuntimeError) as info:
            with model.trace(x):
                bad = torch.matmul(model.layer1.output, torch.ones(3, 3))  # shapes do not match
                bad.save()
    text = notes_text(info.value)
    assert THIS_FILE in text
    assert "torch.matmul(model.layer1.output, torch.ones(3, 3))" in text


def test_runtime_error_in_an_applied_function_names_the_user_line(model, mlp, x):
    def boom(t):
        raise KeyError("no such thing")

    with unchanged(mlp):
        with pytest.raises(KeyError) as info:
            with model.trace(x):
                raysight.apply(boom, model.layer1.output).save()
    text = notes_text(info.value)
    assert THIS_FILE in text
    assert "raysight.apply(boom, model.layer1.output)" in text


def test_runtime_error_inside_an_invoke_names_the_user_line(model, mlp, x, xb):
    with pytest.raises(IndexError) as info:
        with model.trace() as tracer:
            with tracer.invoke(x):
                model.layer1.output[5].save()  # invoke 0 has only 2 rows
            with tracer.invoke(xb):
                pass
    text = notes_text(info.value)
    assert THIS_FILE in text
    assert "model.layer1.output[5].save()" in text
    assert_no_hooks(mlp)


def test_assignment_waiting_on_a_later_module_from_another_invoke_raises_out_of_order_error(model, mlp, x, xb):
    with unchanged(mlp):
        with pytest.raises(raysight.OutOfOrderError):
            with model.trace() as tracer:
                with tracer.invoke(x):
                    later = model.layer2.output.sum()
                with tracer.invoke(xb):
                    model.layer1.output = model.layer1.output * 0 + later
                    model.output.save()


def test_runtime_error_in_a_torch_python_wrapper_names_the_user_line(model, mlp, x):
    """F.softmax is Python code in torch that dispatches to the proxy: the line named is the one calling it."""
    import torch.nn.functional as F

    with unchanged(mlp):
        with pytest.raises(IndexError) as info:
            with model.trace(x):
                F.softmax(model.layer1.output, dim=5).save()  # no dim 5
    text = notes_text(info.value)
    assert THIS_FILE in text
    assert "F.softmax(model.layer1.output, dim=5).save()  # no dim 5" in text
    assert "overrides.py" not in text


def test_nodes_einops_records_come_from_the_users_line(model, mlp, x):
    import einops

    with model.trace(x) as tracer:
        einops.rearrange(model.layer1.output, "b (h d) -> b h d", h=2).save()
        graph = tracer.graph
    computed = [n for n in graph.nodes if n.op.value in ("call_function", "call_method", "get_attr")]
    assert computed and {os.path.basename(n.source.filename) for n in computed} == {THIS_FILE}
