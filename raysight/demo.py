"""The embedded demo: trace a small model built here, read and edit its internals, check against plain PyTorch,
then run the same trace on a Ray actor of a local Ray cluster started in this process.

    python -m raysight.demo            # local, then on Ray
    python -m raysight.demo --no-ray   # local only

Needs no download and no GPU. The main job (extraction over a dataset) is ``jobs/extract.py``.
"""

from __future__ import annotations

import argparse
import logging

import torch

import raysight

logger = logging.getLogger("raysight.demo")


class TwoLayer(torch.nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.layer1 = torch.nn.Linear(8, width)
        self.act = torch.nn.ReLU()
        self.layer2 = torch.nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.act(self.layer1(x)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ray", action="store_true", help="skip the run on a local Ray cluster")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(args.seed)
    net = TwoLayer()
    model = raysight.NNsight(net)
    a, b = torch.randn(2, 8), torch.randn(3, 8)

    checks = {}
    for where in ["local"] if args.no_ray else ["local", "ray"]:
        if where == "ray":
            raysight.init()  # a local Ray cluster in this process (or the one RAY_ADDRESS names)
        with model.trace(remote=where == "ray") as tracer:
            with tracer.invoke(a):
                hidden = model.layer1.output.clone().save()
                model.act.output[:] = 0  # ablate the hidden layer for this prompt only
                ablated = model.output.save()
            with tracer.invoke(b):
                clean = model.output.save()
        with torch.no_grad():
            checks[f"{where}: hidden equals plain forward"] = torch.allclose(hidden.value, net.layer1(a))
            checks[f"{where}: ablated rows equal the bias"] = torch.allclose(ablated.value, net.layer2.bias.expand(2, 4))
            checks[f"{where}: other invoke untouched"] = torch.allclose(clean.value, net(b))
    for name, ok in checks.items():
        logger.info("%-40s %s", name, "ok" if ok else "FAILED")
    logger.info("graph of the trace:\n%s", tracer.graph)
    if not args.no_ray:
        import ray

        ray.shutdown()
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
