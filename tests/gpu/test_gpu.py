"""GPU checks (SPEC §6: actors hold the model sharded over their GPUs; bf16): skipped on machines without CUDA.

Run on a GPU machine with ``.venv/bin/python -m pytest -q tests/gpu``. Oracles: the same torch module / HF model
run on the CPU in float32 (or, for bf16, the HF model in bf16 on the same GPU with a plain forward hook).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Stack

import raysight

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU machine)")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def _stack() -> Stack:
    torch.manual_seed(0)
    return Stack()


def _x() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(3))


def _hidden(output):
    """A decoder block's hidden states (blocks return a tensor or a tuple, by transformers version)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _cpu_reference(net: Stack, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        h1 = net.layers[1](net.layers[0](net.embed(x)))
        return h1, net(x)


# -- these run everywhere: the placement API on the CPU ------------------------------------------------------
def test_dispatch_to_a_device_moves_the_module_and_later_inputs():
    net = _stack()
    h1_ref, out_ref = _cpu_reference(copy.deepcopy(net), _x())
    model = raysight.NNsight(net).dispatch_to("cpu")
    with torch.no_grad(), model.trace(_x()):
        h1 = model.layers[1].output.save()
        out = model.output.save()
    assert torch.allclose(h1.value, h1_ref, atol=1e-6) and torch.allclose(out.value, out_ref, atol=1e-6)


def test_dispatch_to_auto_without_cuda_leaves_the_module_where_it_is():
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU fallback")
    model = raysight.NNsight(_stack())
    assert model.dispatch_to("auto") is model
    assert model.device.type == "cpu" and "_input_device" not in model.__dict__


def test_dispatch_to_refuses_a_device_map_of_the_wrong_type():
    with pytest.raises(TypeError, match="device_map must be"):
        raysight.NNsight(_stack()).dispatch_to(3.5)


# -- GPU ------------------------------------------------------------------------------------------------------
@cuda
def test_a_module_on_the_gpu_gives_the_cpu_values():
    net = _stack()
    h1_ref, out_ref = _cpu_reference(copy.deepcopy(net), _x())
    model = raysight.NNsight(net).dispatch_to("auto")
    assert model.device.type == "cuda"
    with torch.no_grad(), model.trace(_x()):  # a CPU input: moved to the model's first device
        h1 = model.layers[1].output.save()
        model.layers[2].output = torch.zeros(3, 6)  # a CPU value replacing a GPU one moves there
        out = model.output.save()
    assert h1.value.device.type == "cuda"
    assert torch.allclose(h1.value.cpu(), h1_ref, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(out.value.cpu(), net.head.cpu()(torch.zeros(3, 6)), atol=1e-5)
    del out_ref


@cuda
@two_gpus
def test_a_module_sharded_over_two_gpus_gives_the_cpu_values():
    net = _stack()
    h1_ref, out_ref = _cpu_reference(copy.deepcopy(net), _x())
    device_map = {"embed": 0, "layers.0": 0, "layers.1": 1, "layers.2": 1, "head": 1}
    model = raysight.NNsight(net).dispatch_to(device_map)
    with torch.no_grad(), model.trace(_x()):
        h1 = model.layers[1].output.save()
        out = model.output.save()
    assert h1.value.device == torch.device("cuda:1")
    assert torch.allclose(h1.value.cpu(), h1_ref, atol=1e-5)
    assert torch.allclose(out.value.cpu(), out_ref, atol=1e-5)


@cuda
def test_a_language_model_in_bf16_on_the_gpu_equals_hf_with_a_hook(tmp_path):
    from transformers import AutoModelForCausalLM

    from raysight.models.tiny import tiny_lm_path, tiny_tokenizer

    path = tiny_lm_path(tmp_path / "lm")
    model = raysight.LanguageModel(str(path), device_map="auto", torch_dtype=torch.bfloat16)
    with torch.no_grad(), model.trace("the cat sat on the mat"):
        h = raysight.apply(_hidden, model.transformer.h[0].output).save()
        logits = model.lm_head.output.save()
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).to("cuda:0").eval()
    seen = {}

    def keep(module, args, output):
        seen["h"] = _hidden(output)

    handle = ref.transformer.h[0].register_forward_hook(keep)
    ids = tiny_tokenizer()("the cat sat on the mat", return_tensors="pt").to("cuda:0")
    with torch.no_grad():
        ref_logits = ref(**ids).logits
    handle.remove()
    assert h.value.dtype == torch.bfloat16 and h.value.device.type == "cuda"
    assert torch.allclose(h.value.float(), seen["h"].float(), atol=1e-2)
    assert torch.allclose(logits.value.float(), ref_logits.float(), atol=5e-2)


@cuda
def test_a_plain_module_served_with_a_gpu_runs_on_the_actors_gpu(ray_cluster):
    net = _stack()
    h1_ref, _ = _cpu_reference(copy.deepcopy(net), _x())
    model = raysight.NNsight(net)
    pool = raysight.serve(model, replicas=1, num_gpus=1, name="gpu-stack")
    try:
        with torch.no_grad(), model.trace(_x(), remote=True):
            h1 = model.layers[1].output.save()
            device = raysight.apply(lambda t: str(t.device), model.layers[1].output).save()
        assert device.value.startswith("cuda")
        assert h1.value.device.type == "cpu"  # values come back to the client's CPU
        assert torch.allclose(h1.value, h1_ref, atol=1e-5)
    finally:
        pool.shutdown()
