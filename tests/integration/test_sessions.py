"""Sessions (SPEC §3): several traces and plain operations recorded as one graph and run at session exit; values
passed between traces without ``.save()``; ``session.cond`` / ``session.iter`` / ``session.stop``; memory of long
loops; traces of several models; bad input.

Every expected value is computed with plain PyTorch (the wrapped ``torch.nn.Module`` called directly, or a plain
Python loop with the same meaning), never by asking raysight.
"""

from __future__ import annotations

import gc
import inspect
import pathlib
import re
import tracemalloc
import weakref
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch import nn

import raysight
from helpers import layer1_output_grad

NOT_SET = "Accessing value before it's been set"


# -- helpers (local to this file) -----------------------------------------------------------------------------
def _assert_no_hooks(root: nn.Module) -> None:
    for name, m in root.named_modules():
        assert not m._forward_hooks, f"forward hook left on {name or 'root'}"
        assert not m._forward_pre_hooks, f"forward pre-hook left on {name or 'root'}"
        assert not hasattr(m.__dict__.get("forward"), "_raysight_forward"), f"a run's forward left on {name or 'root'}"
        assert not getattr(m, "_forward_hooks_with_kwargs", None), f"kwargs hook left on {name or 'root'}"


class _Unchanged:
    """``with _Unchanged(module):`` — on exit no parameter or buffer changed and no hook is left (even after an
    exception inside the block, which is let through)."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def __enter__(self) -> "_Unchanged":
        self.before = {k: v.detach().clone() for k, v in self.root.state_dict().items()}
        return self

    def __exit__(self, *exc: Any) -> bool:
        after = self.root.state_dict()
        assert set(after) == set(self.before)
        for k, v in self.before.items():
            assert torch.equal(after[k], v), f"{k} changed"
        _assert_no_hooks(self.root)
        return False


class _RealForwards:
    """Counts real (non-fake, non-meta) forward calls of a module with a plain forward hook."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.count = 0

    def __enter__(self) -> "_RealForwards":
        from torch._subclasses.fake_tensor import FakeTensor

        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor) and not isinstance(out, FakeTensor) and out.device.type != "meta":
                self.count += 1

        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


class Encoder(nn.Module):
    """A second, different model: 3 features -> 5 features (the input width of the shared ``MLP`` fixture)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.act = nn.Tanh()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(z))


@pytest.fixture
def encoder() -> Encoder:
    torch.manual_seed(11)
    return Encoder()


@pytest.fixture
def z() -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(12))


@pytest.fixture
def batches() -> torch.Tensor:
    """Six rows of MLP input, to be split into DataLoader batches."""
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(13))


# -- several traces in one session ----------------------------------------------------------------------------
def test_value_of_earlier_trace_used_in_later_trace_without_save(model, mlp, x):
    with model.session():
        with model.trace(x):
            h = model.layer1.output  # not saved
        with model.trace(x):
            model.layer1.output = h * 2
            out = model.output.save()

    with torch.no_grad():
        expected = mlp.layer2(mlp.layer1(x) * 2)
    assert torch.allclose(out, expected)


def test_value_of_earlier_trace_is_later_trace_input(model, mlp, x):
    with model.session():
        with model.trace(x):
            h = model.layer1.output
        with model.trace(h[:, :5]):
            out = model.output.save()

    with torch.no_grad():
        expected = mlp(mlp.layer1(x)[:, :5])
    assert torch.allclose(out, expected)


def test_value_of_earlier_trace_is_input_of_an_invoke(model, mlp, x, xb):
    """As a ``tracer.invoke(...)`` input, written inside the later trace's block, next to a plain invoke."""
    with model.session():
        with model.trace(x):
            h = model.layer1.output
        with model.trace() as tracer:
            with tracer.invoke(h[:, :5]):
                from_h = model.output.save()
            with tracer.invoke(xb):
                plain = model.output.save()

    with torch.no_grad():
        expected_from_h = mlp(mlp.layer1(x)[:, :5])
        expected_plain = mlp(xb)
    assert torch.allclose(from_h, expected_from_h)
    assert torch.allclose(plain, expected_plain)


