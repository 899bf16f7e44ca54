"""``model.scan(x)``, ``trace(scan=True)``, ``invoke(scan=True)`` and ``validate=True``: concrete shapes while
tracing from a fake run that computes and changes nothing real; mistakes raised at the user's line before any real
forward pass. Oracles are plain torch runs (shapes and values of the torch module's own outputs)."""

from __future__ import annotations

import os

import pytest
import torch

import raysight
from helpers import all_calls_outputs, capture, notes_text, unchanged

THIS_FILE = os.path.basename(__file__)


# -- model.scan ------------------------------------------------------------------------------------------------
def test_scan_gives_the_real_output_dim(model, mlp, x):
    want = mlp.layer1(x).shape[-1]
    with model.scan(x):
        dim = model.layer1.output.shape[-1]
    assert dim == want == 10


def test_scan_gives_the_full_shape_of_a_module_output(stack_model, stack, x4):
    want = capture(stack, stack.layers[1], x4)["output"].shape
    with stack_model.scan(x4):
        shape = stack_model.layers[1].output.shape
    assert tuple(shape) == tuple(want)


def test_scan_runs_no_real_forward(model, mlp, x, count_real_calls):
    with count_real_calls(mlp, mlp.layer1, mlp.layer2) as calls:
        with model.scan(x):
            model.layer1.output.shape
            model.output.save()
    assert calls.counts == [0, 0, 0]


def test_scan_leaves_weights_and_hooks_unchanged(model, mlp, x):
    with unchanged(mlp):
        with model.scan(x):
            model.layer2.output.shape


def test_scan_gives_the_shape_of_an_operation_on_a_proxy(model, mlp, x):
    want = (mlp.layer1(x)[:, :4] @ torch.ones(4, 7)).shape
    with model.scan(x):
        shape = (model.layer1.output[:, :4] @ torch.ones(4, 7)).shape
    assert tuple(shape) == tuple(want)


def test_scan_gives_the_dtype_of_a_module_output(model, mlp, x):
    with model.scan(x):
        dtype = model.layer1.output.dtype
        cast = model.layer1.output.to(torch.float64).dtype
    assert dtype == mlp.layer1(x).dtype == torch.float32
    assert cast == torch.float64


def test_scan_gives_nested_shapes_of_a_tuple_output(tuple_model, tuple_net, x4):
    want = capture(tuple_net, tuple_net.pair, x4)["output"]
    with tuple_model.scan(x4):
        shapes = tuple_model.pair.output.shape
        first = tuple_model.pair.output[1].shape
    assert tuple(tuple(s) for s in shapes) == tuple(tuple(t.shape) for t in want)
    assert tuple(first) == tuple(want[1].shape)


def test_scan_leaves_batchnorm_running_stats_unchanged(bn_model, bn_net, x):
    before = {k: v.clone() for k, v in bn_net.bn.state_dict().items()}
    with bn_model.scan(x):
        bn_model.bn.output.shape
    after = bn_net.bn.state_dict()
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(after[key], before[key]), key
    assert bn_net.training


def test_plain_torch_forward_does_change_batchnorm_stats(bn_net, x):
    """Sanity check of the test above: the same model and input in train mode do update the stats."""
    before = bn_net.bn.running_mean.clone()
    bn_net(x)
    assert not torch.equal(bn_net.bn.running_mean, before)
    assert bn_net.bn.num_batches_tracked.item() == 1


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_trace_after_scan_matches_plain_torch_including_batchnorm_stats(bn_model, bn_net, x):
    reference = type(bn_net)()
    reference.load_state_dict(bn_net.state_dict())
    reference.train()
    with bn_model.scan(x):
        bn_model.bn.output.shape
    with bn_model.trace(x):
        h = bn_model.bn.output.save()
        out = bn_model.output.save()
    seen = capture(reference, reference.bn, x)
    assert torch.allclose(h.value, seen["output"], atol=1e-6)
    assert torch.allclose(out.value, seen["root"], atol=1e-6)
    for key, value in reference.state_dict().items():
        assert torch.allclose(bn_net.state_dict()[key].float(), value.float(), atol=1e-6), key


# -- trace(scan=True) and invoke(scan=True) ----------------------------------------------------------------------
def test_trace_with_scan_gives_concrete_shape_and_dtype_while_tracing(model, mlp, x):
    seen = {}
    with model.trace(x, scan=True):
        h = model.layer1.output
        seen["shape"] = tuple(h.shape)
        seen["dtype"] = h.dtype
        out = model.output.save()
    assert seen["shape"] == tuple(mlp.layer1(x).shape)
    assert seen["dtype"] == torch.float32
    assert torch.allclose(out.value, mlp(x), atol=1e-6)


