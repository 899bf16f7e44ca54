"""Operations recorded on proxies (operators, torch functions, tensor methods, creation functions, einops,
apply, builtins, log) compute what the same operations compute on the real tensor."""

from __future__ import annotations

import einops
import pytest
import torch
import torch.nn.functional as F

import raysight

C = torch.linspace(-1.0, 1.0, 10)  # a plain tensor operand
W = torch.linspace(-1.0, 1.0, 30).reshape(10, 3)

BINARY = {
    "add": lambda h: h + 2,
    "sub": lambda h: h - 2,
    "mul": lambda h: h * 3,
    "truediv": lambda h: h / 4,
    "floordiv": lambda h: h // 0.3,
    "mod": lambda h: h % 0.3,
    "pow": lambda h: h**2,
    "matmul": lambda h: h @ W,
    "add_tensor": lambda h: h + C,
    "mul_proxy_proxy": lambda h: h * h,
}
REFLECTED = {
    "radd": lambda h: 2 + h,
    "rsub": lambda h: 2 - h,
    "rmul": lambda h: 3 * h,
    "rtruediv": lambda h: 1 / (h.abs() + 1),
    "rfloordiv": lambda h: 1 // (h.abs() + 0.3),
    "rmod": lambda h: 1 % (h.abs() + 0.3),
    "rpow": lambda h: 2**h,
    "rmatmul_tensor_left": lambda h: W.T @ h.T,
    "tensor_left_add": lambda h: C + h,
}
UNARY = {
    "neg": lambda h: -h,
    "pos": lambda h: +h,
    "abs": lambda h: abs(h),
    "invert": lambda h: ~(h > 0),
}
COMPARE = {
    "lt": lambda h: h < 0.1,
    "le": lambda h: h <= 0.1,
    "gt": lambda h: h > 0.1,
    "ge": lambda h: h >= 0.1,
    "eq": lambda h: h == h,
    "ne": lambda h: h != 0.1,
}
BITWISE = {
    "and": lambda h: (h > 0) & (h < 0.5),
    "or": lambda h: (h > 0.5) | (h < -0.5),
    "xor": lambda h: (h > 0) ^ (h > 0.5),
}
TORCH_FUNCS = {
    "torch.relu": lambda h: torch.relu(h),
    "torch.sum_dim": lambda h: torch.sum(h, dim=1),
    "torch.cat": lambda h: torch.cat([h, h * 2], dim=0),
    "torch.stack": lambda h: torch.stack([h, h + 1]),
    "torch.where": lambda h: torch.where(h > 0, h, torch.zeros_like(h)),
    "torch.matmul": lambda h: torch.matmul(h, W),
    "F.softmax": lambda h: F.softmax(h, dim=-1),
    "F.gelu": lambda h: F.gelu(h),
    "F.linear": lambda h: F.linear(h, W.T),
    "F.normalize": lambda h: F.normalize(h, dim=-1),
}
METHODS = {
    "mean": lambda h: h.mean(0),
    "softmax": lambda h: h.softmax(-1),
    "view": lambda h: h.view(-1),
    "reshape": lambda h: h.reshape(5, 4),
    "transpose": lambda h: h.transpose(0, 1),
    "argmax": lambda h: h.argmax(dim=-1),
    "topk_values": lambda h: h.topk(3, dim=-1).values,
    "max_tuple_index": lambda h: h.max(dim=-1)[1],
    "norm": lambda h: h.norm(dim=-1),
    "clone_detach": lambda h: h.clone().detach(),
    "chain": lambda h: h.abs().sqrt().log1p().sum(),
    "getattr_T": lambda h: h.T,
    "dtype_to": lambda h: h.to(torch.float64),
}
INDEXING = {  # index keys: plain values, slices, tuples of them, Ellipsis, and keys holding proxies
    "int": lambda h: h[0],
    "slice": lambda h: h[:, 2:7:2],
    "tuple_slice_int": lambda h: h[:, 3],
    "ellipsis": lambda h: h[..., -1],
    "negative_step_free_slice": lambda h: h[0, ::3],
    "tensor_key": lambda h: h[:, torch.tensor([1, 4])],
    "list_key": lambda h: h[:, [0, 2, 5]],
    "mask_key": lambda h: h[h > 0],
    "proxy_in_tuple_key": lambda h: h[:, h[0].argmin()],
    "attribute_proxy_operand": lambda h: h + h.T.T,
}
ALL = {**BINARY, **REFLECTED, **UNARY, **COMPARE, **BITWISE, **TORCH_FUNCS, **METHODS, **INDEXING}


