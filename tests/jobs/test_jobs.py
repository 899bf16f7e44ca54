"""The ready job scripts of ``jobs/`` (run through their ``main`` in this process, as ``python jobs/x.py`` does):
their outputs checked against plain transformers."""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

import raysight
from raysight.data import to_tensors

JOBS = pathlib.Path(__file__).resolve().parents[2] / "jobs"


def job(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"job_{name}", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_gpt2_4(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from raysight.models.tiny import tiny_lm_path

    return tiny_lm_path(tmp_path_factory.mktemp("jobs") / "gpt2-4", layers=4)


def _hf(path: pathlib.Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def test_extract_job_writes_every_blocks_hidden_states(tiny_gpt2_4: pathlib.Path, tmp_path: pathlib.Path,
                                                      ray_cluster: Any) -> None:  # fmt: skip
    """(The job starts Ray when none is running: the test session's cluster, whose workers import the test
    helpers, must be the one, or later tests that use it would get the job's.)"""
    out = tmp_path / "out"
    assert job("extract").main(["--model", str(tiny_gpt2_4), "--rows", "6", "--batch-size", "4", "--output", str(out),
                                "--layers", "0,3", "--local"]) == 0  # fmt: skip
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert table.column("id").to_pylist() == list(range(6))
    ref, tok = _hf(tiny_gpt2_4)
    for i, text in enumerate(table.column("text").to_pylist()):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            states = ref(**enc, output_hidden_states=True).hidden_states
        assert torch.allclose(to_tensors(table, "h0")[i], states[1][0], atol=1e-5)  # block 0's output
        # the last block's output is the final hidden state before ln_f: hidden_states[-1] has ln_f applied
        assert to_tensors(table, "h3")[i].shape == states[4][0].shape


def test_train_lora_job_lowers_the_loss_and_writes_weights(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "run"
    assert job("train_lora").main(["--steps", "6", "--output", str(out), "--local"]) == 0
    metrics = pq.read_table(out / "metrics.parquet").to_pydict()
    assert metrics["step"] == list(range(6)) and metrics["loss"][-1] < metrics["loss"][0]
    weights = pq.read_table(out / "weights.parquet").to_pylist()
    assert weights and all(row["name"].endswith((".A", ".B")) for row in weights)
    assert any(any(v != 0 for v in row["values"]) for row in weights if row["name"].endswith(".B"))  # B trained


@pytest.mark.parametrize("remote", [False, True], ids=["here", "ray"])
def test_patching_sweep_matches_hand_written_hooks(tiny_gpt2_4: pathlib.Path, tmp_path: pathlib.Path,
                                                   remote: bool, request: pytest.FixtureRequest) -> None:  # fmt: skip
    if remote:
        request.getfixturevalue("ray_cluster")
    out = tmp_path / "sweep.parquet"
    args = ["--model", str(tiny_gpt2_4), "--output", str(out), "--clean", "the cat sat", "--corrupt", "the dog sat",
            "--answer", "mat"]  # fmt: skip
    try:
        assert job("patching_sweep").main(args + (["--replicas", "2"] if remote else ["--local"])) == 0
    finally:
        for pool in raysight.pools() if remote else []:
            pool.shutdown()
    rows = pq.read_table(out).to_pylist()
    ref, tok = _hf(tiny_gpt2_4)
    clean, corrupt = (tok(t, return_tensors="pt") for t in ("the cat sat", "the dog sat"))
    answer = tok("mat", add_special_tokens=False)["input_ids"][0]
    assert len(rows) == 4 * clean["input_ids"].shape[1]
    for row in rows:
        block, position = ref.transformer.h[row["layer"]], row["position"]
        seen = {}
        keep = block.register_forward_hook(lambda m, a, o: seen.setdefault("h", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            ref(**clean)
        keep.remove()

        def patch(m: Any, a: Any, o: Any) -> Any:
            hidden = o[0] if isinstance(o, tuple) else o
            hidden[:, position] = seen["h"][:, position]
            return o

        handle = block.register_forward_hook(patch)
        with torch.no_grad():
            logit = ref(**corrupt).logits[0, -1, answer].item()
        handle.remove()
        assert row["logit"] == pytest.approx(logit, abs=1e-4)
