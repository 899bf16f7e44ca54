"""Early stop and conditions, checked by counting module calls and against plain PyTorch."""

from __future__ import annotations

import pytest
import torch

from raysight.errors import TraceError

from helpers import assert_no_hooks, run_with_hook

UNSET_MESSAGE = r"Accessing value before it's been set\."


# -- early stop ----------------------------------------------------------------------------------------------
@pytest.mark.same_process
def test_output_stop_ends_the_forward_pass(model, mlp, x, count_calls):
    with count_calls(mlp.layer1, mlp.layer2) as calls:
        with model.trace(x):
            h = model.layer1.output.save()
            model.layer1.output.stop()
            out = model.layer2.output.save()
    assert calls.counts == [1, 0]
    assert torch.allclose(h.value, mlp.layer1(x))
    with pytest.raises(ValueError, match=UNSET_MESSAGE):
        out.value
    assert_no_hooks(mlp)


@pytest.mark.same_process
def test_tracer_stop_ends_the_forward_pass(stack_model, stack, x4, count_calls):
    with count_calls(stack.layers[0], stack.layers[1], stack.layers[2], stack.head) as calls:
        with stack_model.trace(x4) as tracer:
            h = stack_model.layers[1].output.save()
            tracer.stop()
            late = stack_model.layers[2].output.save()
    assert calls.counts == [1, 1, 0, 0]
    seen = {}
    run_with_hook(stack, stack.layers[1], lambda o: seen.setdefault("h", o), x4)
    assert torch.allclose(h.value, seen["h"])
    with pytest.raises(ValueError, match=UNSET_MESSAGE):
        late.value
    assert_no_hooks(stack)


def test_interventions_before_a_stop_still_apply(model, mlp, x):
    with model.trace(x):
        model.layer1.output[:] = 0
        h = model.layer1.output.save()
        model.layer1.output.stop()
    assert torch.equal(h.value, torch.zeros(2, 10))


# -- conditions ----------------------------------------------------------------------------------------------
def test_cond_with_a_true_proxy_predicate_runs_its_body(model, mlp, x):
    total = mlp.layer1(x).sum().item()
    with model.trace(x) as tracer:
        with tracer.cond(model.layer1.output.sum() > total - 1):
            model.layer1.output[:] = 0
        out = model.output.save()
    assert torch.allclose(out.value, mlp.layer2(torch.zeros(2, 10)))


def test_cond_with_a_false_proxy_predicate_skips_its_body(model, mlp, x):
    total = mlp.layer1(x).sum().item()
    with model.trace(x) as tracer:
        with tracer.cond(model.layer1.output.sum() > total + 1):
            model.layer1.output[:] = 0
            inside = model.layer2.output.save()
        out = model.output.save()
    assert torch.allclose(out.value, mlp(x))
    with pytest.raises(ValueError, match=UNSET_MESSAGE):
        inside.value


@pytest.mark.parametrize("flag", [True, False])
def test_cond_with_a_plain_bool_predicate(model, mlp, x, flag):
    with model.trace(x) as tracer:
        with tracer.cond(flag):
            model.layer1.output[:] = 1
        out = model.output.save()
    expected = mlp.layer2(torch.ones(2, 10)) if flag else mlp(x)
    assert torch.allclose(out.value, expected)


def test_nested_conds(model, mlp, x):
    h = mlp.layer1(x)
    with model.trace(x) as tracer:
        s = model.layer1.output.sum()
        with tracer.cond(s > h.sum().item() - 1):  # true
            a = model.layer1.output.max().save()
            with tracer.cond(s > h.sum().item() + 1):  # false
                b = model.layer1.output.min().save()
            with tracer.cond(s < h.sum().item() + 1):  # true
                c = model.layer1.output.mean().save()
        with tracer.cond(s < h.sum().item() - 1):  # false
            with tracer.cond(True):
                d = model.layer1.output.std().save()
    assert torch.allclose(a.value, h.max())
    assert torch.allclose(c.value, h.mean())
    for never in (b, d):
        with pytest.raises(ValueError, match=UNSET_MESSAGE):
            never.value


def test_cond_does_not_leak_out_of_its_block(model, mlp, x):
    with model.trace(x) as tracer:
        with tracer.cond(False):
            model.layer1.output[:] = 0
        after = model.layer1.output.clone().save()
    assert torch.allclose(after.value, mlp.layer1(x))


