"""Persistent edits: ``model.edit()`` / ``model.edit(x)`` / ``edit(inplace=True)``, composition, ``clear_edits()``,
edits across batch sizes and invokes, edits calling attached modules, and failing edits.

Oracles run the torch module with a plain forward hook that does what the edit does (``run_with_hook``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_no_hooks, run_with_call_hook, run_with_hook, unchanged


def _close(a, b) -> bool:
    return torch.allclose(a, b, atol=1e-6)


def _zero_col0(out: torch.Tensor) -> torch.Tensor:
    out = out.clone()
    out[:, 0] = 0
    return out


@pytest.fixture
def x1(x) -> torch.Tensor:
    """One row: an edit recorded with batch size 1."""
    return x[:1]


@pytest.fixture
def x_batch4() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(4, 5, generator=g)


# -- model.edit() -----------------------------------------------------------------------------------------------
def test_edit_applies_to_a_later_trace_of_the_edited_model(model, mlp, x):
    want = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    with edited.trace(x):
        out = edited.output.save()
    assert _close(out.value, want)


def test_edit_does_not_apply_to_the_original_model(model, mlp, x):
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    with model.trace(x):
        out = model.output.save()
    assert _close(out.value, mlp(x))
    assert not _close(out.value, run_with_hook(mlp, mlp.layer1, _zero_col0, x))


def test_edit_applies_to_every_later_trace(model, mlp, x, xb):
    want_x = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    want_xb = run_with_hook(mlp, mlp.layer1, _zero_col0, xb)
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    for inp, want in ((x, want_x), (xb, want_xb), (x, want_x)):
        with edited.trace(inp):
            out = edited.output.save()
        assert _close(out.value, want)


def test_trace_of_edited_model_sees_the_edit_in_module_values(model, mlp, x):
    want_h = _zero_col0(mlp.layer1(x))
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    with edited.trace(x):
        h = edited.layer1.output.save()
    assert _close(h.value, want_h)


def test_trace_interventions_combine_with_the_edit(model, mlp, x):
    def both(out):
        out = _zero_col0(out)
        out[:, 1] = 5
        return out

    want = run_with_hook(mlp, mlp.layer1, both, x)
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    with edited.trace(x):
        edited.layer1.output[:, 1] = 5
        out = edited.output.save()
    assert _close(out.value, want)


def test_edit_with_an_input_applies_its_intervention(model, mlp, x1, xb):
    want = run_with_hook(mlp, mlp.layer1, _zero_col0, xb)
    with model.edit(x1) as edited:
        model.layer1.output[:, 0] = 0
    with edited.trace(xb):
        out = edited.output.save()
    assert _close(out.value, want)


def test_edit_runs_no_forward_pass(model, mlp, x1, count_real_calls):
    with count_real_calls(mlp) as calls:
        with model.edit() as edited:
            model.layer1.output[:, 0] = 0
        with model.edit(x1) as edited2:
            model.layer1.output[:, 1] = 0
    assert calls[0] == 0


# -- shared weights --------------------------------------------------------------------------------------------------
def test_edited_model_shares_parameter_tensors(model, mlp):
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    assert edited.layer1.weight is mlp.layer1.weight
    assert edited.layer1.weight is model.layer1.weight
    assert edited.layer2.bias.data_ptr() == mlp.layer2.bias.data_ptr()


def test_edited_model_sees_a_later_weight_change(model, mlp, x):
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    with torch.no_grad():
        mlp.layer2.bias.add_(3.0)
    want = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    with edited.trace(x):
        out = edited.output.save()
    assert _close(out.value, want)


# -- inplace, composition, clear_edits ------------------------------------------------------------------------------
def test_inplace_edit_applies_to_the_model_itself(model, mlp, x):
    want = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    with model.edit(inplace=True) as target:
        model.layer1.output[:, 0] = 0
    assert target is model
    with model.trace(x):
        out = model.output.save()
    assert _close(out.value, want)


def test_two_edits_compose(model, mlp, x):
    def both(out):
        return _zero_col0(out) * 2

    want = run_with_hook(mlp, mlp.layer1, both, x)
    with model.edit(inplace=True):
        model.layer1.output[:, 0] = 0
    with model.edit(inplace=True):
        model.layer1.output = model.layer1.output * 2
    with model.trace(x):
        out = model.output.save()
    assert _close(out.value, want)


def test_edits_compose_in_recording_order(model, mlp, x):
    """add-then-double differs from double-then-add."""
    want = run_with_hook(mlp, mlp.layer1, lambda out: (out + 1) * 2, x)
    assert not _close(want, run_with_hook(mlp, mlp.layer1, lambda out: out * 2 + 1, x))
    with model.edit(inplace=True):
        model.layer1.output = model.layer1.output + 1
    with model.edit(inplace=True):
        model.layer1.output = model.layer1.output * 2
    with model.trace(x):
        out = model.output.save()
    assert _close(out.value, want)


def test_editing_an_edited_copy_keeps_the_first_copy_unchanged(model, mlp, x):
    want_once = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    want_twice = run_with_hook(mlp, mlp.layer1, lambda out: _zero_col0(out) + 1, x)
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    with edited.edit() as edited2:
        edited.layer1.output = edited.layer1.output + 1
    with edited.trace(x):
        out1 = edited.output.save()
    with edited2.trace(x):
        out2 = edited2.output.save()
    with model.trace(x):
        out0 = model.output.save()
    assert _close(out1.value, want_once)
    assert _close(out2.value, want_twice)
    assert _close(out0.value, mlp(x))


def test_repeated_traces_of_several_shapes_each_see_the_current_edits(model, mlp, x):
    """Traces of an edited model in a loop, alternating shapes (so their edit copies sit at different indices),
    then with a second edit added and after clear_edits: each run equals the hook oracle of the edits it had."""
    first = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    handle = mlp.layer2.register_forward_hook(lambda mod, a, out: out * 2)
    try:
        both = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    finally:
        handle.remove()
    hidden_edited = _zero_col0(mlp.layer1(x))
    with model.edit(inplace=True):
        model.layer1.output[:, 0] = 0
    for step, (expected, hidden_expected) in enumerate(
        ((first, hidden_edited), (both, hidden_edited), (mlp(x), mlp.layer1(x)))
    ):
        if step == 1:
            with model.edit(inplace=True):
                model.layer2.output = model.layer2.output * 2
        elif step == 2:
            model.clear_edits()
        for _ in range(3):
            with model.trace(x):
                out = model.output.save()
            with model.trace(x):
                hidden = model.layer1.output.save()
                out2 = model.output.save()
            assert _close(out.value, expected) and _close(out2.value, expected)
            assert _close(hidden.value, hidden_expected)
    assert not _close(first, both) and not _close(first, mlp(x))


def test_clear_edits_frees_what_the_edits_held(model, mlp, x):
    """A tensor that only an edit holds is freed by clear_edits, after traces ran the edit (and kept its copies)."""
    import gc
    import weakref

    big = torch.full((1, 10), 3.0)
    held = weakref.ref(big)
    with model.edit(inplace=True):
        model.layer1.output = model.layer1.output + big
    del big
    for _ in range(2):
        with model.trace(x):
            out = model.output.save()
    assert _close(out.value, mlp.layer2(mlp.layer1(x) + 3.0))
    assert held() is not None
    model.clear_edits()
    gc.collect()
    assert held() is None


def test_clear_edits_removes_every_edit(model, mlp, x):
    with model.edit(inplace=True):
        model.layer1.output[:, 0] = 0
    with model.edit(inplace=True):
        model.layer2.output = model.layer2.output + 1
    model.clear_edits()
    with model.trace(x):
        out = model.output.save()
    assert _close(out.value, mlp(x))


def test_clear_edits_of_a_copy_leaves_other_copies_edited(model, mlp, x):
    want = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    with model.edit() as a:
        model.layer1.output[:, 0] = 0
    with model.edit() as b:
        model.layer1.output[:, 0] = 0
    a.clear_edits()
    with a.trace(x):
        out_a = a.output.save()
    with b.trace(x):
        out_b = b.output.save()
    assert _close(out_a.value, mlp(x))
    assert _close(out_b.value, want)


# -- batch sizes and invokes ---------------------------------------------------------------------------------------
def test_edit_recorded_with_batch_one_applies_to_batch_four(model, mlp, x1, x_batch4):
    want = run_with_hook(mlp, mlp.layer1, lambda out: out + torch.ones(out.shape), x_batch4)
    with model.edit(x1) as edited:
        model.layer1.output = model.layer1.output + torch.ones(model.layer1.output.shape)
    with edited.trace(x_batch4):
        out = edited.output.save()
    assert out.value.shape == (4, 2)
    assert _close(out.value, want)


def test_edit_recorded_with_batch_one_applies_to_every_invoke(model, mlp, x1, x, xb):
    want_x = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    want_xb = run_with_hook(mlp, mlp.layer1, _zero_col0, xb)
    with model.edit(x1) as edited:
        model.layer1.output[:, 0] = 0
    with edited.trace() as tracer:
        with tracer.invoke(x):
            out_x = edited.output.save()
        with tracer.invoke(xb):
            out_xb = edited.output.save()
    assert _close(out_x.value, want_x)
    assert _close(out_xb.value, want_xb)


# -- attached modules ------------------------------------------------------------------------------------------------
def test_edit_calling_an_attached_module_with_hook_true(model, mlp, x):
    torch.manual_seed(7)
    extra = nn.Linear(10, 10)
    model.layer1.extra = extra
    want_extra = extra(mlp.layer1(x))
    want = mlp.layer2(want_extra)
    with model.edit() as edited:
        model.layer1.output = model.layer1.extra(model.layer1.output, hook=True)
    with edited.trace(x):
        seen = edited.layer1.extra.output.save()
        out = edited.output.save()
    assert _close(seen.value, want_extra)
    assert _close(out.value, want)
    with model.trace(x):
        plain = model.output.save()
    assert _close(plain.value, mlp(x))
    assert_no_hooks(mlp)


def test_module_called_in_an_edit_is_hooked_without_hook_true(model, mlp, x):
    """nnsight 0.4's editing tutorial: ``submodule.sae(acts)`` inside ``model.edit()`` runs through the attached
    module's hooks (as with ``hook=True``), so later traces read ``.sae.output``; in a trace the call stays unhooked."""
    model.layer1.extra = nn.Linear(10, 10)
    want_extra = mlp.layer1.extra(mlp.layer1(x))
    with model.edit() as edited:
        model.layer1.output = model.layer1.extra(model.layer1.output)
    with edited.trace(x):
        seen = edited.layer1.extra.output.save()
        out = edited.output.save()
    assert _close(seen.value, want_extra)
    assert _close(out.value, mlp.layer2(want_extra))
    with model.trace(x):
        model.layer1.output = model.layer1.extra(model.layer1.output)
        unhooked = model.layer1.extra.output.save()
    with pytest.raises(ValueError, match="never produced"):
        unhooked.value
    assert_no_hooks(mlp)


