"""Loading through from_pretrained with a device_map (accelerate): CPU and disk offload, and maps that cannot work."""

from __future__ import annotations

import pytest
import torch

import raysight
from lm_helpers import encode, oracle_blocks

pytest.importorskip("accelerate")

DISK_MAP = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk",
            "transformer.ln_f": "cpu", "lm_head": "cpu"}  # fmt: skip


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto", DISK_MAP], ids=["cpu", "auto", "disk-offload"])
def test_a_device_mapped_model_gives_the_plain_models_values(gpt2_path, gpt2_ref, lm_tokenizer, device_map,
                                                             tmp_path):  # fmt: skip
    extra = {"offload_folder": str(tmp_path)} if device_map is DISK_MAP else {}
    model = raysight.LanguageModel(str(gpt2_path), device_map=device_map, **extra)
    assert not model.dispatched
    with model.trace("the quick brown fox"):
        hidden = model.transformer.h[1].output.save()
        logits = model.output.logits.save()
    inputs = encode(gpt2_ref, lm_tokenizer, "the quick brown fox")
    blocks, want = oracle_blocks(gpt2_ref, "gpt2", inputs)
    assert torch.allclose(logits.value, want.logits, atol=1e-5)
    assert torch.allclose(hidden.value, blocks[1], atol=1e-5)


@pytest.mark.local_only  # the client's own (offloaded) module is the one read
def test_parameters_of_a_disk_offloaded_module_are_real_copies(gpt2_path, gpt2_ref, tmp_path):
    model = raysight.LanguageModel(str(gpt2_path), device_map=DISK_MAP, offload_folder=str(tmp_path))
    with model.trace("hello"):
        weight = model.transformer.h[1].mlp.c_fc.weight.save()
    assert weight.value.device.type == "cpu"
    assert torch.equal(weight.value, gpt2_ref.transformer.h[1].mlp.c_fc.weight)


def test_a_device_map_that_cannot_work_names_the_argument(gpt2_path):
    with pytest.raises(RuntimeError, match=r"device_map=\{'': 'cuda:7'\}"):
        raysight.LanguageModel(str(gpt2_path), device_map={"": "cuda:7"}, dispatch=True)


def test_a_failed_lazy_load_leaves_the_model_unloaded(gpt2_path):
    model = raysight.LanguageModel(str(gpt2_path), device_map={"": "cuda:7"})
    with pytest.raises(RuntimeError, match="device_map"):
        with model.trace("hello"):
            model.output.save()
    assert not model.dispatched
    assert all(p.device.type == "meta" for p in model._module.parameters())
