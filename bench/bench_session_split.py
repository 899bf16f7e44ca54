"""What splitting a session buys (SPEC §7): a session of independent traces, run locally, whole on one actor, and
split over the replicas of a pool.

    .venv/bin/python bench/bench_session_split.py            # ~1.5 min on 2 cores
    .venv/bin/python bench/bench_session_split.py --traces 8 --replicas 2 --rounds 5

The session holds ``--traces`` traces of a 6-block, 512-wide stack of ``nn.TransformerEncoderLayer`` on different
inputs (4 x 128 tokens each), each saving its last block's output; no trace uses another's values, so the planner
makes one part per trace. Implementations (interleaved by round; medians of the session's wall time):

* ``local``: the session in this process (one torch thread);
* ``one actor``: ``RayBackend(split=False)``, the whole session on one actor of the pool;
* ``split xN``: ``RayBackend()``, the parts spread over the pool's N replicas (one CPU, one torch thread each).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import raysight
from _report import print_medians
from raysight.backends.local import LocalBackend
from raysight.backends.ray import RayBackend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", type=int, default=6)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.TransformerEncoderLayer(512, 8, 2048, dropout=0.0, batch_first=True)
                            for _ in range(6)]).eval()  # fmt: skip
    model = raysight.NNsight(stack)
    inputs = [torch.randn(4, 128, 512) for _ in range(args.traces)]
    raysight.init(num_cpus=args.replicas + 1)
    pool = raysight.serve(model, replicas=args.replicas, name="bench-split")

    def session(backend: object) -> list[torch.Tensor]:
        with torch.no_grad(), model.session(backend=backend):
            outs = []
            for x in inputs:
                with model.trace(x):
                    outs.append(model[5].output.save())
        return [o.value for o in outs]

    impls = {"local": LocalBackend(), "one actor": RayBackend(split=False), f"split x{args.replicas}": RayBackend()}
    expected = session(impls["local"])
    for backend in impls.values():  # warm up, and check every implementation against the local run
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(session(backend), expected))
    assert len(impls[f"split x{args.replicas}"].last_plan.parts) == args.traces
    samples: dict[str, list[float]] = {name: [] for name in impls}
    for r in range(args.rounds):
        names = list(impls)[r % len(impls):] + list(impls)[:r % len(impls)]
        for name in names:
            start = time.perf_counter()
            session(impls[name])
            samples[name].append(time.perf_counter() - start)
    pool.shutdown()
    print_medians(f"session of {args.traces} independent traces (6 x TransformerEncoderLayer(512), input 4 x 128), "
                  f"median of {args.rounds} rounds", samples, "local", "seconds", False)

if __name__ == "__main__":
    main()
