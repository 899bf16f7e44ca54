"""Train LoRA adapters on a causal LM where the model is (a Ray actor), and write metrics and weights to Parquet.

    python jobs/train_lora.py                                 # the embedded default: a tiny Llama, sample text,
                                                              # a local Ray cluster started in this process
    python jobs/train_lora.py --model /models/llama --data text.parquet --targets "model.layers.*.self_attn.[qv]_proj" \\
        --steps 200 --rank 8 --output lora-run/
    raysight submit jobs/train_lora.py -- --model /models/llama --data /data/text/

The whole loop (trace, loss, backward, optimizer step) is one raysight session that runs on one actor; the trained
adapter weights come back and are written with the per-step losses: ``metrics.parquet`` (step, loss) and
``weights.parquet`` (one row per adapter matrix: name, shape, dtype, values).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

import raysight
from raysight.train import LoRA, train_lora

logger = logging.getLogger("raysight.jobs.train_lora")

SAMPLE = ["the cat sat on the mat", "a dog ran in the park", "ray runs tasks on a cluster",
          "interpretability reads what networks compute"]  # fmt: skip


def parse(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a Hugging Face checkpoint directory, or 'tiny' (built here)")
    p.add_argument("--data", nargs="*", help="Parquet/JSONL files with a text column (default: sample sentences)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--targets", default=None, help="module path pattern (default: every attention q/v projection)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (batches cycle through the data)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--output", default="lora-run", help="directory for metrics.parquet and weights.parquet")
    p.add_argument("--address", default=None, help="a Ray cluster to connect to (default: RAY_ADDRESS, else local)")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    return p.parse_args(argv)


def texts_of(args: argparse.Namespace) -> list[str]:
    if not args.data:
        return list(SAMPLE)
    from raysight.data.sources import as_source

    texts: list[str] = []
    for _, _, batch in as_source(args.data).shards(1024):
        if args.text_column not in batch:
            raise SystemExit(f"--data has no column {args.text_column!r}; it has {list(batch)} (use --text-column)")
        texts.extend(batch[args.text_column])
    return texts


def next_token_loss(logits: Any, batch: dict) -> Any:
    """Cross-entropy of each next token, over the real (unpadded) positions."""
    ids = batch["input_ids"]
    mask = batch["attention_mask"][:, 1:].reshape(-1).bool()
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat[mask], ids[:, 1:].reshape(-1)[mask])


def main(argv: Any = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.model == "tiny":
        from raysight.models.tiny import tiny_lm_path

        args.model = str(tiny_lm_path(arch="llama"))
    model = raysight.LanguageModel(args.model, dispatch=args.local)
    model._module.requires_grad_(False)  # only the adapters train
    targets = args.targets or next(p for p in ("model.layers.*.self_attn.[qv]_proj", "transformer.h.*.attn.c_attn")
                                   if any(True for _ in _matching(model, p)))  # fmt: skip
    lora = LoRA(model, targets, rank=args.rank, alpha=args.alpha)
    texts = texts_of(args)
    tok = model.tokenizer
    batches = []
    for step in range(args.steps):
        chunk = [texts[(step * args.batch_size + i) % len(texts)] for i in range(args.batch_size)]
        enc = tok(chunk, return_tensors="pt", padding=True)
        batches.append({"input": {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                        "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})  # fmt: skip
    if not args.local:
        raysight.init(args.address)
    result = train_lora(model, lora, batches, next_token_loss, lr=args.lr, remote=not args.local)
    paths = result.write_parquet(args.output)
    losses = result.metrics.column("loss").to_pylist()
    logger.info("LoRA rank %d on %s: %d steps, loss %.4f -> %.4f; wrote %s", args.rank, targets, len(losses),
                losses[0], losses[-1], ", ".join(paths))  # fmt: skip
    return 0


def _matching(model: Any, pattern: str) -> Any:
    import fnmatch

    return (path for path, _ in model.named_modules() if fnmatch.fnmatchcase(path, pattern))


if __name__ == "__main__":
    raise SystemExit(main())
