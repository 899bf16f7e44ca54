"""Extraction throughput: ``raysight.extract`` against the same work written by hand, and against nnsight.

    .venv/bin/python bench/bench_extract.py             # ~3 min on 2 cores
    .venv/bin/python bench/bench_extract.py --quick     # ~1 min: fewer prompts and rounds

Every implementation turns the same prompts into the same Parquet rows (id, tokens, the hidden states of two
blocks for the prompt's own tokens) of a GPT-2 built from a config (random weights; ``--layers``/``--width``):

* ``hooks``: a plain loop — tokenizer, ``register_forward_hook`` on the blocks, the HF forward (ended by an
  exception after the last block needed, as raysight ends it), unpadding by the attention mask, one Arrow table
  per batch (the same ``tensor_field`` columns) written with ``pq.write_table``;
* ``nnsight``: the same loop with an nnsight trace per batch saving the two blocks (when nnsight is installed; it
  runs the whole forward, lm_head included);
* ``raysight here``: ``raysight.extract(..., remote=False)`` (this process);
* ``raysight ray xN``: ``raysight.extract(..., remote=True)`` on a pool of N replicas of a local Ray cluster
  (started before timing; each replica one CPU).

Rounds interleave the implementations; the table gives the median over rounds of rows per second and the ratio to
``hooks`` (above 1: faster). Torch runs one thread in this process and in each actor, so the replicas' numbers
show what spreading batches over actors buys on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import raysight
from _report import print_medians
from raysight.data import tensor_field
from raysight.models.tiny import tiny_lm_path

SENTENCES = ["The Eiffel Tower is in the city of", "hello", "a b c d e f g h i j k l",
             "Ray schedules tasks and actors across a cluster", "Parquet stores columns of typed values"]  # fmt: skip


def _rows_table(first_id: int, ids: torch.Tensor, mask: torch.Tensor, hidden: dict) -> pa.Table:
    n = ids.shape[0]
    fields, arrays = [pa.field("id", pa.int64())], [pa.array(range(first_id, first_id + n), pa.int64())]
    m = mask.bool()
    for name, rows in [("tokens", [ids[i][m[i]] for i in range(n)])] + [
            (k, [v[i][m[i]] for i in range(n)]) for k, v in hidden.items()]:  # fmt: skip
        field, array = tensor_field(name, rows)
        fields.append(field)
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


class _Done(Exception):
    pass


def _hooks(path: str, layers: list[int]) -> Callable:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)

    def run(prompts: list[str], out: str, batch_size: int) -> None:
        os.makedirs(out)
        for shard, start in enumerate(range(0, len(prompts), batch_size)):
            enc = tok(prompts[start:start + batch_size], return_tensors="pt", padding=True)
            seen: dict = {}

            def keep(m: Any, a: Any, o: Any, i: int) -> None:
                seen[f"h{i}"] = o[0] if isinstance(o, tuple) else o
                if i == layers[-1]:
                    raise _Done  # the last block needed: skip the rest of the forward, as raysight does

            handles = [model.transformer.h[i].register_forward_hook(lambda m, a, o, i=i: keep(m, a, o, i))
                       for i in layers]  # fmt: skip
            try:
                with torch.no_grad():
                    model(**enc)
            except _Done:
                pass
            finally:
                for h in handles:
                    h.remove()
            table = _rows_table(start, enc["input_ids"], enc["attention_mask"], seen)
            pq.write_table(table, os.path.join(out, f"part-{shard:06d}.parquet"))

    return run


def _nnsight(path: str, layers: list[int]) -> Any:
    try:
        import nnsight
    except ImportError:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = nnsight.NNsight(AutoModelForCausalLM.from_pretrained(path).eval())

    def run(prompts: list[str], out: str, batch_size: int) -> None:
        os.makedirs(out)
        for shard, start in enumerate(range(0, len(prompts), batch_size)):
            enc = tok(prompts[start:start + batch_size], return_tensors="pt", padding=True)
            saved: list = []  # (nnsight 0.8 runs the block itself: append to a list made outside it)
            with torch.no_grad():
                with model.trace(**enc):
                    for i in layers:
                        saved.append(model.transformer.h[i].output.save())
            saved = dict(zip([f"h{i}" for i in layers], saved))
            hidden = {k: (v[0] if isinstance(v, tuple) else v) for k, v in saved.items()}
            table = _rows_table(start, enc["input_ids"], enc["attention_mask"], hidden)
            pq.write_table(table, os.path.join(out, f"part-{shard:06d}.parquet"))

    return run


def _raysight(path: str, layers: list[int], remote: bool) -> Callable:
    model = raysight.LanguageModel(path)

    def fn(model: Any, batch: dict) -> dict:
        with model.trace(batch["text"]):
            return {f"h{i}": model.transformer.h[i].output for i in layers}

    def run(prompts: list[str], out: str, batch_size: int) -> None:
        with torch.no_grad():
            raysight.extract(model, prompts, fn, output=out, batch_size=batch_size, remote=remote, progress=False)

    return run, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=6, help="blocks of the GPT-2 (default 6)")
    p.add_argument("--width", type=int, default=256, help="its width (default 256)")
    p.add_argument("--replicas", default="1,2", help="pool sizes for the Ray rows (default 1,2)")
    args = p.parse_args()
    prompts_n = args.prompts or (128 if args.quick else 512)
    rounds = args.rounds or (3 if args.quick else 5)
    torch.set_num_threads(1)
    scratch = tempfile.mkdtemp(prefix="raysight-bench-extract-")
    path = str(tiny_lm_path(os.path.join(scratch, "model"), layers=args.layers, width=args.width))
    layers = [1, args.layers - 1]
    prompts = [SENTENCES[i % len(SENTENCES)] + f" {i}" for i in range(prompts_n)]

    impls: dict[str, Callable] = {"hooks": _hooks(path, layers)}
    nn_run = _nnsight(path, layers)
    if nn_run is not None:
        impls["nnsight"] = nn_run
    impls["raysight here"], _ = _raysight(path, layers, remote=False)
    raysight.init(num_cpus=max(int(r) for r in args.replicas.split(",")) + 1)
    pools = []
    for replicas in (int(r) for r in args.replicas.split(",")):
        run, model = _raysight(path, layers, remote=True)
        pools.append(raysight.serve(model, replicas=replicas, name=f"bench-x{replicas}"))
        impls[f"raysight ray x{replicas}"] = run

    samples: dict[str, list[float]] = {name: [] for name in impls}
    for r in range(rounds + 1):  # round 0 warms up (actors load, caches fill)
        names = list(impls)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            out = os.path.join(scratch, f"out-{r}-{name.replace(' ', '_')}")
            start = time.perf_counter()
            impls[name](prompts, out, args.batch_size)
            seconds = time.perf_counter() - start
            rows = sum(pq.ParquetFile(os.path.join(out, f)).metadata.num_rows for f in os.listdir(out)
                       if f.endswith(".parquet"))  # fmt: skip
            assert rows == prompts_n, (name, rows)
            if r:
                samples[name].append(prompts_n / seconds)
            shutil.rmtree(out)
    for pool in pools:
        pool.shutdown()
    print_medians(f"extraction of {prompts_n} prompts, batch {args.batch_size}, GPT-2 {args.layers}x{args.width}, "
                  f"blocks {layers}; median of {rounds} rounds", samples, "hooks", "rows/s", True, digits=1)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
