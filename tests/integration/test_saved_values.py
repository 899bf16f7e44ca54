"""`.save()`, `.value`, saved proxies behaving as their value, and the error for values never produced."""

from __future__ import annotations

import pytest
import torch

import raysight

UNSET_MESSAGE = r"Accessing value before it's been set\."


def test_save_returns_the_proxy_itself(model, x):
    with model.trace(x):
        h = model.layer1.output
        assert h.save() is h


def test_value_is_the_concrete_tensor(model, mlp, x):
    with model.trace(x):
        h = model.layer1.output.save()
    assert isinstance(h.value, torch.Tensor)
    assert torch.allclose(h.value, mlp.layer1(x))


@pytest.fixture
def saved(model, mlp, x):
    with model.trace(x):
        out = model.output.save()
        total = model.output.sum().save()
    return out, total, mlp(x)


def test_saved_proxy_prints_as_its_value(saved, capsys):
    out, _, _ = saved
    print(out)
    printed = capsys.readouterr().out
    print(out.value)
    assert printed == capsys.readouterr().out
    assert str(out) == str(out.value)
    assert repr(out) == repr(out.value)
    assert f"{out}" == f"{out.value}"


def test_saved_proxy_indexing(saved):
    out, _, oracle = saved
    assert torch.allclose(out[0], oracle[0])
    assert torch.allclose(out[:, 1], oracle[:, 1])


def test_saved_proxy_arithmetic(saved):
    out, _, oracle = saved
    assert torch.allclose(out + 1, oracle + 1)
    assert torch.allclose(2 * out, 2 * oracle)
    assert torch.allclose(-out, -oracle)
    assert torch.allclose(out @ torch.ones(2, 3), oracle @ torch.ones(2, 3))


def test_saved_proxy_comparisons(saved):
    out, total, oracle = saved
    assert torch.equal(out == oracle, torch.ones_like(oracle, dtype=torch.bool))
    assert torch.equal(out > 0, oracle > 0)
    assert bool(total > oracle.sum() - 1)
    assert not bool(total < oracle.sum() - 1)


def test_torch_equal_and_functions_accept_a_saved_proxy(saved):
    out, _, oracle = saved
    assert torch.equal(oracle.detach(), out.detach())
    assert torch.allclose(out, oracle)
    assert torch.allclose(torch.relu(out), torch.relu(oracle))


def test_saved_proxy_shape_len_and_iteration(saved):
    out, _, oracle = saved
    assert out.shape == oracle.shape
    assert len(out) == len(oracle)
    rows = list(out)
    assert len(rows) == oracle.shape[0]
    for got, want in zip(rows, oracle):
        assert torch.allclose(got, want)


@pytest.mark.filterwarnings("ignore:Converting a tensor")
def test_saved_proxy_bool_and_float(saved):
    _, total, oracle = saved
    assert bool(total) is bool(oracle.sum())
    assert float(total) == pytest.approx(float(oracle.sum()), abs=1e-5)
    assert bool(total > 1e9) is False


def test_unsaved_proxy_value_raises_value_error(model, x):
    with model.trace(x):
        h = model.layer1.output
    with pytest.raises(ValueError, match=UNSET_MESSAGE) as info:
        h.value
    assert "save" in str(info.value)


def test_value_in_a_false_cond_branch_raises_value_error(model, x):
    with model.trace(x) as tracer:
        with tracer.cond(False):
            h = model.layer1.output.save()
    with pytest.raises(ValueError, match=UNSET_MESSAGE):
        h.value


def test_value_after_early_stop_raises_value_error(model, x):
    with model.trace(x):
        model.layer1.output.stop()
        out = model.layer2.output.save()
    with pytest.raises(ValueError, match=UNSET_MESSAGE):
        out.value


def test_value_inside_the_with_block_raises_value_error(model, mlp, x, count_calls):
    with count_calls(mlp) as calls:
        with pytest.raises(ValueError, match=UNSET_MESSAGE):
            with model.trace(x):
                h = model.layer1.output.save()
                h.value
    assert calls[0] == 0


def test_saved_value_from_an_unsaved_intermediate(model, mlp, x):
    with model.trace(x):
        h = model.layer1.output
        y = (h * 2 + 1).save()
    assert torch.allclose(y.value, mlp.layer1(x) * 2 + 1)
    with pytest.raises(ValueError, match=UNSET_MESSAGE):
        h.value


def test_saved_proxy_of_a_python_value(model, mlp, x):
    with model.trace(x):
        n = model.layer1.output.shape[1].save()
        item = model.output.sum().item().save()
    assert n.value == mlp.layer1.out_features
    assert item.value == pytest.approx(mlp(x).sum().item(), abs=1e-5)
    assert n + 1 == mlp.layer1.out_features + 1



def test_value_of_a_module_never_reached_raises_value_error(model, mlp, x):
    model.unused = torch.nn.Linear(10, 10)  # attached, never called by forward
    with model.trace(x):
        never = model.unused.output.save()
    with pytest.raises(ValueError, match=UNSET_MESSAGE):
        never.value


def test_reading_a_module_never_reached_does_not_block_later_reads(model, mlp, x):
    """SPEC §2: a module never reached gives the ValueError for its own value; the rest of the trace still runs."""
    model.unused = torch.nn.Linear(10, 10)  # attached, never called by forward
    with model.trace(x):
        never = model.unused.output.save()
        out = model.output.save()
    assert torch.allclose(out.value, mlp(x))
    with pytest.raises(ValueError, match=UNSET_MESSAGE):
        never.value


def test_saved_value_from_an_earlier_trace_is_usable_in_a_later_trace(model, mlp, x):
    with model.trace(x):
        h = model.layer1.output.save()
    with model.trace(x):
        model.layer1.output[:] = h * -1
        out = model.output.save()
    assert torch.allclose(out.value, mlp.layer2(-mlp.layer1(x)))


def test_a_saved_proxy_answers_isinstance_for_its_value_after_the_run(model, mlp, x):
    with model.trace(x):
        out = model.layer1.output.save()
        assert not isinstance(out, torch.Tensor)  # while recording it is a proxy
        norm = out.norm().item().save()
    assert isinstance(out, torch.Tensor) and type(out) is raysight.Proxy
    assert isinstance(norm, float)
    with torch.no_grad():
        assert round(norm, 3) == round(mlp.layer1(x).norm().item(), 3)