def test_trace_with_scan_uses_a_shape_to_build_a_tensor(tuple_model, tuple_net, x4):
    seen = capture(tuple_net, tuple_net.pair, x4)
    with tuple_model.trace(x4, scan=True):
        a, b = tuple_model.pair.output
        z = (b + torch.ones(a.shape[-1])).save()
    assert torch.allclose(z.value, seen["output"][1] + 1, atol=1e-6)


@pytest.mark.same_process
def test_trace_with_scan_runs_one_real_forward(model, mlp, x, count_real_calls):
    with count_real_calls(mlp) as calls:
        with model.trace(x, scan=True):
            model.layer1.output.shape
            model.output.save()
    assert calls[0] == 1


def test_invoke_with_scan_gives_that_invokes_shape(model, mlp, x, xb):
    seen = {}
    with model.trace() as tracer:
        with tracer.invoke(x, scan=True):
            seen["a"] = tuple(model.layer2.output.shape)
        with tracer.invoke(xb, scan=True):
            seen["b"] = tuple(model.layer1.output.shape)
            out_b = model.output.save()
    assert seen["a"] == tuple(mlp(x).shape)
    assert seen["b"] == tuple(mlp.layer1(xb).shape)
    assert torch.allclose(out_b.value, mlp(xb), atol=1e-6)


# -- validate=True ------------------------------------------------------------------------------------------------
def test_validate_raises_index_error_at_the_users_line(model, mlp, x):
    with unchanged(mlp):
        with pytest.raises(IndexError) as info:
            with model.trace(x, validate=True):
                h = model.layer1.output
                h[:, 100].save()  # column 100 of 10
    text = notes_text(info.value)
    assert THIS_FILE in text
    assert "h[:, 100].save()  # column 100 of 10" in text


def test_validate_raises_before_any_real_forward(model, mlp, x, count_real_calls):
    after_bad_line = []
    with count_real_calls(mlp) as calls:
        with pytest.raises(IndexError):
            with model.trace(x, validate=True):
                h = model.layer1.output
                h[:, 100]
                after_bad_line.append(True)
    assert calls[0] == 0
    assert after_bad_line == []  # raised at the line itself, not at the end of the block


def test_validate_raises_on_a_shape_mismatch_in_a_torch_function(model, mlp, x, count_real_calls):
    with count_real_calls(mlp) as calls:
        with pytest.raises(RuntimeError) as info:
            with model.trace(x, validate=True):
                torch.matmul(model.layer1.output, torch.ones(3, 3))  # 10 vs 3
    assert "torch.matmul(model.layer1.output, torch.ones(3, 3))  # 10 vs 3" in notes_text(info.value)
    assert calls[0] == 0


def test_validate_raises_structure_error_for_a_wrong_structure_assignment(model, mlp, x, count_real_calls):
    with unchanged(mlp), count_real_calls(mlp) as calls:
        with pytest.raises(raysight.StructureError) as info:
            with model.trace(x, validate=True):
                model.layer2.output = (torch.zeros(2, 2),)
    assert "layer2.output" in notes_text(info.value)
    assert calls[0] == 0


def test_validate_raises_for_a_write_that_changes_a_shape(model, mlp, x, count_real_calls):
    with torch.no_grad():
        shape = tuple(mlp.layer1(x).shape)
    with unchanged(mlp), count_real_calls(mlp) as calls:
        with pytest.raises(raysight.StructureError) as info:
            with model.trace(x, validate=True):
                model.layer1.output = torch.zeros(len(x), 7)  # 7 wide where layer2 takes 10
    assert f"expected shape {shape}, got {(len(x), 7)}" in str(info.value)
    assert "torch.zeros(len(x), 7)  # 7 wide where layer2 takes 10" in notes_text(info.value)
    assert calls[0] == 0


def test_an_edit_checked_with_an_input_refuses_a_write_of_another_shape(model, mlp, x):
    with unchanged(mlp):
        with pytest.raises(raysight.StructureError, match=r"layer1\.output: expected shape"):
            with model.edit(x, inplace=True):
                model.layer1.output = torch.zeros(len(x), 3)
    assert not model._edits  # left unedited
    with model.trace(x):
        out = model.output.save()
    with torch.no_grad():
        assert torch.allclose(out.value, mlp(x))


def test_validate_accepts_correct_code_and_returns_plain_torch_values(model, mlp, x):
    with model.trace(x, validate=True):
        h = model.layer1.output[:, 3].save()
        out = model.output.save()
    assert torch.allclose(h.value, mlp.layer1(x)[:, 3], atol=1e-6)
    assert torch.allclose(out.value, mlp(x), atol=1e-6)


def test_scan_with_validate_raises_at_the_users_line(model, mlp, x, count_real_calls):
    with count_real_calls(mlp) as calls:
        with pytest.raises(IndexError) as info:
            with model.scan(x, validate=True):
                model.layer2.output[:, 5]  # only 2 columns
    assert "model.layer2.output[:, 5]  # only 2 columns" in notes_text(info.value)
    assert calls[0] == 0


