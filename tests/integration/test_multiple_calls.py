"""Several calls of one module: ``envoy.next()``, ``model.next()``, ``envoy.all()``, ``envoy.iter[...]``.

``loop`` applies one ``cell`` (a container with a child ``lin``) three times; ``rnn`` runs ``inp``/``rec`` once per
time step. Oracles record every call with a plain forward hook (``all_calls_outputs``) or edit chosen calls with
one (``run_with_call_hook``).
"""

from __future__ import annotations

import pytest
import torch

import raysight
from helpers import all_calls_outputs, assert_no_hooks, notes_text, run_with_call_hook, unchanged


def _close(a, b) -> bool:
    return torch.allclose(a, b, atol=1e-6)


# -- .next() --------------------------------------------------------------------------------------------------
def test_output_without_next_is_the_first_call(loop_model, loop, x4):
    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    with loop_model.trace(x4):
        a = loop_model.cell.output.save()
    assert _close(a.value, outs[0])


def test_next_reads_each_call_in_turn(loop_model, loop, x4):
    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    with loop_model.trace(x4):
        a = loop_model.cell.output.save()
        b = loop_model.cell.next().output.save()
        c = loop_model.cell.next().output.save()
    assert [_close(v.value, o) for v, o in zip((a, b, c), outs)] == [True, True, True]


def test_next_is_chainable(loop_model, loop, x4):
    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    with loop_model.trace(x4):
        c = loop_model.cell.next().next().output.save()
    assert _close(c.value, outs[2])


def test_next_is_sticky_for_later_accesses(loop_model, loop, x4):
    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    with loop_model.trace(x4):
        loop_model.cell.next()
        b1 = loop_model.cell.output.save()
        b2 = loop_model.cell.output.save()
    assert _close(b1.value, outs[1])
    assert _close(b2.value, outs[1])


def test_next_with_steps_skips_calls(loop_model, loop, x4):
    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    with loop_model.trace(x4):
        c = loop_model.cell.next(2).output.save()
    assert _close(c.value, outs[2])


def test_next_moves_descendants_too(loop_model, loop, x4):
    lin_outs, _ = all_calls_outputs(loop, loop.cell.lin, x4)
    with loop_model.trace(x4):
        loop_model.cell.next()
        b = loop_model.cell.lin.output.save()
    assert _close(b.value, lin_outs[1])


def test_next_of_a_child_does_not_move_its_parent(loop_model, loop, x4):
    cell_outs, _ = all_calls_outputs(loop, loop.cell, x4)
    lin_outs, _ = all_calls_outputs(loop, loop.cell.lin, x4)
    with loop_model.trace(x4):
        lin1 = loop_model.cell.lin.next().output.save()
        cell1 = loop_model.cell.next().output.save()
    assert _close(lin1.value, lin_outs[1])
    assert _close(cell1.value, cell_outs[1])


def test_model_next_moves_every_module(loop_model, loop, x4):
    cell_outs, _ = all_calls_outputs(loop, loop.cell, x4)
    lin_outs, _ = all_calls_outputs(loop, loop.cell.lin, x4)
    with loop_model.trace(x4):
        loop_model.next()
        lin1 = loop_model.cell.lin.output.save()
        cell1 = loop_model.cell.output.save()
    assert _close(lin1.value, lin_outs[1])
    assert _close(cell1.value, cell_outs[1])


def test_next_position_does_not_carry_over_to_the_next_trace(loop_model, loop, x4):
    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    with loop_model.trace(x4):
        loop_model.cell.next().next().output.save()
    with loop_model.trace(x4):
        a = loop_model.cell.output.save()
    assert _close(a.value, outs[0])


def test_setting_the_output_of_the_second_call_only(loop_model, loop, x4):
    want = run_with_call_hook(loop, loop.cell, lambda i, out: out * 0 if i == 1 else None, x4)
    with loop_model.trace(x4):
        loop_model.cell.next().output[:] = 0
        out = loop_model.output.save()
    assert _close(out.value, want)


def test_next_on_a_recurrent_model_reads_each_time_step(rnn_model, rnn, xseq):
    rec_outs, _ = all_calls_outputs(rnn, rnn.rec, xseq)
    assert len(rec_outs) == xseq.shape[1]
    with rnn_model.trace(xseq):
        r0 = rnn_model.rec.output.save()
        r3 = rnn_model.rec.next(3).output.save()
    assert _close(r0.value, rec_outs[0])
    assert _close(r3.value, rec_outs[3])


# -- .all() ---------------------------------------------------------------------------------------------------
def test_all_as_a_with_block_collects_every_call(loop_model, loop, x4):
    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    with loop_model.trace(x4):
        acc = raysight.list().save()
        with loop_model.cell.all():
            acc.append(loop_model.cell.output.clone())
    assert len(acc.value) == 3
    assert [_close(v, o) for v, o in zip(acc.value, outs)] == [True, True, True]