def test_unsaved_session_value_is_not_available_after_the_session(model, mlp, x):
    with model.session():
        with model.trace(x):
            h = model.layer1.output
            out = model.output.save()

    with torch.no_grad():
        assert torch.allclose(out, mlp(x))
    with pytest.raises(ValueError, match=NOT_SET):
        h.value


def test_traces_run_in_definition_order(model, mlp, x, xb):
    """The second trace's input is what the first trace produced; the third reads the second's output."""
    with model.session():
        with model.trace(x):
            first = model.layer1.output
        with model.trace(xb):
            model.layer1.output = model.layer1.output + first.mean(0)
            second = model.output
        with model.trace(x):
            model.layer2.output = model.layer2.output - second.sum()
            third = model.output.save()

    with torch.no_grad():
        exp_first = mlp.layer1(x)
        exp_second = mlp.layer2(mlp.layer1(xb) + exp_first.mean(0))
        expected = mlp(x) - exp_second.sum()
    assert torch.allclose(third, expected, atol=1e-6)


@pytest.mark.same_process
@pytest.mark.parametrize("predicate", [True, False])
def test_session_cond_with_plain_predicate_around_a_trace(model, mlp, x, predicate):
    with _RealForwards(mlp) as calls:
        with model.session() as session:
            with session.cond(predicate):
                with model.trace(x):
                    out = model.output.save()

    if predicate:
        assert calls.count == 1
        with torch.no_grad():
            assert torch.allclose(out, mlp(x))
    else:
        assert calls.count == 0
        with pytest.raises(ValueError, match=NOT_SET):
            out.value


@pytest.mark.same_process
@pytest.mark.parametrize("offset", [-1.0, 1.0], ids=["true", "false"])
def test_session_cond_with_proxy_predicate_from_earlier_trace(model, mlp, x, offset):
    with torch.no_grad():
        total = mlp(x).sum().item()
    threshold = total + offset  # below the real sum: true; above it: false

    with _RealForwards(mlp) as calls:
        with model.session() as session:
            with model.trace(x):
                s = model.output.sum()
            with session.cond(s > threshold):
                with model.trace(x * 3):
                    out = model.output.save()

    if total > threshold:
        assert calls.count == 2
        with torch.no_grad():
            assert torch.allclose(out, mlp(x * 3))
    else:
        assert calls.count == 1
        with pytest.raises(ValueError, match=NOT_SET):
            out.value


def test_session_apply_calls_function_on_trace_value(model, mlp, x):
    with model.session() as session:
        with model.trace(x):
            h = model.layer1.output
        norms = session.apply(torch.linalg.vector_norm, h, dim=-1).save()

    with torch.no_grad():
        expected = torch.linalg.vector_norm(mlp.layer1(x), dim=-1)
    assert torch.allclose(norms, expected)


def test_raysight_list_collects_values_from_several_traces(model, mlp, x, xb):
    with model.session():
        acc = raysight.list().save()
        with model.trace(x):
            acc.append(model.output)
        with model.trace(xb):
            acc.append(model.layer1.output)

    with torch.no_grad():
        expected = [mlp(x), mlp.layer1(xb)]
    assert isinstance(acc.value, list) and len(acc.value) == 2
    for got, exp in zip(acc.value, expected):
        assert torch.allclose(got, exp)


def test_raysight_dict_and_float_builtins_in_session(model, mlp, x):
    with model.session():
        with model.trace(x):
            out = model.output
        d = raysight.dict().save()
        d["max"] = raysight.float(out.max())
        d["rows"] = raysight.int(out.shape[0])

    with torch.no_grad():
        ref = mlp(x)
    assert set(d.value) == {"max", "rows"}
    assert type(d.value["max"]) is float and d.value["max"] == pytest.approx(ref.max().item())
    assert type(d.value["rows"]) is int and d.value["rows"] == ref.shape[0]


def test_session_log_prints_real_values_at_run_time(model, mlp, x, capsys):
    with model.session() as session:
        with model.trace(x):
            s = model.output.sum()
        session.log("total:", s.item())
        assert capsys.readouterr().out == ""  # nothing printed while recording

    with torch.no_grad():
        expected = mlp(x).sum().item()
    out = capsys.readouterr().out
    match = re.fullmatch(r"total: (\S+)\n", out)
    assert match, out
    assert float(match.group(1)) == pytest.approx(expected, rel=1e-6)