def test_trace_without_scan_after_a_failed_validation_matches_plain_torch(model, mlp, x):
    with pytest.raises(IndexError):
        with model.trace(x, validate=True):
            model.layer1.output[:, 100]
    with model.trace(x):
        h = model.layer1.output.save()
        out = model.output.save()
    assert torch.allclose(h.value, mlp.layer1(x), atol=1e-6)
    assert torch.allclose(out.value, mlp(x), atol=1e-6)


# -- scan with invokes and several calls -----------------------------------------------------------------------------
def test_scan_shapes_per_invoke_and_for_the_full_batch(model, mlp, x, xb):
    seen = {}
    with model.trace() as tracer:
        with tracer.invoke(x, scan=True):
            seen["a"] = tuple(model.layer1.output.shape)
        with tracer.invoke(xb, scan=True):
            seen["b"] = tuple(model.layer1.output.shape)
        seen["all"] = tuple(model.layer1.output.shape)
    assert seen["a"] == tuple(mlp.layer1(x).shape)
    assert seen["b"] == tuple(mlp.layer1(xb).shape)
    assert seen["all"] == tuple(mlp.layer1(torch.cat([x, xb])).shape)


def test_scan_gives_shapes_of_a_later_call_of_a_reused_module(rnn_model, rnn, xseq):
    outs, _ = all_calls_outputs(rnn, rnn.inp, xseq)
    with rnn_model.scan(xseq):
        shape = rnn_model.inp.next(2).output.shape
    assert tuple(shape) == tuple(outs[2].shape)


def test_validate_under_all_raises_at_the_users_line(loop_model, loop, x4, count_real_calls):
    with count_real_calls(loop) as calls:
        with pytest.raises(IndexError) as info:
            with loop_model.trace(x4, validate=True):
                with loop_model.cell.all():
                    loop_model.cell.output[:, 7] = 0  # cell has 4 features
    assert "loop_model.cell.output[:, 7] = 0  # cell has 4 features" in notes_text(info.value)
    assert calls[0] == 0


def test_validate_raises_for_a_set_value_of_the_wrong_batch(model, mlp, x, count_real_calls):
    with unchanged(mlp), count_real_calls(mlp) as calls:
        with pytest.raises(RuntimeError) as info:
            with model.trace(x, validate=True):
                model.layer1.output[:, 0] = torch.zeros(3)  # batch is 2
    assert "model.layer1.output[:, 0] = torch.zeros(3)  # batch is 2" in notes_text(info.value)
    assert calls[0] == 0


@pytest.mark.local_only
def test_a_scan_in_a_fresh_process_imports_what_it_needs_while_recording(tmp_path):
    """The first scan imports torch._dynamo (and through it FSDP, whose FlatParameter subclasses nn.Parameter with a
    metaclass of its own) while the trace records: what raysight swaps in for recording must not break that."""
    import subprocess
    import sys

    script = tmp_path / "scan.py"
    script.write_text(
        "import torch, raysight\n"
        "m = raysight.NNsight(torch.nn.Linear(4, 5))\n"
        "x = torch.randn(2, 4)\n"
        "with m.trace(x, scan=True):\n"
        "    shape = tuple(m.output.shape)\n"
        "    out = m.output.save()\n"
        "assert shape == (2, 5), shape\n"
        "assert torch.allclose(out.value, m._module(x))\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("kind", ["masked select", "nonzero", "item as an index"])
def test_validate_accepts_data_dependent_operations(model, mlp, x, kind):
    """A value whose shape (or use) depends on real data cannot be checked on fake tensors: validation leaves it
    unknown instead of rejecting correct code, and the real run gives plain torch's value."""
    ops = {
        "masked select": lambda h: h[h > 0].sum(),
        "nonzero": lambda h: torch.nonzero(h > 0).float().sum(),
        "item as an index": lambda h: h.flatten()[h.argmax().item()],
    }
    with model.trace(x, validate=True):
        got = ops[kind](model.layer1.output).save()
    with torch.no_grad():
        want = ops[kind](mlp.layer1(x))
    assert torch.allclose(got.value, want)


def test_edit_with_a_data_dependent_operation_is_recorded_and_applies(model, mlp, x):
    """model.edit() validates its edit on fake tensors: a masked mean is data-dependent, not a mistake."""
    with model.edit(x) as edited:
        h = edited.layer1.output
        edited.layer2.output[:] = h[h > 0].mean()
    with edited.trace(x):
        out = edited.output.save()
    with torch.no_grad():
        h = mlp.layer1(x)
        want = torch.full_like(mlp(x), h[h > 0].mean().item())
    assert torch.allclose(out.value, want)
