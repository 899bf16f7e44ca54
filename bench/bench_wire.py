"""Wire format speed: encode + decode of a graph, and the throughput of saved values coming back.

    python bench/bench_wire.py [--repeats 200]

1. The graph of a trace that saves the output of every block of a 12-block model (the graph is what travels; the
   model's size does not matter): median time to encode the request and decode it again (target <= 1 ms).
2. Saved values of 100 MB (one float32 tensor): encode the reply + decode it, as ``WireBackend`` does in-process;
   reported as GB/s of saved bytes (target >= 1 GB/s).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import raysight
from raysight.graph.serialize import Limits, decode_request, decode_result, encode_request, encode_result
from raysight.tracing.tracer import Tracer


class Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mlp = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Stack(torch.nn.Module):
    def __init__(self, layers: int = 12, d: int = 16) -> None:
        super().__init__()
        self.h = torch.nn.ModuleList(Block(d) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            x = block(x)
        return x


def median_ms(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    cfg = ap.parse_args()
    torch.set_num_threads(1)
    model = raysight.NNsight(Stack())
    x = torch.randn(8, 128, 16)  # the input travels too; 8 x 128 tokens as in the GPT-2 case, narrow hidden
    with Tracer(model, (x,), execute=False) as tracer:
        for block in model.h:
            block.output.save()
    request = tracer.request()
    limits = Limits()

    def graph_round_trip() -> None:
        decode_request(encode_request(request, [], model=model), limits, True, lambda i: model)

    with Tracer(model, (torch.randn(1, 16),), execute=False) as small:
        for block in model.h:
            block.output.save()
    small_request = small.request()

    def graph_only() -> None:
        decode_request(encode_request(small_request, [], model=model), limits, True, lambda i: model)

    graph_ms = median_ms(graph_only, cfg.repeats)
    with_input_ms = median_ms(graph_round_trip, cfg.repeats)
    payload = encode_request(small_request, [], model=model)

    big = torch.randn(25 * 1024 * 1024)  # 100 MiB of float32
    nbytes = big.numel() * big.element_size()

    def saved_round_trip() -> None:
        saved, _ = decode_result(encode_result({0: big}, limits))
        assert saved[0].shape == big.shape

    saved_ms = median_ms(saved_round_trip, max(5, cfg.repeats // 40))
    gbps = nbytes / (saved_ms / 1000) / 1e9
    print(f"{'case':<58} {'median':>12}")
    print(f"{'graph of 12 saved blocks: encode + decode (' + str(len(payload)) + ' B)':<58} {graph_ms:>9.3f} ms"
          f"   target <= 1 ms: {'PASS' if graph_ms <= 1 else 'MISS'}")  # fmt: skip
    print(f"{'same, with its 8x128x16 float32 input':<58} {with_input_ms:>9.3f} ms")
    print(f"{'saved values, 100 MiB: encode + decode':<58} {saved_ms:>9.1f} ms   {gbps:.2f} GB/s   target >= 1 GB/s: "
          f"{'PASS' if gbps >= 1 else 'MISS'}")  # fmt: skip


if __name__ == "__main__":
    main()
