"""Extract activations of a language model over a dataset into Parquet, on a Ray cluster.

    python jobs/extract.py                                   # the embedded default: a tiny model, sample prompts,
                                                             # a local Ray cluster started in this process
    python jobs/extract.py --model /models/gpt2 --data prompts.parquet --layers 3,6 --output acts/ \\
        --replicas 4 --num-gpus 1                            # a real checkpoint on a cluster (RAY_ADDRESS)
    raysight submit jobs/extract.py -- --model /models/gpt2 --data /data/prompts/   # as a Ray job
    raysight submit jobs/extract.py -- --model /models/gpt2 --pool gpt2 ...   # the shared pool of `raysight serve`

Each output row is one prompt: ``id`` (its position in the input), ``tokens``, the text, and one column per layer
(``h3``: that block's hidden states for the prompt's own tokens, no padding). Rerunning with the same arguments
resumes an interrupted run (parts already written are kept); ``--overwrite`` starts again.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import raysight
from raysight.data import to_tensors
from raysight.models.language import decoder_blocks_path

logger = logging.getLogger("raysight.jobs.extract")

SAMPLE = [
    "The Eiffel Tower is in the city of", "Ray schedules tasks and actors across a cluster",
    "Interpretability reads what a network computes", "hello", "a b c d e f g h i j k l",
    "Parquet stores columns of typed values", "The quick brown fox jumps over the lazy dog",
    "Residual streams carry information between layers",
]  # fmt: skip


def parse(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a Hugging Face checkpoint directory, or 'tiny' (built here)")
    p.add_argument("--data", nargs="*", help="Parquet/JSONL files or directories (default: sample prompts)")
    p.add_argument("--text-column", default="text", help="the column holding the prompts (default: text)")
    p.add_argument("--rows", type=int, default=64, help="rows of sample prompts when --data is not given")
    p.add_argument("--layers", default="all", help="block indices, e.g. 0,3,6, or 'all'")
    p.add_argument("--output", default="extract-out", help="the Parquet directory to write (default: extract-out)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--replicas", type=int, default=1, help="model actors to spread the batches over")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (the model is sharded over them)")
    p.add_argument("--pool", default=None, help="run on the shared pool of this name (`raysight serve`); when none "
                   "runs, start it (with --replicas, --num-gpus) and keep it for later jobs")  # fmt: skip
    p.add_argument("--address", default=None, help="a Ray cluster to connect to (default: RAY_ADDRESS, else local)")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray actors")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier extraction in --output")
    return p.parse_args(argv)


def main(argv: Any = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.model == "tiny":
        from raysight.models.tiny import tiny_lm_path

        args.model = str(tiny_lm_path())
    model = raysight.LanguageModel(args.model)  # on the meta device: the actors load the weights
    blocks = decoder_blocks_path(model)
    layers = list(range(len(model.get(blocks)))) if args.layers == "all" else [int(i) for i in args.layers.split(",")]
    column = args.text_column
    data = args.data or [{column: SAMPLE[i % len(SAMPLE)] + f" ({i})"} for i in range(args.rows)]

    def fn(model: Any, batch: dict) -> dict:
        with model.trace(batch[column]):
            return {f"h{i}": _hidden(model.get(f"{blocks}.{i}").output) for i in layers}

    if not args.local:
        raysight.init(args.address)
        if args.pool:
            raysight.serve(model, replicas=args.replicas, num_gpus=args.num_gpus, name=args.pool, detached=True)
        elif args.replicas > 1 or args.num_gpus:
            raysight.serve(model, replicas=args.replicas, num_gpus=args.num_gpus)
    start = time.perf_counter()
    ds = raysight.extract(model, data, fn, output=args.output, batch_size=args.batch_size, remote=not args.local,
                          keep_columns=[column], overwrite=args.overwrite)  # fmt: skip
    seconds = time.perf_counter() - start
    logger.info("extracted into %s in %.1f s", args.output, seconds)
    if "://" in args.output:  # a remote filesystem: the summary below reads local files
        return 0
    import pyarrow.parquet as pq

    first = pq.read_table(sorted(_parts(args.output))[0])
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in _parts(args.output))
    logger.info("%d rows in %.1f s (%.1f rows/s) -> %s", rows, seconds, rows / seconds, args.output)
    for name in [f"h{i}" for i in layers]:
        shape = tuple(to_tensors(first, name)[0].shape)
        logger.info("  %-6s %s per row (first row: %s)", name, first.schema.field(name).metadata[b"raysight.dtype"].decode(), shape)
    del ds
    return 0


def _hidden(output: Any) -> Any:
    """A block's hidden states whether it returns a tensor (transformers >= 5) or a tuple (older releases)."""
    return raysight.apply(_first, output)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, tuple) else value


def _parts(directory: str) -> list[str]:
    import glob
    import os

    return glob.glob(os.path.join(directory, "part-*.parquet"))


if __name__ == "__main__":
    raise SystemExit(main())
