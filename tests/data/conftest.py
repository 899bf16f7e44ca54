"""Extraction fixtures: a tiny GPT-2 saved with save_pretrained and loaded back, its plain-transformers oracle, and
the MLP rows (the MLP itself is the shared ``mlp`` fixture)."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch
from lm_helpers import bert_tokenizer, build_lm

import raysight


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_lm("gpt2", tmp_path_factory.mktemp("extract-lm") / "gpt2", bert_tokenizer())


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_path: pathlib.Path) -> raysight.LanguageModel:
    return raysight.LanguageModel(str(tiny_gpt2_path))


@pytest.fixture(scope="session")
def tiny_gpt2_ref(tiny_gpt2_path: pathlib.Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_path)).eval()


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    """Ten input rows for the MLP (five features each) with a label."""
    g = torch.Generator().manual_seed(7)
    return [{"x": torch.randn(5, generator=g).tolist(), "label": i % 3} for i in range(10)]
