"""Memory stays flat for traces that save nothing, however many times they run."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
import torch

from helpers import assert_no_hooks


def _trace_once(model, x):
    with model.trace(x):
        h = model.layer1.output
        model.layer1.output = h * 2 + 1
        (torch.relu(model.layer2.output) * h.sum()).mean()


def test_traces_that_save_nothing_do_not_grow_memory(model, mlp, x):
    for _ in range(200):  # warm-up: caches, lazily created objects
        _trace_once(model, x)
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(300):  # warm-up under tracemalloc as well
            _trace_once(model, x)
        gc.collect()
        start, _ = tracemalloc.get_traced_memory()
        for _ in range(2000):
            _trace_once(model, x)
        gc.collect()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = end - start
    # 2,000 runs: a leak of even one small tensor or graph per run would be hundreds of KiB
    assert growth < 64 * 1024, f"memory grew by {growth} bytes over 2000 traces"
    assert_no_hooks(mlp)


@pytest.mark.same_process
def test_activations_are_not_kept_after_a_run_that_saves_nothing(model, mlp, x):
    import weakref

    refs = []
    handle = mlp.layer1.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    try:
        with model.trace(x) as tracer:
            h = model.layer1.output
            y = h * 2
            z = model.layer2.output + y.sum()
    finally:
        handle.remove()
    gc.collect()
    assert len(refs) == 1
    assert refs[0]() is None, "layer1's output is still referenced after the run although nothing was saved"
    del tracer, h, y, z


def test_a_trace_leaves_no_reference_cycles_for_the_collector(model, mlp, x):
    """Everything a trace builds is freed by reference counting when it ends (a cycle would hold activations until
    the next collection and cost collector time on every trace)."""
    for _ in range(20):  # warm-up: caches and lazily created objects
        with model.trace(x):
            model.layer1.output[:, 0] = 0
            out = model.output.save()
    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            with model.trace(x):
                model.layer1.output[:, 0] = 0
                out = model.output.save()
        unreachable = gc.collect()
    finally:
        gc.enable()
    expected = mlp.layer2(torch.cat([torch.zeros(x.shape[0], 1), mlp.layer1(x)[:, 1:]], dim=1))
    assert torch.allclose(out.value, expected)
    assert unreachable == 0