def test_cond_sees_edits_made_earlier_in_program_order(model, mlp, x):
    assert mlp.layer1(x).abs().sum() != 0  # without the edit the predicate would be false
    with model.trace(x) as tracer:
        model.layer1.output[:] = 0
        with tracer.cond(model.layer1.output.abs().sum() == 0):
            flag = model.layer1.output.sum().save()
            model.layer1.output[:] = 2
        out = model.output.save()
    assert flag.value.item() == 0
    assert torch.allclose(out.value, mlp.layer2(torch.full((2, 10), 2.0)))


def test_cond_with_multi_element_predicate_via_torch_all(model, mlp, x):
    h = mlp.layer1(x)
    with model.trace(x) as tracer:
        with tracer.cond(torch.all(model.layer1.output > h.min() - 1)):
            hit = model.layer1.output.save()
    assert torch.allclose(hit.value, h)


def test_cond_inside_an_invoke_uses_that_invokes_rows(model, mlp, x, xb):
    # choose a threshold that separates the two invokes' row sums
    s0, s1 = mlp.layer1(x).sum().item(), mlp.layer1(xb).sum().item()
    thr = (s0 + s1) / 2
    with model.trace() as tracer:
        with tracer.invoke(x):
            with tracer.cond(model.layer1.output.sum() > thr):
                model.layer1.output[:] = 0
        with tracer.invoke(xb):
            with tracer.cond(model.layer1.output.sum() > thr):
                model.layer1.output[:] = 0
        out = model.output.save()
    e0 = mlp.layer2(torch.zeros(2, 10)) if s0 > thr else mlp(x)
    e1 = mlp.layer2(torch.zeros(3, 10)) if s1 > thr else mlp(xb)
    assert torch.allclose(out.value, torch.cat([e0, e1]), atol=1e-6)


def test_log_inside_a_false_cond_prints_nothing(model, mlp, x, capsys):
    with model.trace(x) as tracer:
        with tracer.cond(model.layer1.output.sum() > mlp.layer1(x).sum().item() + 1):
            tracer.log("inside", model.layer1.output.sum())
        tracer.log("after", model.layer2.output.shape)
    printed = capsys.readouterr().out
    print("after", mlp(x).shape)
    assert printed == capsys.readouterr().out


# -- else_ / elif (nnsight 0.4's Condition.else_) ---------------------------------------------------------------
@pytest.mark.parametrize("offset, branch", [(-1, "if"), (1, "elif"), (3, "else")])
def test_cond_else_chain_runs_exactly_one_branch(model, mlp, x, offset, branch):
    """if / elif / else as `tracer.cond(p) as c`, `c.else_(q) as c2`, `c2.else_()`: the branch plain Python takes."""
    total = mlp.layer1(x).sum().item()
    fill = {"if": 1.0, "elif": 2.0, "else": 3.0}
    with model.trace(x) as tracer:
        s = model.layer1.output.sum()
        with tracer.cond(s > total + offset) as c:  # true only for offset -1
            model.layer1.output[:] = fill["if"]
        with c.else_(s > total + offset - 2) as c2:  # true for offset 1
            model.layer1.output[:] = fill["elif"]
        with c2.else_():
            model.layer1.output[:] = fill["else"]
        out = model.output.save()
    if total > total + offset:
        taken = "if"
    elif total > total + offset - 2:
        taken = "elif"
    else:
        taken = "else"
    assert taken == branch
    assert torch.allclose(out.value, mlp.layer2(torch.full((2, 10), fill[taken])))


@pytest.mark.parametrize("flag", [True, False])
def test_session_cond_else(model, mlp, x, flag):
    with model.session() as session:
        with session.cond(flag) as c:
            with model.trace(x):
                model.layer1.output[:] = 0
                out_if = model.output.save()
        with c.else_():
            with model.trace(x):
                out_else = model.output.save()
    if flag:
        assert torch.allclose(out_if.value, mlp.layer2(torch.zeros(2, 10)))
        with pytest.raises(ValueError, match=UNSET_MESSAGE):
            out_else.value
    else:
        assert torch.allclose(out_else.value, mlp(x))
        with pytest.raises(ValueError, match=UNSET_MESSAGE):
            out_if.value


def test_else_inside_its_own_cond_block_is_a_trace_error(model, x):
    with pytest.raises(TraceError, match="must follow"):
        with model.trace(x) as tracer:
            with tracer.cond(model.layer1.output.sum() > 0) as c:
                with c.else_():
                    pass