def test_a_call_of_a_module_the_forward_runs_stays_unhooked_in_an_edit(model, mlp, x):
    """Only attached modules are hooked when called in an edit: ``model.layer2(h)`` hooked would be layer2's first
    call, and the edit's own ``layer2.output`` would then mean the ad-hoc call's."""
    h = mlp.layer1(x)
    with model.edit() as edited:
        extra = model.layer2(model.layer1.output) * 0.5
        model.layer2.output = model.layer2.output + extra
    with edited.trace(x):
        out = edited.output.save()
    assert _close(out.value, mlp.layer2(h) * 1.5)
    assert_no_hooks(mlp)


# -- failing edits -----------------------------------------------------------------------------------------------------
def test_failing_edit_with_an_input_raises_at_the_edit(model, mlp, x1, count_real_calls):
    reached_end = []
    with unchanged(mlp), count_real_calls(mlp) as calls:
        with pytest.raises(IndexError):
            with model.edit(x1):
                model.layer1.output[:, 99] = 0
                reached_end.append(True)
    assert reached_end == []
    assert calls[0] == 0


def test_failing_inplace_edit_leaves_the_model_unedited(model, mlp, x1, x):
    with unchanged(mlp):
        with pytest.raises(IndexError):
            with model.edit(x1, inplace=True):
                model.layer1.output[:, 99] = 0
    with model.trace(x):
        out = model.output.save()
    assert _close(out.value, mlp(x))
    assert_no_hooks(mlp)


