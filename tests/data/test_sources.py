"""Extraction inputs that cannot be hashed up front: a Hugging Face ``IterableDataset`` (a streamed dataset, here
built locally with ``to_iterable_dataset()``) and a ``ray.data.Dataset``. Rows come in stream order and equal plain
transformers run per prompt; a resume on another input is refused (by the first batch, the known metadata, or the
row count at the end) while a rebuilt equal input resumes; any other input type is a TypeError naming what is
accepted."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import MLP
from lm_helpers import PROMPTS, block_output, encode

import raysight
from raysight.data import to_tensor, to_tensors
from raysight.data.sources import as_source, fingerprint

ray = pytest.importorskip("ray")
datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _ray(ray_cluster: Any) -> None:
    """The returned datasets (and remote=True) use the session's local Ray cluster."""


def as_tensor(batch: dict) -> dict:
    return {**batch, "x": torch.tensor(batch["x"])}


def forward(model: Any, batch: dict) -> dict:
    with model.trace(batch["x"]):
        return {"out": model.output}


def streamed(rows: list[dict], shards: int = 1) -> Any:
    return datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=shards)


def parts_of(out: pathlib.Path) -> list[pathlib.Path]:
    return sorted(out.glob("part-*.parquet"))


def stamps(out: pathlib.Path) -> dict[str, int]:
    return {p.name: os.stat(p).st_mtime_ns for p in parts_of(out)}


def expected_out(mlp: MLP, rows: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return mlp(torch.tensor([r["x"] for r in rows]))


@pytest.mark.parametrize("remote", [False, True], ids=["here", "ray"])
def test_an_iterable_dataset_gives_each_prompt_as_transformers_does(tiny_gpt2_path: Any, tiny_gpt2_ref: Any,
                                                                     remote: bool) -> None:  # fmt: skip
    lm = raysight.LanguageModel(str(tiny_gpt2_path))

    def fn(model: Any, batch: dict) -> dict:
        with model.trace(batch["text"]):
            return {"h0": model.transformer.h[0].output, "last": model.lm_head.output[:, -1]}

    texts = list(PROMPTS) * 2 + ["one more"]  # 7 rows: batches of 3, 3 and 1, each padded differently
    data = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).to_iterable_dataset(num_shards=2)
    table = pa.concat_tables(ray.get(raysight.extract(lm, data, fn, batch_size=3, remote=remote,
                                                      keep_columns=["text", "n"]).to_arrow_refs()))  # fmt: skip
    assert table.column("id").to_pylist() == list(range(len(texts)))  # stream order
    assert table.column("text").to_pylist() == texts
    assert table.column("n").to_pylist() == list(range(len(texts)))
    for i, text in enumerate(texts):
        inputs = encode(tiny_gpt2_ref, lm.tokenizer, text)  # the prompt alone, unpadded
        hidden: list = []
        block = tiny_gpt2_ref.transformer.h[0]
        handle = block.register_forward_hook(lambda m, a, out, seen=hidden: seen.append(block_output(out)))
        try:
            with torch.no_grad():
                logits = tiny_gpt2_ref(**inputs).logits
        finally:
            handle.remove()
        assert torch.equal(to_tensors(table, "tokens")[i], inputs["input_ids"][0])
        assert torch.allclose(to_tensors(table, "h0")[i], hidden[0][0], atol=1e-5)
        assert torch.allclose(to_tensors(table, "last")[i], logits[0, -1], atol=1e-5)


def test_an_iterable_dataset_resumes_when_equal_and_is_refused_when_not(mlp: MLP, rows: list[dict],
                                                                        tmp_path: pathlib.Path) -> None:  # fmt: skip
    model, out = raysight.NNsight(mlp), tmp_path / "out"

    def run(data: Any) -> Any:
        return raysight.extract(model, data, forward, batch_size=4, remote=False, output=out, preprocess=as_tensor)

    run(streamed(rows))
    before = stamps(out)
    assert len(before) == 3
    ds = run(streamed(rows, shards=2))  # rebuilt, equal rows in the same order: a resume, nothing redone
    assert stamps(out) == before
    assert torch.allclose(to_tensor(pq.read_table(parts_of(out)), "out"), expected_out(mlp, rows), atol=1e-6)
    assert ds.count() == 10

    changed = [dict(r) for r in rows]
    changed[1]["x"] = [v + 1 for v in changed[1]["x"]]  # in the first batch
    relabelled = [{**r, "label": float(r["label"])} for r in rows]  # other features (and values' types)
    for other in (changed, relabelled):
        with pytest.raises(FileExistsError, match=r"its source differ.*overwrite=True"):
            run(streamed(other))
        assert stamps(out) == before  # refused before anything ran

    # a shorter stream with the same first batch: caught at the end, not left in the output as if complete
    with pytest.raises(FileExistsError, match="holds 10 rows but this run's input has 7.*overwrite=True"):
        run(streamed(rows[:7]))
    assert not json.loads((out / ".raysight-extract.json").read_text())["complete"]


