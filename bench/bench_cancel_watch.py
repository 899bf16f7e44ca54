"""What watching for ``ray.cancel`` costs a model actor's forward pass, inside a real Ray task on one CPU thread.

    .venv/bin/python bench/bench_cancel_watch.py            # ~1 minute on 2 cores
    .venv/bin/python bench/bench_cancel_watch.py --reps 31  # more interleaved rounds

A model actor reads Ray's cancel flag while a request runs (``raysight.distributed.actor.stops_when_cancelled``).
Each variant below runs the same narrow 12-block GPT-2 (width 64, batch 1 x 8 tokens, ``torch.no_grad()``): small
enough that Python, not arithmetic, sets the time, as it does for a GPU's forward pass. Rounds interleave the
variants (rotating the order); each sample is the median forward time over a block of calls.

* raw forward: no watch;
* global pre-hook: the check as a global forward pre-hook (``register_module_forward_pre_hook``), so every module
  call takes torch's slow path and calls it (the design before the layer watch);
* layer watch: ``CancelWatch.watch(model)``, pre-hooks on the root, its children and each transformer block only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch


@ray.remote(num_cpus=1)
def measure(reps: int, calls: int) -> dict:
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel

    from raysight.distributed.actor import checkpoints, stops_when_cancelled

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=64, n_head=4, vocab_size=1000, bos_token_id=0,
                                       eos_token_id=0)).eval()  # fmt: skip
    ids = torch.randint(0, 1000, (1, 8))
    module_calls = [0]

    def count(module: torch.nn.Module, args: tuple) -> None:
        module_calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    with torch.no_grad():
        model(ids)
    handle.remove()

    def block() -> float:
        times = []
        with torch.no_grad():
            for _ in range(calls):
                start = time.perf_counter_ns()
                model(ids)
                times.append(time.perf_counter_ns() - start)
        return statistics.median(times) / 1e3

    samples: dict[str, list[float]] = {"raw forward": [], "global pre-hook": [], "layer watch": []}
    names = list(samples)
    with stops_when_cancelled() as watch:  # a real Ray task: the watch reads the real cancel flag
        for round_ in range(reps + 1):
            order = names[round_ % 3 :] + names[: round_ % 3]
            for name in order:
                if name == "global pre-hook":
                    handle = torch.nn.modules.module.register_module_forward_pre_hook(watch.check)
                elif name == "layer watch":
                    watch.watch([model])
                took = block()
                if name == "global pre-hook":
                    handle.remove()
                elif name == "layer watch":
                    watch.remove()
                if round_:  # round 0 warms up
                    samples[name].append(took)
    return {"samples": samples, "module_calls": module_calls[0], "watched": len(checkpoints(model)),
            "modules": sum(1 for _ in model.modules())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--calls", type=int, default=40, help="forward passes per block (default 40)")
    args = parser.parse_args()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        result = ray.get(measure.remote(args.reps, args.calls))
    finally:
        ray.shutdown()
    samples = result["samples"]
    raw = statistics.median(samples["raw forward"])
    print(f"narrow GPT-2, 12 blocks: {result['modules']} modules, {result['module_calls']} module calls per forward, "
          f"{result['watched']} watched by the layer watch; {args.reps} rounds x {args.calls} forwards, one thread")
    print(f"{'variant':<18}{'median µs':>12}{'IQR µs':>10}{'ratio':>8}")
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4)
        median = statistics.median(values)
        print(f"{name:<18}{median:>12.1f}{q[2] - q[0]:>10.1f}{median / raw:>8.3f}")


if __name__ == "__main__":
    main()
