"""Activation patching sweep: which block and position carry the answer from a clean prompt into a corrupted one.

    python jobs/patching_sweep.py                     # the embedded default: a tiny GPT-2, a local Ray cluster
    python jobs/patching_sweep.py --model /models/gpt2 --clean "The Eiffel Tower is in the city of" \\
        --corrupt "The Colosseum is in the city of" --answer " Paris" --replicas 4 --output sweep.parquet

For every block L and token position p, one trace runs the clean and the corrupted prompt as two invokes of one
forward pass, writes the clean run's hidden state at (L, p) into the corrupted run, and saves the answer token's
logit there. The traces are independent, so they run at once on the pool's replicas. The result (one row per (L, p):
layer, position, logit, and the recovered fraction (logit - corrupt) / (clean - corrupt)) goes to Parquet.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import raysight
from raysight.models.language import decoder_blocks_path

logger = logging.getLogger("raysight.jobs.patching_sweep")


def parse(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a GPT-2-style checkpoint directory, or 'tiny' (built here)")
    p.add_argument("--clean", default="The Eiffel Tower is in the city of")
    p.add_argument("--corrupt", default="The Colosseum is in the city of")
    p.add_argument("--answer", default="paris", help="the token whose logit is measured (its first token)")
    p.add_argument("--output", default="sweep.parquet")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--address", default=None, help="a Ray cluster to connect to (default: RAY_ADDRESS, else local)")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    return p.parse_args(argv)


def answer_logit(model: Any, clean: str, corrupt: str, answer: int, where: Any, remote: bool) -> float:
    """The answer's last-position logit in the corrupted run, with the clean hidden state patched in at ``where``
    (``(block path, position)``; None: no patch)."""
    with model.trace(remote=remote) as tracer:
        if where is not None:
            block, position = where
            with tracer.invoke(clean):
                patch = model.get(block).output[:, position]
        with tracer.invoke(corrupt):
            if where is not None:
                model.get(block).output[:, position] = patch
            logit = model.lm_head.output[:, -1, answer].save()
    return float(logit.value[0])


def main(argv: Any = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.model == "tiny":
        from raysight.models.tiny import tiny_lm_path

        args.model = str(tiny_lm_path(layers=4))
    model = raysight.LanguageModel(args.model)
    tok = model.tokenizer
    clean_ids, corrupt_ids = (tok(t)["input_ids"] for t in (args.clean, args.corrupt))
    if len(clean_ids) != len(corrupt_ids):
        raise SystemExit(f"--clean and --corrupt must have the same number of tokens ({len(clean_ids)} vs "
                         f"{len(corrupt_ids)}); patching compares positions one to one")  # fmt: skip
    answer = tok(args.answer, add_special_tokens=False)["input_ids"][0]
    remote = not args.local
    if remote:
        raysight.init(args.address)
        if args.replicas > 1:
            raysight.serve(model, replicas=args.replicas)
    path = decoder_blocks_path(model)
    layers = len(model.get(path))
    cells = [(f"{path}.{layer}", position) for layer in range(layers) for position in range(len(clean_ids))]
    clean_logit = _clean_logit(model, args.clean, answer, remote)
    corrupt_logit = answer_logit(model, args.clean, args.corrupt, answer, None, remote)
    # remote: a few traces in flight per replica (the pool spreads them); here: one at a time, since the traces of
    # one process share the model's modules and their hooks
    with cf.ThreadPoolExecutor(max_workers=max(1, args.replicas) * 2 if remote else 1) as workers:
        logits = list(workers.map(lambda w: answer_logit(model, args.clean, args.corrupt, answer, w, remote), cells))
    span = clean_logit - corrupt_logit
    table = pa.table({
        "layer": [int(block.rsplit(".", 1)[1]) for block, _ in cells],
        "position": [p for _, p in cells],
        "token": [tok.convert_ids_to_tokens(clean_ids[p]) for _, p in cells],
        "logit": logits,
        "recovered": [(v - corrupt_logit) / span if span else float("nan") for v in logits],
    })  # fmt: skip
    pq.write_table(table, args.output)
    best = max(range(len(cells)), key=lambda i: logits[i])
    logger.info("%d cells (%d blocks x %d positions): clean %.3f, corrupt %.3f, best block %d position %d (%.3f); "
                "wrote %s", len(cells), layers, len(clean_ids), clean_logit, corrupt_logit, table["layer"][best].as_py(),
                table["position"][best].as_py(), logits[best], args.output)  # fmt: skip
    return 0


def _clean_logit(model: Any, clean: str, answer: int, remote: bool) -> float:
    with model.trace(clean, remote=remote):
        logit = model.lm_head.output[:, -1, answer].save()
    return float(logit.value[0])


if __name__ == "__main__":
    raise SystemExit(main())