def test_all_as_a_statement_collects_every_call(loop_model, loop, x4):
    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    with loop_model.trace(x4):
        acc = raysight.list().save()
        loop_model.cell.all()
        acc.append(loop_model.cell.output.clone())
    assert len(acc.value) == 3
    assert [_close(v, o) for v, o in zip(acc.value, outs)] == [True, True, True]


def test_all_covers_descendants(loop_model, loop, x4):
    lin_outs, _ = all_calls_outputs(loop, loop.cell.lin, x4)
    with loop_model.trace(x4):
        acc = raysight.list().save()
        with loop_model.cell.all():
            acc.append(loop_model.cell.lin.output.clone())
    assert len(acc.value) == 3
    assert [_close(v, o) for v, o in zip(acc.value, lin_outs)] == [True, True, True]


def test_all_on_a_recurrent_model_collects_every_time_step(rnn_model, rnn, xseq):
    rec_outs, _ = all_calls_outputs(rnn, rnn.rec, xseq)
    with rnn_model.trace(xseq):
        acc = raysight.list().save()
        with rnn_model.rec.all():
            acc.append(rnn_model.rec.output.clone())
    assert len(acc.value) == len(rec_outs) == 4
    assert all(_close(v, o) for v, o in zip(acc.value, rec_outs))


def test_input_read_after_output_under_all_is_each_calls_own_input(loop_model, loop, x4):
    ins: list = []
    handle = loop.cell.register_forward_pre_hook(lambda mod, a: ins.append(a[0].detach().clone()))
    try:
        outs, _ = all_calls_outputs(loop, loop.cell, x4)
    finally:
        handle.remove()
    with loop_model.trace(x4):
        got_out, got_in = raysight.list().save(), raysight.list().save()
        with loop_model.cell.all():
            got_out.append(loop_model.cell.output.clone())
            got_in.append(loop_model.cell.input.clone())  # the input fired before the output it follows here
    assert len(got_in.value) == len(ins) == 3
    assert all(_close(v, i) for v, i in zip(got_in.value, ins))
    assert all(_close(v, o) for v, o in zip(got_out.value, outs))
    assert not _close(ins[1], ins[2])  # (the calls' inputs differ: each step got its own)


def test_zeroing_under_all_affects_every_call(loop_model, loop, x4):
    want = run_with_call_hook(loop, loop.cell, lambda i, out: torch.zeros_like(out), x4)
    with loop_model.trace(x4):
        loop_model.cell.all()
        loop_model.cell.output[:] = 0
        out = loop_model.output.save()
    assert _close(out.value, want)


def test_scaling_under_all_compounds_over_the_calls(loop_model, loop, x4):
    want = run_with_call_hook(loop, loop.cell, lambda i, out: out * 0.5, x4)
    with loop_model.trace(x4):
        with loop_model.cell.all():
            loop_model.cell.output = loop_model.cell.output * 0.5
        out = loop_model.output.save()
    assert _close(out.value, want)


def test_nodes_unrelated_to_the_module_inside_all_run_once(loop_model, loop, x4):
    with loop_model.trace(x4):
        once = raysight.list().save()
        with loop_model.cell.all():
            loop_model.cell.output.clone()
            once.append(1)
    assert once.value == [1]


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_applied_function_unrelated_to_the_module_runs_once_inside_and_after_all(loop_model, loop, x4):
    calls: list = []

    def side(tag):
        calls.append(tag)
        return tag

    with loop_model.trace(x4):
        with loop_model.cell.all():
            loop_model.cell.output.clone()
            raysight.apply(side, "inside")
        raysight.apply(side, "after")
    assert sorted(calls) == ["after", "inside"]


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_applied_function_on_a_single_call_module_after_all_runs_once(loop_model, loop, x4):
    calls: list = []

    def side(t):
        calls.append(t.detach().clone())
        return t

    with loop_model.trace(x4):
        with loop_model.cell.all():
            loop_model.cell.output.clone()
        raysight.apply(side, loop_model.head.output)
    assert len(calls) == 1
    assert _close(calls[0], loop(x4))


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_applied_function_on_the_module_inside_all_runs_once_per_call(loop_model, loop, x4):
    calls: list = []

    def side(t):
        calls.append(t.detach().clone())
        return t

    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    with loop_model.trace(x4):
        with loop_model.cell.all():
            raysight.apply(side, loop_model.cell.output)
    assert len(calls) == 3
    assert all(_close(c, o) for c, o in zip(calls, outs))


# -- .iter[...] -------------------------------------------------------------------------------------------------
def _iter_collect(loop_model, x4, selection):
    with loop_model.trace(x4):
        acc = raysight.list().save()
        loop_model.cell.iter[selection]
        acc.append(loop_model.cell.output.clone())
    return acc.value


def test_iter_index_selects_that_call(loop_model, loop, x4):
    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    got = _iter_collect(loop_model, x4, 1)
    assert len(got) == 1
    assert _close(got[0], outs[1])