def test_failing_edit_of_a_copy_leaves_the_earlier_edits(model, mlp, x1, x):
    want = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    with model.edit(inplace=True):
        model.layer1.output[:, 0] = 0
    with pytest.raises(IndexError):
        with model.edit(x1, inplace=True):
            model.layer1.output[:, 99] = 0
    with model.trace(x):
        out = model.output.save()
    assert _close(out.value, want)
    assert_no_hooks(mlp)


def test_exception_inside_an_edit_block_records_no_edit(model, mlp, x):
    with pytest.raises(ZeroDivisionError):
        with model.edit(inplace=True):
            model.layer1.output[:, 0] = 0
            1 / 0
    with model.trace(x):
        out = model.output.save()
    assert _close(out.value, mlp(x))


def test_no_hooks_remain_after_tracing_an_edited_model(model, mlp, x):
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    with edited.trace(x):
        edited.output.save()
    assert_no_hooks(mlp)


# -- nnsight 0.4 compatibility: the edited model is a shallow copy sharing the envoys ---------------------------------
def test_edited_models_own_envoys_record_inside_the_edit_block(model, mlp, x):
    """nnsight 0.4's ``EditingTracer.__enter__`` returns the edited (shallow-copied) model, whose envoys are those of
    ``model``; writing through it inside the block records the edit."""
    want = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    with model.edit() as edited:
        edited.layer1.output[:, 0] = 0
    with edited.trace(x):
        out = edited.output.save()
    assert _close(out.value, want)