def test_a_ray_dataset_resumes_when_equal_and_is_refused_when_not(mlp: MLP, rows: list[dict],
                                                                  tmp_path: pathlib.Path) -> None:  # fmt: skip
    model, out = raysight.NNsight(mlp), tmp_path / "out"

    def run(data: Any) -> Any:
        return raysight.extract(model, data, forward, batch_size=4, remote=False, output=out, preprocess=as_tensor)

    run(ray.data.from_items(rows))
    before = stamps(out)
    run(ray.data.from_items(rows))  # a new dataset of the same rows: resumed
    assert stamps(out) == before
    assert torch.allclose(to_tensor(pq.read_table(parts_of(out)), "out"), expected_out(mlp, rows), atol=1e-6)

    changed = [dict(r) for r in rows]
    changed[0]["label"] = 99
    for other in (changed, rows[:9]):  # another first batch; the same first batch but another (known) count
        with pytest.raises(FileExistsError, match=r"its source differ.*overwrite=True"):
            run(ray.data.from_items(other))
        assert stamps(out) == before


@pytest.mark.slow  # a Parquet read on the local cluster takes ~15 s to schedule
def test_a_ray_dataset_counted_in_between_still_resumes(mlp: MLP, rows: list[dict], tmp_path: pathlib.Path) -> None:
    """The fingerprint uses only what the dataset's plan states, not what Ray learnt by running it once."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "rows.parquet")
    data, out = ray.data.read_parquet(str(tmp_path / "in")), tmp_path / "out"
    model = raysight.NNsight(mlp)
    raysight.extract(model, data, forward, batch_size=4, remote=False, output=out, preprocess=as_tensor)
    before = stamps(out)
    assert data.count() == 10
    raysight.extract(model, data, forward, batch_size=4, remote=False, output=out, preprocess=as_tensor)
    assert stamps(out) == before


def test_fingerprints_see_whole_values_and_only_content(rows: list[dict]) -> None:
    big = [{"x": torch.zeros(5000), "y": torch.zeros(3000).numpy()} for _ in range(2)]
    same = [{"x": torch.zeros(5000), "y": torch.zeros(3000).numpy()} for _ in range(2)]
    deep = [{"x": torch.zeros(5000), "y": torch.zeros(3000).numpy()} for _ in range(2)]
    deep[1]["x"][2500] = 1.0  # repr elides the middle of a large tensor; the fingerprint does not
    other_array = [{"x": torch.zeros(5000), "y": torch.zeros(3000).numpy()} for _ in range(2)]
    other_array[0]["y"][1500] = 1.0
    assert fingerprint(as_source(big)) == fingerprint(as_source(same))
    assert fingerprint(as_source(deep)) != fingerprint(as_source(big))
    assert fingerprint(as_source(other_array)) != fingerprint(as_source(big))
    assert fingerprint(as_source(big)) != fingerprint(as_source([{**r, "x": r["x"].half()} for r in big]))  # dtype

    class Opaque:  # its repr holds its address, which differs from one object to another
        pass

    assert fingerprint(as_source([{"o": Opaque()}])) == fingerprint(as_source([{"o": Opaque()}]))

    source = as_source(streamed(rows))
    first = next(source.shards(4))[2]
    assert fingerprint(source, first) == fingerprint(as_source(streamed(rows)), first)
    assert fingerprint(source, first) != fingerprint(source, {**first, "label": first["label"][::-1]})
    with pytest.raises(ValueError, match="needs its first batch"):
        fingerprint(source)


def test_other_inputs_are_a_type_error_naming_what_is_accepted(mlp: MLP, rows: list[dict]) -> None:
    model = raysight.NNsight(mlp)
    accepted = r"list of strings or dicts, a pyarrow.Table, a datasets.Dataset or datasets.IterableDataset, a ray.data"
    for data in (3, {"x": [r["x"] for r in rows]}, (r for r in rows), torch.zeros(3, 5)):
        with pytest.raises(TypeError, match=f"cannot read an extraction's input from {type(data).__name__}: "
                                            f"pass a {accepted}"):  # fmt: skip
            raysight.extract(model, data, forward, remote=False, preprocess=as_tensor)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    for data in (splits, datasets.IterableDatasetDict({"train": streamed(rows)})):
        with pytest.raises(TypeError, match=r"reads one split.*data\[split\].*\['train'\]"):
            raysight.extract(model, data, forward, remote=False, preprocess=as_tensor)
    with pytest.raises(TypeError, match="only strings.*or only dicts"):
        raysight.extract(model, [1, 2], forward, remote=False)