# -- loops ----------------------------------------------------------------------------------------------------
def test_iter_over_python_list_runs_body_per_element(model, mlp, x):
    scales = [1.0, -2.0, 0.5]
    with model.session() as session:
        sums = raysight.list().save()
        with session.iter(scales) as scale:
            with model.trace(x * scale):
                sums.append(model.output.sum())

    with torch.no_grad():
        expected = [mlp(x * s).sum() for s in scales]
    assert len(sums.value) == len(expected)
    for got, exp in zip(sums.value, expected):
        assert torch.allclose(got, exp)


def test_iter_over_raysight_list_filled_earlier_in_session(model, mlp, x, xb):
    with model.session() as session:
        hiddens = raysight.list()
        with model.trace(x):
            hiddens.append(model.layer1.output)
        with model.trace(xb):
            hiddens.append(model.layer1.output)
        norms = raysight.list().save()
        with session.iter(hiddens) as h:
            norms.append(h.norm())

    with torch.no_grad():
        expected = [mlp.layer1(x).norm(), mlp.layer1(xb).norm()]
    assert len(norms.value) == 2
    for got, exp in zip(norms.value, expected):
        assert torch.allclose(got, exp)


def test_nested_loops_collect_all_pairs(model):
    outer, inner = [1, 2, 3], ["a", "b"]
    with model.session() as session:
        pairs = raysight.list().save()
        with session.iter(outer) as i:
            with session.iter(inner) as s:
                pairs.append((i, s))

    assert pairs.value == [(i, s) for i in outer for s in inner]


def test_iter_over_dataloader_of_tensors(model, mlp, batches):
    loader = torch.utils.data.DataLoader(batches, batch_size=2)
    with model.session() as session:
        outs = raysight.list().save()
        with session.iter(loader) as batch:
            with model.trace(batch):
                outs.append(model.output)

    with torch.no_grad():
        expected = [mlp(b) for b in torch.utils.data.DataLoader(batches, batch_size=2)]
    assert len(outs.value) == len(expected) == 3
    for got, exp in zip(outs.value, expected):
        assert torch.allclose(got, exp)


def test_iter_over_empty_list_skips_body_and_continues(model):
    with model.session() as session:
        seen = raysight.list().save()
        with session.iter([]) as item:
            seen.append(item)
        seen.append("after")

    assert seen.value == ["after"]


def test_iter_return_context_cond(model):
    items = [1, 2, 3, 4, 5, 6]
    with model.session() as session:
        even = raysight.list().save()
        with session.iter(items, return_context=True) as (item, it):
            with it.cond(item % 2 == 0):
                even.append(item * 10)

    assert even.value == [i * 10 for i in items if i % 2 == 0]


def test_iter_return_context_stop_ends_the_loop_only(model):
    items = [1, 2, 3, 4, 5]
    with model.session() as session:
        seen = raysight.list().save()
        with session.iter(items, return_context=True) as (item, it):
            with it.cond(item == 3):
                it.stop()
            seen.append(item)
        seen.append("after")

    expected: list = []
    for i in items:
        if i == 3:
            break
        expected.append(i)
    expected.append("after")
    assert seen.value == expected


def test_iter_return_context_log_prints_each_item(model, capsys):
    items = [3, 1, 4]
    with model.session() as session:
        with session.iter(items, return_context=True) as (item, it):
            it.log("item", item * 2)
        assert capsys.readouterr().out == ""

    assert capsys.readouterr().out == "".join(f"item {i * 2}\n" for i in items)


def test_stop_in_inner_loop_ends_inner_loop_only(model):
    with model.session() as session:
        seen = raysight.list().save()
        with session.iter([1, 2]) as a:
            with session.iter([10, 20, 30]) as b:
                with session.cond(b == 20):
                    session.stop()
                seen.append((a, b))
            seen.append(a)

    expected: list = []
    for a in [1, 2]:
        for b in [10, 20, 30]:
            if b == 20:
                break
            expected.append((a, b))
        expected.append(a)
    assert seen.value == expected


