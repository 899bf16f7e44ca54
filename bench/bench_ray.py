"""What a Ray round trip costs: the same trace run locally, through the wire format in this process
(``remote="local"``) and on a Ray actor of a local cluster (``remote=True``), on two models.

    .venv/bin/python bench/bench_ray.py            # ~1 min (most of it is Ray starting)
    .venv/bin/python bench/bench_ray.py --n 50     # traces per implementation and round

Cases: the two-layer MLP of bench_trace.py (input (1, 5), saving one output: the fixed cost of a request) and a
12-layer, 768-wide GPT-2-shaped stack of ``nn.TransformerEncoderLayer`` (input (8, 128, 768), saving every block's
output: 12 x 3 MiB coming back). Implementations are interleaved round by round; the table gives medians over rounds
of the time per trace, the time added over the local run and the ratio to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

import raysight


def _mlp() -> tuple[raysight.NNsight, torch.Tensor, Callable]:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("layer1", nn.Linear(5, 10))
    net.add_module("layer2", nn.Linear(10, 2))
    model = raysight.NNsight(net)
    x = torch.randn(1, 5)

    def trace(remote: Any) -> Any:
        with model.trace(x, remote=remote):
            out = model.layer1.output.save()
        return out.value

    return model, x, trace


def _gpt_shaped(batch: int, tokens: int) -> tuple[raysight.NNsight, torch.Tensor, Callable]:
    torch.manual_seed(0)
    blocks = nn.Sequential(*[nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, batch_first=True,
                                                        norm_first=True) for _ in range(12)]).eval()  # fmt: skip
    model = raysight.NNsight(blocks)
    x = torch.randn(batch, tokens, 768)

    def trace(remote: Any) -> Any:
        with torch.no_grad(), model.trace(x, remote=remote):
            outs = [model[i].output.save() for i in range(12)]
        return outs[-1].value

    return model, x, trace


def _time(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30, help="traces per implementation per round (MLP)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="GPT-shaped input (2, 64, 768), fewer rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    raysight.init(num_cpus=2)
    print(f"ray started in {time.perf_counter() - started:.1f} s; load average {os.getloadavg()[0]:.2f}")
    rounds = 3 if args.quick else args.rounds
    cases = [("two-layer MLP, save 1", _mlp(), args.n),
             ("GPT-2-shaped, save 12 blocks", _gpt_shaped(*((2, 64) if args.quick else (8, 128))), 1)]
    print(f"{'case':32s} {'impl':18s} {'median ms':>10s} {'added ms':>10s} {'ratio':>7s}")
    for name, (model, x, trace), n in cases:
        impls = {"local": False, "wire (in-process)": "local", "ray actor": True}
        expected = trace(False)
        for remote in impls.values():  # warm up: the actor loads the model on its first request
            assert torch.allclose(trace(remote), expected, atol=1e-5)
        samples: dict[str, list[float]] = {k: [] for k in impls}
        for r in range(rounds):
            order = list(impls.items())
            order = order[r % 3:] + order[: r % 3]
            for label, remote in order:
                samples[label].append(_time(lambda: trace(remote), n))
        base = statistics.median(samples["local"])
        for label in impls:
            med = statistics.median(samples[label])
            print(f"{name:32s} {label:18s} {med * 1e3:10.3f} {(med - base) * 1e3:10.3f} {med / base:7.2f}")
            name = ""
    import ray

    ray.shutdown()
    print(f"total {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
