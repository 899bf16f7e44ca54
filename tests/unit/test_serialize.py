"""The wire format: round trips, restricted mode, limits, and hostile payloads (checked against the encoder's own
input and against plain torch; a fuzz test throws mutated and hand-made payloads at the decoder and server)."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import raysight
from helpers import MLP, assert_no_hooks
from raysight.backends.base import InvokeInputs, Request
from raysight.backends.wire import WireBackend, serve
from raysight.graph.serialize import SCHEMA_VERSION, Limits, WireError, decode_request, encode_request
from raysight.tracing.tracer import Tracer


@pytest.fixture()
def model() -> raysight.NNsight:
    torch.manual_seed(0)
    return raysight.NNsight(MLP())


def _record(model: raysight.NNsight, x: torch.Tensor) -> Request:
    with Tracer(model, (x,), execute=False) as tracer:
        h = model.layer1.output
        h[:, 0:3] = torch.ones(3) * 2
        with tracer.cond(h.sum() > -1e9):
            out = (model.output[..., :1] + h.shape[0]).save()
        acc = raysight.list().save()
        acc.append(torch.nn.functional.relu(h).mean(dim=-1))
        del out
    return tracer.request()


def _decode(payload: bytes, model: raysight.NNsight, trusted: bool = True, limits: Limits = Limits()):
    return decode_request(payload, limits, trusted, lambda i: model)


def test_a_graph_round_trips_to_the_same_nodes(model):
    request = _record(model, torch.randn(2, 5))
    decoded = _decode(encode_request(request, [], model=model), model)
    assert str(decoded.graph) == str(request.graph)
    assert [n.saved for n in decoded.graph.nodes] == [n.saved for n in request.graph.nodes]
    assert torch.equal(decoded.invokes[0].args[0], request.invokes[0].args[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_tensors_travel_as_raw_bytes_of_their_dtype(model, dtype):
    x = (torch.randn(4, 5) * 10).to(dtype)
    request = Request(_record(model, torch.randn(1, 5)).graph, [InvokeInputs((x,), {}, 4)], {}, "forward")
    payload = encode_request(request, [], model=model)
    raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    wire = raw["invokes"][0]["args"]["items"][0]
    assert wire["dtype"] == str(dtype).removeprefix("torch.")
    assert isinstance(wire["data"], bytes) and len(wire["data"]) == x.numel() * x.element_size()
    back = _decode(payload, model).invokes[0].args[0]
    assert back.dtype == dtype and torch.equal(back, x)
    back.add_(1) if dtype != torch.bool else back.logical_not_()  # decoded tensors own writable memory


def test_a_trace_through_the_wire_equals_the_local_run(model):
    x = torch.randn(3, 5)
    results = []
    for backend in (None, WireBackend()):
        with model.trace(x, backend=backend):
            model.layer1.output[:, 0] = 0
            results.append(model.output.save())
    local, wire = (r.value for r in results)
    assert torch.equal(local, wire)
    with torch.no_grad():
        h = model._module.layer1(x)
        h[:, 0] = 0
        assert torch.allclose(wire, model._module.layer2(h))


def test_restricted_mode_refuses_a_user_function_naming_it_and_the_line(model):
    with pytest.raises(WireError, match=r"restricted mode: the callable .*<lambda>.*test_serialize.py:\d+"):
        with model.trace(torch.randn(1, 5), backend=WireBackend(trusted=False)):
            raysight.apply(lambda t: t * 2, model.layer1.output).save()
    assert_no_hooks(model._module)


def test_restricted_mode_refuses_private_attributes(model):
    with pytest.raises(WireError, match="'_version'"):
        with model.trace(torch.randn(1, 5), backend=WireBackend(trusted=False)):
            model.layer1.output._version.save()


def test_restricted_mode_runs_allow_listed_operations(model):
    x = torch.randn(2, 5)
    with model.trace(x, backend=WireBackend(trusted=False)):
        out = torch.softmax(model.layer1.output * 2, dim=-1).sum(-1).save()
    assert torch.allclose(out.value, torch.softmax(model._module.layer1(x) * 2, dim=-1).sum(-1))


def test_trusted_mode_sends_user_functions_by_value(model):
    x = torch.randn(2, 5)
    with model.trace(x, backend=WireBackend()):
        out = raysight.apply(lambda t: t.flip(0), model.layer1.output).save()
    assert torch.allclose(out.value, model._module.layer1(x).flip(0))


def test_the_server_refuses_a_pickled_value_in_restricted_mode(model):
    payload = encode_request(_record(model, torch.randn(1, 5)), [], trusted=True, model=model)
    raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    raw["graph"]["nodes"][0]["target"] = {"$": "pickle", "data": b"\x80\x04N."}
    with pytest.raises(WireError, match="restricted mode"):
        _decode(msgpack.packb(raw, use_bin_type=True), model, trusted=False)


def test_a_request_over_the_size_limit_is_refused(model):
    payload = encode_request(_record(model, torch.randn(64, 5)), [], model=model)
    with pytest.raises(WireError, match=f"the request is {len(payload)} bytes, over the limit of 100"):
        _decode(payload, model, limits=Limits(max_request_bytes=100))


def test_saved_values_over_the_limit_are_refused(model):
    backend = WireBackend(limits=Limits(max_saved_bytes=1000))
    with pytest.raises(WireError, match="over the limit of 1000"):
        with model.trace(torch.randn(100, 5), backend=backend):
            model.layer1.output.save()


def test_a_run_past_its_time_limit_stops_with_a_clear_error(model):
    backend = WireBackend(limits=Limits(max_seconds=1e-9))
    with pytest.raises(raysight.RaysightError, match="time limit"):
        with model.trace(torch.randn(1, 5), backend=backend):
            model.layer1.output.save()
    assert_no_hooks(model._module)


def test_limits_validate_their_values():
    with pytest.raises(ValueError, match="positive"):
        Limits(max_request_bytes=0)
    with pytest.raises(ValueError, match="max_seconds"):
        Limits(max_seconds=-1)


def _mutate(model, change):
    payload = encode_request(_record(model, torch.randn(1, 5)), [], model=model)
    raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    change(raw)
    return msgpack.packb(raw, use_bin_type=True)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(version=SCHEMA_VERSION + 1), "schema version"),
        (lambda r: r["graph"]["nodes"][1].update(op="exec"), "unknown op 'exec'"),
        (lambda r: r["graph"]["nodes"][2].update(args={"$": "tuple", "items": [{"$": "node", "i": 99}]}),
         "reference to node 99"),
        (lambda r: r["graph"]["nodes"][1].update(args={"$": "tuple", "items": [{"$": "node", "i": 1}]}),
         "reference to node 1"),
        (lambda r: r["graph"]["body"].append(1), "more than one body"),
        (lambda r: r["graph"]["nodes"][0].update(body=[0]), "more than one body"),
        (lambda r: r["graph"]["nodes"][2].update(target={"$": "fn", "module": "os", "name": "system"}),
         None),
        (lambda r: r["graph"]["nodes"][2].update(target={"$": "eval"}), "unknown value tag 'eval'"),
        (lambda r: r["invokes"][0]["args"]["items"][0].update(shape=[1000, 1000]), "do not match shape"),
        (lambda r: r.update(extra=1), "does not match the schema"),
        (lambda r: r["models"][0].update(training=["", "layer7"]), r"\['layer7'\] in training mode.*no such module"),
        (lambda r: r["models"][0].update(frozen=["layer1.nope"]), r"freezes parameter\(s\) \['layer1.nope'\]"),
        (lambda r: r["invokes"][0]["args"]["items"][0].update(id="x"), "a tensor's id must be an int"),
        (lambda r: r.update(method="__init__"), r"'__init__' is not a method a trace can run"),
        (lambda r: r.update(method="os.system"), r"'os.system' is not a method a trace can run"),
        (lambda r: r.update(method="load_state_dict"), r"restricted mode: running the model's method "
                                                       r"'load_state_dict' is refused"),
    ],
)
def test_hostile_payloads_are_refused_with_a_wire_error(model, change, message):
    payload = _mutate(model, change)
    with pytest.raises(WireError, match=message):
        serve(payload, lambda i: model, Limits(), trusted=False)
    assert_no_hooks(model._module)


def test_truncated_and_garbage_payloads_are_refused(model):
    payload = encode_request(_record(model, torch.randn(1, 5)), [], model=model)
    for bad in (payload[: len(payload) // 2], b"", b"\xc1\xc1", b"not msgpack at all", msgpack.packb([1, 2, 3])):
        with pytest.raises(WireError):
            _decode(bad, model)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_payloads_never_crash_the_server_or_leave_hooks(model, data):
    payload = bytearray(encode_request(_record(model, torch.randn(1, 5)), [], model=model))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        payload = payload[: data.draw(st.integers(0, len(payload)))]
    try:
        serve(bytes(payload), lambda i: model, Limits(max_seconds=5), trusted=False)
    except raysight.RaysightError:
        pass  # refused, or the intervention failed on the server: both are raysight errors
    assert_no_hooks(model._module)


def test_a_saved_tensor_keeps_its_grad_through_the_reply():
    from raysight.graph.serialize import decode_result, encode_result

    leaf = torch.randn(2, 3, requires_grad=True)
    hidden = leaf * 3
    hidden.retain_grad()
    hidden.sum().backward()
    saved, _ = decode_result(encode_result({0: hidden, 1: leaf}, Limits()))
    assert torch.equal(saved[0], hidden.detach()) and torch.equal(saved[0].grad, hidden.grad)
    assert torch.equal(saved[1].grad, leaf.grad) and saved[1].requires_grad


def test_a_grad_that_does_not_fit_its_tensor_is_a_wire_error():
    from raysight.graph.serialize import decode_result, encode_result

    t = torch.zeros(2, 3)
    t.grad = torch.ones(2, 3)
    payload = encode_result({0: t}, Limits())
    header_len = int.from_bytes(payload[:8], "little")
    header = msgpack.unpackb(bytes(payload[8 : 8 + header_len]), raw=False, strict_map_key=False)
    header["saved"][0]["grad_value"]["shape"] = [3, 2]  # same bytes, another shape
    new_header = msgpack.packb(header, use_bin_type=True)
    forged = len(new_header).to_bytes(8, "little") + new_header + bytes(payload[8 + header_len :])
    with pytest.raises(WireError, match="grad_value does not fit"):
        decode_result(forged)


def test_a_tensor_referenced_twice_arrives_as_one_object(model):
    weight = torch.nn.Parameter(torch.randn(2))
    with Tracer(model, (torch.randn(2, 5),), execute=False) as tracer:
        first = (model.output + weight).save()
        second = (model.output * weight).save()
    payload = encode_request(tracer.request(), [], model=model)
    decoded = _decode(payload, model)
    a, b = (decoded.graph.nodes[p.node.index].args[1] for p in (first, second))
    assert a is b and isinstance(a, torch.nn.Parameter) and torch.equal(a, weight)


def test_one_tensor_in_a_trace_input_and_its_body_is_one_object_in_a_session(model):
    x = torch.randn(2, 5)
    with model.session(remote="local"):  # the invoke's input decodes after the trace's body
        with model.trace(x):
            moved = (model.layer1.output[:, :5] + x).save()
    with torch.no_grad():
        assert torch.allclose(moved.value, model._module.layer1(x)[:, :5] + x)


def test_an_edit_and_a_trace_share_a_tensor(model):
    steer = torch.ones(10)
    with model.edit() as edited:
        edited.layer1.output[:] = edited.layer1.output + steer
    x = torch.randn(2, 5)
    with edited.trace(x, remote="local"):
        back = (edited.layer1.output - steer).save()
    with torch.no_grad():
        assert torch.allclose(back.value, model._module.layer1(x), atol=1e-6)


def test_the_models_own_parameters_and_modules_travel_by_reference(model):
    """A parameter or submodule of the traced model in the graph (an optimizer over ``layer2.parameters()``) is
    sent as a reference and decodes to the *server's* object, not a copy; other tensors travel by value."""
    import copy

    server = copy.deepcopy(model)
    x = torch.randn(2, 5)
    with Tracer(model, (x,), execute=False) as tracer:
        raysight.apply(torch.add, model._module.layer2.weight, model._module.layer2.bias.detach()).save()
        raysight.apply(type, model._module.layer1).save()
    payload = encode_request(tracer.request(), [], model=model)
    raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    args = [n["args"]["items"] for n in raw["graph"]["nodes"] if n["op"] == "call_function"]
    assert args[0][0] == {"$": "model_param", "model": 0, "name": "layer2.weight"}
    assert args[0][1]["$"] == "tensor"  # a detached copy is not the model's: by value
    assert args[1][0] == {"$": "model_module", "model": 0, "path": "layer1"}
    decoded = decode_request(payload, Limits(), True, lambda i: server)
    calls = [n for n in decoded.graph.nodes if n.op.value == "call_function"]
    assert calls[0].args[0] is server._module.layer2.weight
    assert torch.equal(calls[0].args[1], model._module.layer2.bias)
    assert calls[1].args[0] is server._module.layer1
    assert decoded.live == [server._module.layer2.weight]


