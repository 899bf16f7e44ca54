"""What a shared pool saves a job: a driver that starts its own pool (actor start + loading the checkpoint) against one
that attaches to a shared pool started before (``raysight.serve(..., detached=True)``), timed from the driver's
``raysight.init`` to its first remote result, and per remote trace after that.

    .venv/bin/python bench/bench_shared_pool.py             # ~2 min: GPT-2-small-shaped checkpoint, 5 drivers each
    .venv/bin/python bench/bench_shared_pool.py --rounds 3 --layers 2

A real Ray head (``ray.cluster_utils.Cluster``) runs for the whole benchmark; each driver is a fresh Python process
(as a job is), run alternately own / shared, round by round. The checkpoint is a GPT-2-shaped model with random
weights (``--layers`` blocks, width 768), saved with ``save_pretrained`` and loaded through ``LanguageModel``; the
driver's trace saves the last block's output for one prompt. The process start and ``import raysight`` are the same
for both and not counted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

from _report import print_medians

DRIVER = textwrap.dedent(
    """
    import os, sys, time, raysight
    path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    start = time.perf_counter()
    raysight.init(os.environ["RAY_ADDRESS"])
    model = raysight.LanguageModel(path)
    if mode == "shared":
        pool = raysight.serve(model, name="bench-shared", detached=True)
    else:
        pool = raysight.serve(model, name="bench-own")
    blocks = model.transformer.h
    with model.trace("The Eiffel Tower is in the city of", remote=True):
        out = blocks[len(blocks) - 1].output.save()
    first = time.perf_counter() - start
    t = time.perf_counter()
    for _ in range(n):
        with model.trace("The Eiffel Tower is in the city of", remote=True):
            out = blocks[len(blocks) - 1].output.save()
    each = (time.perf_counter() - t) / n
    if mode != "shared":
        pool.shutdown()
    print("RESULT", first, each)
    """
)


def checkpoint(directory: str, layers: int) -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from raysight.models.tiny import tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=len(tokenizer), n_positions=512,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--traces", type=int, default=10, help="remote traces per driver after the first")
    args = p.parse_args()
    from ray.cluster_utils import Cluster

    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(os.path.join(tmp, "gpt2-shaped"), args.layers)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
        env = dict(os.environ, RAY_ADDRESS=cluster.address)
        first: dict[str, list[float]] = {"own pool": [], "shared pool": []}
        each: dict[str, list[float]] = {"own pool": [], "shared pool": []}
        try:
            warm = [sys.executable, "-c", DRIVER, path, "shared", "1"]  # starts the shared pool: not a sample
            subprocess.run(warm, env=env, check=True, capture_output=True)
            for r in range(args.rounds):
                order = [("own pool", "own"), ("shared pool", "shared")]
                for label, mode in order if r % 2 == 0 else order[::-1]:
                    done = subprocess.run([sys.executable, "-c", DRIVER, path, mode, str(args.traces)], env=env,
                                          check=True, capture_output=True, text=True)  # fmt: skip
                    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
                    a, b = map(float, line.split()[1:])
                    first[label].append(a)
                    each[label].append(b * 1000)
        finally:
            cluster.shutdown()
    print(f"GPT-2-shaped checkpoint, {args.layers} blocks x 768; {args.rounds} drivers each")
    print_medians("driver start (raysight.init) to its first remote result", first, "own pool", "s", False)
    print_medians("each remote trace after that", each, "own pool", "ms", False)


if __name__ == "__main__":
    main()