def _check(model, mlp, x, fn):
    with model.trace(x):
        got = fn(model.layer1.output).save()
    expected = fn(mlp.layer1(x))
    assert type(got.value) is type(expected)
    assert got.value.shape == expected.shape
    assert got.value.dtype == expected.dtype
    assert torch.allclose(got.value.double(), expected.double(), atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("name", list(ALL))
def test_operation_on_a_proxy_matches_torch(model, mlp, x, name):
    _check(model, mlp, x, ALL[name])


def test_indexing_with_a_proxy_index(model, mlp, x):
    with model.trace(x):
        h = model.layer1.output
        picked = h[0, h[0].argmax()].save()
    oracle = mlp.layer1(x)
    assert torch.allclose(picked.value, oracle[0].max())


def test_in_place_index_assignments_edit_the_batch(model, mlp, x):
    """`h[key] = v` for plain, tuple and proxy keys and values: the module's output is edited in place."""
    with model.trace(x):
        h = model.layer1.output
        h[:, 0] = 0
        h[0, 1:3] = h[0, 4]
        h[h > 0.5] = 0.5
        h[..., -1] = h[0].sum()
        out = model.output.save()

    def edit(m, args, h):
        h = h.clone()
        h[:, 0] = 0
        h[0, 1:3] = h[0, 4]
        h[h > 0.5] = 0.5
        h[..., -1] = h[0].sum()
        return h

    handle = mlp.layer1.register_forward_hook(edit)
    try:
        expected = mlp(x)
    finally:
        handle.remove()
    assert torch.allclose(out.value, expected, atol=1e-6)


def test_an_operand_saved_by_an_earlier_trace_is_its_value(model, mlp, x):
    with model.trace(x):
        first = model.layer1.output.save()
    with model.trace(x):
        both = (model.layer1.output + first).save()
    assert torch.allclose(both.value, 2 * mlp.layer1(x), atol=1e-6)


def test_an_operand_of_an_earlier_trace_of_the_session_flows_between_traces(model, mlp, x):
    with model.session():
        with model.trace(x):
            first = model.layer1.output
        with model.trace(x):
            both = (model.layer1.output * first).save()
    assert torch.allclose(both.value, mlp.layer1(x) ** 2, atol=1e-6)


def test_plain_python_function_is_traced_through_its_body(model, mlp, x):
    def f(t, k=2):
        return torch.tanh(t) * k - t.mean()

    with model.trace(x):
        got = f(model.layer1.output, k=3).save()
    h = mlp.layer1(x)
    assert torch.allclose(got.value, f(h, k=3))


@pytest.mark.parametrize(
    "make",
    {
        "zeros": lambda h: torch.zeros(h.shape),
        "ones": lambda h: torch.ones(h.shape),
        "full": lambda h: torch.full(h.shape, 3.5),
        "empty_shape": lambda h: torch.empty(h.shape).fill_(2.0),
        "zeros_from_dims": lambda h: torch.zeros(h.shape[0], h.shape[1]),
        "zeros_like": lambda h: torch.zeros_like(h),
        "ones_like": lambda h: torch.ones_like(h),
        "full_like": lambda h: torch.full_like(h, -1.0),
        "arange": lambda h: torch.arange(h.shape[1]),
        "eye": lambda h: torch.eye(h.shape[1]),
        "tensor_of_proxy_size": lambda h: torch.ones(h.size(0), 3),
    }.items(),
    ids=lambda kv: kv[0],
)
def test_creation_function_with_proxy_arguments(model, mlp, x, make):
    _, fn = make
    with model.trace(x):
        got = fn(model.layer1.output).save()
    expected = fn(mlp.layer1(x))
    assert got.value.shape == expected.shape
    assert got.value.dtype == expected.dtype
    assert torch.equal(got.value, expected)


@pytest.mark.same_process
def test_randn_with_proxy_shape_draws_from_the_global_generator(model, mlp, x):
    torch.manual_seed(1234)
    with model.trace(x):
        r = torch.randn(model.layer1.output.shape).save()
    torch.manual_seed(1234)
    expected = torch.randn(mlp.layer1(x).shape)
    assert torch.equal(r.value, expected)


def test_einops_rearrange_on_a_proxy(model, mlp, x):
    with model.trace(x):
        got = einops.rearrange(model.layer1.output, "b (g d) -> b g d", g=2).save()
    expected = einops.rearrange(mlp.layer1(x), "b (g d) -> b g d", g=2)
    assert torch.allclose(got.value, expected)


def test_einops_reduce_on_a_proxy(model, mlp, x):
    with model.trace(x):
        got = einops.reduce(model.layer1.output, "b (g d) -> b g", "max", g=5).save()
    expected = einops.reduce(mlp.layer1(x), "b (g d) -> b g", "max", g=5)
    assert torch.allclose(got.value, expected)


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_apply_adds_a_function_as_one_node(model, mlp, x):
    calls = []

    def fn(t, scale=1.0):
        calls.append(type(t))
        return t.detach().numpy().sum() * scale

    with model.trace(x) as tracer:
        before = len(tracer.graph)
        got = raysight.apply(fn, model.layer1.output, scale=2.0).save()
        assert len(tracer.graph) == before + 2  # the read and the apply
        assert calls == []  # nothing runs while recording
    assert calls == [torch.Tensor]
    assert got.value == pytest.approx(mlp.layer1(x).detach().numpy().sum() * 2.0, rel=1e-5)


def test_tracer_apply(model, mlp, x):
    with model.trace(x) as tracer:
        n = tracer.apply(len, model.layer1.output).save()
        s = tracer.apply(torch.sum, model.layer1.output, dim=0).save()
    assert n.value == len(mlp.layer1(x))
    assert torch.allclose(s.value, mlp.layer1(x).sum(0))


def test_raysight_list_append(model, mlp, x):
    with model.trace(x):
        acc = raysight.list().save()
        acc.append(model.layer1.output.sum())
        acc.append(model.layer2.output.sum())
    h = mlp.layer1(x)
    assert isinstance(acc.value, list) and len(acc.value) == 2
    assert torch.allclose(acc.value[0], h.sum())
    assert torch.allclose(acc.value[1], mlp.layer2(h).sum())


def test_raysight_dict_setitem(model, mlp, x):
    with model.trace(x):
        d = raysight.dict(first=model.layer1.output.mean()).save()
        d["second"] = model.layer2.output.mean()
    h = mlp.layer1(x)
    assert set(d.value) == {"first", "second"}
    assert torch.allclose(d.value["first"], h.mean())
    assert torch.allclose(d.value["second"], mlp.layer2(h).mean())


@pytest.mark.filterwarnings("ignore:Converting a tensor")
def test_raysight_scalar_builtins(model, mlp, x):
    with model.trace(x):
        as_str = raysight.str(model.layer1.output.shape[1]).save()
        as_tuple = raysight.tuple(model.layer1.output.shape).save()
        as_set = raysight.set(raysight.list([1, 2, 2])).save()
        total = model.output.sum()
        as_int = raysight.int(total).save()
        as_float = raysight.float(total).save()
        as_bool = raysight.bool(total > 0).save()
    expected = mlp(x).sum()
    assert as_int.value == int(expected)
    assert as_float.value == pytest.approx(float(expected), abs=1e-5)
    assert as_bool.value is bool(expected > 0)
    assert as_str.value == str(mlp.layer1.out_features)
    assert as_tuple.value == tuple(mlp.layer1(x).shape)
    assert as_set.value == {1, 2}


def test_builtins_outside_a_trace_are_plain(model):
    assert raysight.list() == []
    assert raysight.dict(a=1) == {"a": 1}
    assert raysight.int("3") == 3


def test_tracer_log_prints_real_values_when_the_graph_runs(model, mlp, x, capsys):
    with model.trace(x) as tracer:
        tracer.log("layer2 sum:", model.layer2.output.sum())
        assert capsys.readouterr().out == ""  # nothing is printed while recording
    printed = capsys.readouterr().out
    print("layer2 sum:", mlp(x).sum())
    assert printed == capsys.readouterr().out


def test_raysight_log_prints_real_values(model, mlp, x, capsys):
    with model.trace(x):
        raysight.log(model.layer1.output.shape, model.layer1.output[0, 0])
    printed = capsys.readouterr().out
    h = mlp.layer1(x)
    print(h.shape, h[0, 0])
    assert printed == capsys.readouterr().out