def test_original_envoys_work_inside_a_trace_of_the_edited_model(model, mlp, x):
    """The pattern of nnsight 0.4's ``NNsight.edit`` docstring: ``l0 = gpt2.transformer.h[0]`` is read inside
    ``with gpt2_edited.trace(...)``, and ``gpt2.output`` is saved there too."""
    want_h = _zero_col0(mlp.layer1(x))
    want = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    l1 = model.layer1
    with model.edit() as edited:
        l1.output[:, 0] = 0
    with edited.trace(x):
        h = l1.output.save()
        out = model.output.save()
    assert _close(h.value, want_h)
    assert _close(out.value, want)


# -- edits and other ways of running -----------------------------------------------------------------------------------
def test_trace_false_on_an_edited_model_applies_the_edits(model, mlp, x):
    want = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    out = edited.trace(x, trace=False)
    assert _close(out, want)


def test_trace_false_after_an_inplace_edit_applies_the_edit(model, mlp, x):
    want = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    with model.edit(inplace=True):
        model.layer1.output[:, 0] = 0
    out = model.trace(x, trace=False)
    assert _close(out, want)


def test_validated_trace_of_an_edited_model(model, mlp, x):
    want = run_with_hook(mlp, mlp.layer1, _zero_col0, x)
    with model.edit() as edited:
        model.layer1.output[:, 0] = 0
    with edited.trace(x, validate=True):
        out = edited.output.save()
    assert _close(out.value, want)


def test_edit_under_all_applies_to_every_call_of_a_reused_module(loop_model, loop, x4):
    want = run_with_call_hook(loop, loop.cell, lambda i, out: out * 0.5, x4)
    with loop_model.edit() as edited:
        with loop_model.cell.all():
            loop_model.cell.output = loop_model.cell.output * 0.5
    for _ in range(2):
        with edited.trace(x4):
            out = edited.output.save()
        assert _close(out.value, want)


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_gradient_edit_applies_to_a_backward_in_a_later_trace(model, mlp, x):
    """An edit that blocks the gradient at layer1's output; the backward() is recorded in the later trace."""

    def block(mod, a, out):
        out.register_hook(lambda g: torch.zeros_like(g))

    handle = mlp.layer1.register_forward_hook(block)
    try:
        mlp(x).sum().backward()
    finally:
        handle.remove()
    want = {n: p.grad.clone() for n, p in mlp.named_parameters()}
    assert want["layer1.weight"].abs().sum() == 0
    mlp.zero_grad(set_to_none=True)
    with model.edit() as edited:
        model.layer1.output.grad[:] = 0
    with edited.trace(x):
        edited.output.sum().backward()
    for name, p in mlp.named_parameters():
        assert p.grad is not None and _close(p.grad, want[name]), name