@pytest.mark.same_process
@pytest.mark.parametrize("method", ["stop", "exit"])
def test_session_stop_ends_the_session(model, mlp, x, method):
    with _RealForwards(mlp) as calls:
        with model.session() as session:
            seen = raysight.list().save()
            with model.trace(x):
                seen.append(model.output.sum())
            getattr(session, method)()
            seen.append("after stop")
            with model.trace(x):
                late = model.output.save()

    assert calls.count == 1
    with torch.no_grad():
        expected = mlp(x).sum()
    assert len(seen.value) == 1 and torch.allclose(seen.value[0], expected)
    with pytest.raises(ValueError, match=NOT_SET):
        late.value


def test_spec_example_stop_inside_loop_then_stop_session(model):
    with model.session() as session:
        l = raysight.list().save()
        l.append(0)
        with session.iter([1, 2, 3, 4]) as item:
            with session.cond(item == 3):
                session.stop()
            l.append(item)
        l.append(5)
        session.stop()
        l.append(6)

    assert l.value == [0, 1, 2, 5]  # SPEC §3


def test_trace_in_loop_chains_on_values_of_earlier_iterations(model, mlp, x):
    """Each iteration's trace input is the row block the previous iteration appended to a raysight.list()."""
    with model.session() as session:
        states = raysight.list().save()
        states.append(x)
        with session.iter(range(3)):
            with model.trace(states[-1]):
                states.append(model.layer1.output[:, :5])

    with torch.no_grad():
        expected = [x]
        for _ in range(3):
            expected.append(mlp.layer1(expected[-1])[:, :5])
    assert len(states.value) == 4
    for got, exp in zip(states.value, expected):
        assert torch.allclose(got, exp)


# -- memory ---------------------------------------------------------------------------------------------------
TEMP_SIDE = 128
TEMP_BYTES = TEMP_SIDE * TEMP_SIDE * 4


def _numpy_backed(i: Any) -> torch.Tensor:
    """A (128, 128) float32 tensor whose storage is a numpy buffer, so tracemalloc sees its 64 KiB."""
    return torch.from_numpy(np.full((TEMP_SIDE, TEMP_SIDE), float(i), dtype=np.float32))


def _session_peak(model: raysight.NNsight, n: int) -> tuple[int, list]:
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with model.session() as session:
            acc = raysight.list().save()
            with session.iter(list(range(n))) as item:
                big = session.apply(_numpy_backed, item)
                acc.append((big * 2).sum().item())
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, acc.value


def test_long_loop_tracemalloc_peak_does_not_grow_with_iterations(model):
    """torch's CPU allocator is invisible to tracemalloc, so the temporary is numpy-backed: leaking it would add
    64 KiB of traced memory per iteration (~58 MiB more for 1000 than for 100 iterations)."""
    _session_peak(model, 10)  # warm caches
    peak_100, acc_100 = _session_peak(model, 100)
    peak_1000, acc_1000 = _session_peak(model, 1000)

    assert acc_1000 == [float(2 * i * TEMP_SIDE * TEMP_SIDE) for i in range(1000)]
    assert acc_100 == acc_1000[:100]
    assert peak_1000 < peak_100 + 10 * TEMP_BYTES, (peak_100, peak_1000)
    assert peak_1000 < 40 * TEMP_BYTES, peak_1000


def test_long_loop_frees_each_iterations_temporary_tensor(model):
    """A 1,000-iteration loop computing ``torch.ones(128, 128) * item``: at most a couple of those 64 KiB
    temporaries are ever alive at once. (128 x 128 stays below torch's intra-op parallel grain size: on a busy
    2-core machine OpenMP barriers would make 1,000 parallel ops take seconds.)"""
    alive = [0]
    most = [0]

    def track(t: torch.Tensor) -> None:
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - 1))

    n = 1000
    with model.session() as session:
        sums = raysight.list().save()
        with session.iter(list(range(n))) as item:
            big = torch.ones(128, 128) * item
            session.apply(track, big)
            sums.append(big.sum().item())
    gc.collect()

    assert sums.value == [float(128 * 128 * i) for i in range(n)]
    assert most[0] <= 2, most[0]
    assert alive[0] == 0


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_outer_value_used_only_in_loop_body_is_freed_after_the_loop(model):
    """SPEC §4: values are freed after their last use. A tensor made before a loop and used only inside its body
    is no longer needed once the loop is over (as it is freed after its last use without a loop)."""
    refs: list = []

    def make() -> torch.Tensor:
        t = torch.ones(512, 512)
        refs.append(weakref.ref(t))
        return t

    def is_alive(_: Any) -> bool:
        return refs[0]() is not None

    with model.session() as session:
        big = session.apply(make)
        sums = raysight.list().save()
        with session.iter([1, 2, 3]) as i:
            sums.append((big * i).sum().item())
        alive_after_loop = session.apply(is_alive, sums).save()

    assert sums.value == [float(512 * 512 * i) for i in [1, 2, 3]]
    assert alive_after_loop.value is False