def test_iter_slice_selects_those_calls(loop_model, loop, x4):
    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    got = _iter_collect(loop_model, x4, slice(0, 2))
    assert len(got) == 2
    assert _close(got[0], outs[0]) and _close(got[1], outs[1])


def test_iter_list_selects_those_calls(loop_model, loop, x4):
    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    got = _iter_collect(loop_model, x4, [0, 2])
    assert len(got) == 2
    assert _close(got[0], outs[0]) and _close(got[1], outs[2])


def test_iter_as_a_with_block_edits_only_the_selected_calls(loop_model, loop, x4):
    want = run_with_call_hook(loop, loop.cell, lambda i, out: out * 0 if i in (0, 2) else None, x4)
    with loop_model.trace(x4):
        with loop_model.cell.iter[[0, 2]]:
            loop_model.cell.output[:] = 0
        out = loop_model.output.save()
    assert _close(out.value, want)


# -- bad input ----------------------------------------------------------------------------------------------------
def test_next_past_the_last_call_raises_missed_provider_error(loop_model, loop, x4):
    with unchanged(loop):
        with pytest.raises(raysight.MissedProviderError) as info:
            with loop_model.trace(x4):
                loop_model.cell.next().next().next().output.save()
    text = notes_text(info.value)
    assert "model.cell" in text
    assert str(loop.STEPS) in text


def test_iter_with_a_negative_index_raises_index_error(loop_model, loop, x4):
    with unchanged(loop):
        with pytest.raises(IndexError):
            with loop_model.trace(x4):
                loop_model.cell.iter[-1]
                loop_model.cell.output.save()


def test_iter_with_a_string_raises_type_error(loop_model, loop, x4):
    with unchanged(loop):
        with pytest.raises(TypeError):
            with loop_model.trace(x4):
                loop_model.cell.iter["a"]
                loop_model.cell.output.save()


def test_iter_past_the_last_call_raises_missed_provider_error(loop_model, loop, x4):
    with unchanged(loop):
        with pytest.raises(raysight.MissedProviderError) as info:
            with loop_model.trace(x4):
                acc = raysight.list().save()
                loop_model.cell.iter[[1, 5]]
                acc.append(loop_model.cell.output.clone())
    assert "model.cell" in notes_text(info.value)


def test_no_hooks_after_a_multi_call_trace(loop_model, loop, x4):
    with loop_model.trace(x4):
        with loop_model.cell.all():
            loop_model.cell.output[:] = 0
        loop_model.output.save()
    assert_no_hooks(loop)


# -- several invokes ------------------------------------------------------------------------------------------------
def test_all_in_each_of_two_invokes_collects_that_invokes_rows(loop_model, loop, x4):
    xa, xb = x4, x4.flip(0) * 2 + 0.5
    outs_a, _ = all_calls_outputs(loop, loop.cell, xa)
    outs_b, _ = all_calls_outputs(loop, loop.cell, xb)
    with loop_model.trace() as tracer:
        with tracer.invoke(xa):
            acc_a = raysight.list().save()
            with loop_model.cell.all():
                acc_a.append(loop_model.cell.output.clone())
        with tracer.invoke(xb):
            acc_b = raysight.list().save()
            with loop_model.cell.all():
                acc_b.append(loop_model.cell.output.clone())
    assert len(acc_a.value) == len(acc_b.value) == 3
    assert all(_close(v, o) for v, o in zip(acc_a.value, outs_a))
    assert all(_close(v, o) for v, o in zip(acc_b.value, outs_b))


def test_next_position_starts_at_the_first_call_in_each_invoke(loop_model, loop, x4):
    """nnsight 0.4 resets every envoy's call position when an invoke is entered (``Invoker.__enter__`` calls
    ``_envoy._reset()``), so ``.next()`` in one invoke does not shift the calls read in the next one."""
    xa, xb = x4, x4.flip(0) * 2 + 0.5
    outs_a, _ = all_calls_outputs(loop, loop.cell, xa)
    outs_b, _ = all_calls_outputs(loop, loop.cell, xb)
    with loop_model.trace() as tracer:
        with tracer.invoke(xa):
            a1 = loop_model.cell.next().output.save()
        with tracer.invoke(xb):
            b0 = loop_model.cell.output.save()
            b2 = loop_model.cell.next(2).output.save()
    assert _close(a1.value, outs_a[1])
    assert _close(b0.value, outs_b[0])
    assert _close(b2.value, outs_b[2])


def test_value_accumulated_under_all_is_complete_when_read_after_a_later_module(loop_model, loop, x4):
    outs, _ = all_calls_outputs(loop, loop.cell, x4)
    with loop_model.trace(x4):
        acc = raysight.list().save()
        with loop_model.cell.all():
            acc.append(loop_model.cell.output.sum())
        loop_model.head.output  # waits for the end of the loop
        total = raysight.apply(sum, acc).save()
    assert torch.allclose(total.value, sum(o.sum() for o in outs), atol=1e-5)