@pytest.mark.parametrize("ref, message", [
    ({"$": "model_param", "model": 0, "name": "layer9.weight"}, "no parameter 'layer9.weight'"),
    ({"$": "model_module", "model": 0, "path": "layer1.nope"}, "no submodule 'layer1.nope'"),
    ({"$": "model_param", "model": 3, "name": "layer1.weight"}, "lists 1"),
])
def test_a_reference_to_what_the_server_lacks_is_refused(model, ref, message):
    def change(raw):
        raw["graph"]["nodes"][2]["args"] = {"$": "tuple", "items": [ref]}

    with pytest.raises(WireError, match=message):
        serve(_mutate(model, change), lambda i: model, Limits(), trusted=True)


def test_a_generator_in_the_graph_is_refused_with_the_fix(model):
    with pytest.raises(WireError, match=r"generator value .*test_serialize.py.*make it a list"):
        with model.trace(torch.randn(1, 5), backend=WireBackend()):
            raysight.apply(len, model._module.parameters()).save()


def test_a_request_carries_the_clients_training_modes(model):
    """The paths of the modules in training mode travel with each model (schema version 4); all eval: empty."""
    model._module.eval()
    model._module.layer2.train()
    raw = msgpack.unpackb(encode_request(_record(model, torch.randn(1, 5)), [], model=model), raw=False,
                          strict_map_key=False)  # fmt: skip
    assert raw["version"] == 4 and raw["models"][0]["training"] == ["layer2"] and raw["models"][0]["frozen"] == []
    model._module.eval()
    raw = msgpack.unpackb(encode_request(_record(model, torch.randn(1, 5)), [], model=model), raw=False,
                          strict_map_key=False)  # fmt: skip
    assert raw["models"][0]["training"] == []