def test_loop_collection_is_freed_after_the_loop(model):
    """SPEC §4: a collection that only the loop uses is freed once the loop is over."""
    refs: list = []

    def make() -> list:
        tensors = [torch.full((512, 512), float(k)) for k in range(3)]
        refs.extend(weakref.ref(t) for t in tensors)
        return tensors

    def count_alive(_: Any) -> int:
        return sum(r() is not None for r in refs)

    with model.session() as session:
        collection = session.apply(make)
        sums = raysight.list().save()
        with session.iter(collection) as t:
            sums.append(t.sum().item())
        alive_after_loop = session.apply(count_alive, sums).save()

    assert sums.value == [float(512 * 512 * k) for k in range(3)]
    assert alive_after_loop.value == 0


# -- several models in one session ----------------------------------------------------------------------------
def test_session_with_base_model_and_edited_copy(model, mlp, x):
    with model.edit() as edited:
        edited.layer1.output = edited.layer1.output * 2

    with model.session():
        with model.trace(x):
            base = model.output
        with edited.trace(x):
            diff = (edited.output - base).save()
        with model.trace(x):
            again = model.output.save()

    with torch.no_grad():
        expected_diff = mlp.layer2(mlp.layer1(x) * 2) - mlp(x)
        expected_again = mlp(x)
    assert torch.allclose(diff, expected_diff, atol=1e-6)
    assert torch.allclose(again, expected_again)


def test_edited_copy_trace_writes_value_from_base_trace(model, mlp, x):
    """The edit doubles layer1's output; the edited trace then overwrites it with the base model's layer1 output."""
    with model.edit() as edited:
        edited.layer1.output = edited.layer1.output * 2

    with model.session():
        with model.trace(x):
            h = model.layer1.output
        with edited.trace(x):
            edited.layer1.output = h + 1
            out = edited.output.save()

    with torch.no_grad():
        expected = mlp.layer2(mlp.layer1(x) + 1)
    assert torch.allclose(out, expected)


def test_trace_of_one_model_takes_input_computed_by_another(model, mlp, encoder, z):
    other = raysight.NNsight(encoder)
    with model.session():
        with other.trace(z):
            features = other.output
        with model.trace(features):
            out = model.output.save()

    with torch.no_grad():
        expected = mlp(encoder(z))
    assert torch.allclose(out, expected)


def test_session_of_one_model_holds_trace_of_another(model, mlp, encoder, x):
    """A session opened on the encoder runs traces of the MLP and of the encoder, passing values MLP -> encoder."""
    other = raysight.NNsight(encoder)
    with other.session():
        with model.trace(x):
            h = model.layer1.output
        with other.trace(h[:, :3]):
            out = other.output.save()

    with torch.no_grad():
        expected = encoder(mlp.layer1(x)[:, :3])
    assert torch.allclose(out, expected)


def test_session_accepts_remote_false(model, mlp, x):
    """SPEC §3 signature: ``model.session(remote=False)`` is a local session."""
    with model.session(remote=False):
        with model.trace(x):
            out = model.output.save()

    with torch.no_grad():
        assert torch.allclose(out, mlp(x))


# -- bad input ------------------------------------------------------------------------------------------------
def _generator() -> Iterator[int]:
    yield from range(3)


def test_iter_over_generator_raises_type_error_naming_session_iter(model, mlp, x):
    with _Unchanged(mlp):
        with pytest.raises(TypeError, match=r"session\.iter"):
            with model.session() as session:
                with model.trace(x):
                    model.output.save()
                with session.iter(_generator()) as item:
                    raysight.list().append(item)


