"""Proxy behaviour while recording: what cannot be recorded raises TraceError with a hint, and nothing runs."""

from __future__ import annotations

import pytest
import torch

import raysight
from helpers import assert_no_hooks


def test_if_on_proxy_raises_trace_error_naming_tracer_cond(model, mlp, x, count_calls):
    with count_calls(mlp) as calls:
        with pytest.raises(raysight.TraceError, match=r"tracer\.cond"):
            with model.trace(x):
                if model.layer1.output:
                    pass
    assert calls[0] == 0
    assert_no_hooks(mlp)


def test_for_over_proxy_raises_trace_error_naming_session_iter(model, mlp, x, count_calls):
    with count_calls(mlp) as calls:
        with pytest.raises(raysight.TraceError, match=r"session\.iter"):
            with model.trace(x):
                for _row in model.layer1.output:
                    pass
    assert calls[0] == 0
    assert_no_hooks(mlp)


def test_len_of_proxy_raises_trace_error_suggesting_shape(model, mlp, x, count_calls):
    with count_calls(mlp) as calls:
        with pytest.raises(raysight.TraceError) as info:
            with model.trace(x):
                len(model.layer1.output)
    msg = str(info.value)
    assert "proxy.shape[0]" in msg
    assert "raysight.apply(len" in msg
    assert calls[0] == 0
    assert_no_hooks(mlp)


def test_trace_error_is_a_raysight_error():
    assert issubclass(raysight.TraceError, raysight.RaysightError)
    assert issubclass(raysight.StructureError, raysight.RaysightError)
    assert issubclass(raysight.OutOfOrderError, raysight.RaysightError)


def test_operations_on_a_proxy_record_nodes_and_return_proxies(model, mlp, x):
    with model.trace(x) as tracer:
        h = model.layer1.output
        before = len(tracer.graph)
        y = h + 1
        assert isinstance(y, raysight.Proxy)
        assert len(tracer.graph) == before + 1
        z = torch.relu(y)
        assert isinstance(z, raysight.Proxy)
        assert len(tracer.graph) == before + 2
        z.save()
    assert torch.equal(z.value, torch.relu(mlp.layer1(x) + 1))


def test_save_outside_the_trace_is_an_error(model, x):
    with model.trace(x):
        h = model.layer1.output
    with pytest.raises(raysight.TraceError):
        h.save()


def test_proxies_cannot_be_pickled_while_recording(model, x):
    import pickle

    with pytest.raises(raysight.TraceError):
        with model.trace(x):
            pickle.dumps(model.layer1.output)