def test_iter_over_proxy_that_turns_out_a_generator_raises_at_run_time_naming_the_line(model, mlp, x):
    with _Unchanged(mlp):
        with pytest.raises(TypeError, match=r"session\.iter") as info:
            with model.session() as session:
                with model.trace(x):
                    model.output.save()
                made = session.apply(_generator)
                line = inspect.currentframe().f_lineno + 1
                with session.iter(made) as item:
                    raysight.list().append(item)

    assert f"{pathlib.Path(__file__).name}:{line}" in "\n".join(getattr(info.value, "__notes__", []))


def test_stop_outside_any_context_raises_trace_error(mlp):
    with _Unchanged(mlp):
        with pytest.raises(raysight.TraceError):
            raysight.stop()


def test_session_inside_session_raises_trace_error(model, mlp, x):
    with _Unchanged(mlp):
        with pytest.raises(raysight.TraceError):
            with model.session():
                with model.trace(x):
                    model.output.save()
                with model.session():
                    pass


def test_session_inside_trace_raises_trace_error(model, mlp, x):
    with _Unchanged(mlp):
        with pytest.raises(raysight.TraceError):
            with model.trace(x):
                with model.session():
                    pass


def _notes(exc: BaseException) -> str:
    return str(exc) + "\n" + "\n".join(getattr(exc, "__notes__", []) or [])


def test_run_time_error_in_loop_trace_names_the_line_and_leaves_no_hooks(model, mlp, x):
    with _Unchanged(mlp):
        with pytest.raises(IndexError) as info:
            with model.session() as session:
                with session.iter([0, 1]) as i:
                    with model.trace(x):
                        line = inspect.currentframe().f_lineno + 1
                        model.layer1.output[:, 99 * i].save()  # out of range in the second iteration

    assert f"{pathlib.Path(__file__).name}:{line}" in _notes(info.value)


def test_multi_element_session_cond_predicate_error_names_the_line(model, mlp, x):
    """SPEC §2/§4: a multi-element tensor predicate needs torch.all; the error raised when the session runs carries
    the user's line, like any other run-time error."""
    with _Unchanged(mlp):
        with pytest.raises(RuntimeError, match="ambiguous") as info:
            with model.session() as session:
                with model.trace(x):
                    out = model.output
                line = inspect.currentframe().f_lineno + 1
                with session.cond(out > 0):
                    raysight.list().save()

    assert f"{pathlib.Path(__file__).name}:{line}" in _notes(info.value)


def test_session_works_after_a_failed_one(model, mlp, x):
    with pytest.raises(TypeError):
        with model.session() as session:
            with session.iter(_generator()):
                pass
    with model.session():
        with model.trace(x):
            out = model.output.save()

    with torch.no_grad():
        assert torch.allclose(out, mlp(x))


def test_iter_over_a_list_the_body_appends_to_runs_over_its_items_at_the_start():
    """nnsight 0.4 looped over a copy: appending to the collection in the body does not make the loop endless."""
    model = raysight.NNsight(nn.Linear(2, 2))
    with model.session() as session:
        items = raysight.list([1, 2])
        with session.iter(items) as item:
            items.append(item * 10)
        out = items.save()
    plain = [1, 2]
    for item in list(plain):
        plain.append(item * 10)
    assert out.value == plain == [1, 2, 10, 20]


@pytest.mark.parametrize("second_trace", [False, True])
def test_grad_read_in_a_trace_with_the_backward_later_in_the_session(model, mlp, x, second_trace):
    """`.grad` is the gradient in the next backward() recorded after it, also when that backward is the
    session's, after the trace (and after another trace)."""
    want = layer1_output_grad(mlp, x)
    with model.session():
        with model.trace(x):
            g = model.layer1.output.grad.save()
            loss = model.output.sum()
        if second_trace:
            with model.trace(x):
                other = model.output.sum()
            loss = loss + other * 0
        loss.backward()
    assert torch.allclose(g.value, want, atol=1e-6)
    mlp.zero_grad(set_to_none=True)


def test_grad_in_a_trace_of_a_value_the_session_loss_does_not_use_names_it(model, mlp, x):
    with pytest.raises(raysight.InterventionError, match="took no part in the backward pass"):
        with model.session():
            with model.trace(x):
                g = model.layer1.output.grad.save()
                loss = model.output.sum()
            with model.trace(x):
                unrelated = model.output.sum()
            unrelated.backward()
    mlp.zero_grad(set_to_none=True)
