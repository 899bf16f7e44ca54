"""Bytecode instructions per trace, by function: where raysight's Python time goes, in a few seconds and the same
numbers on every run (``sys.settrace`` with ``f_trace_opcodes``; no valgrind needed, unlike ``bench_icount.py``).

    .venv/bin/python bench/bench_opcodes.py                 # every case, the 15 costliest functions of each
    .venv/bin/python bench/bench_opcodes.py --top 40        # more functions
    .venv/bin/python bench/bench_opcodes.py --cases save1   # one case

A bytecode instruction is not a unit of time (a call or a dict update costs more than a LOAD_FAST, and C code such
as torch's kernels counts nothing), so use the counts to find where the interpreter spends its steps and to check
that a change removes some, and ``bench_trace.py`` / ``bench_icount.py`` for what a trace costs.

Cases are those of ``bench_trace.py``: on the two-layer MLP an empty trace, a trace saving one output, and zeroing
``layer1`` then saving the output; on 32 x ``Linear(8, 8)`` saving the first 1 and all 32 outputs (the marginal per
saved module is their difference / 31). Each case runs 50 times first (warm caches, specialized bytecode), then once
while counting.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

torch.set_num_threads(1)

from bench_trace import Deep, TwoLayer  # the models bench_trace.py times

import raysight

_PACKAGE = os.path.dirname(os.path.abspath(raysight.__file__))


def cases() -> dict[str, Callable[[], Any]]:
    torch.manual_seed(0)
    mlp, deep = raysight.NNsight(TwoLayer()), raysight.NNsight(Deep())
    x, xd = torch.randn(1, 5), torch.randn(1, 8)

    def empty() -> None:
        with mlp.trace(x):
            pass

    def save1() -> Any:
        with mlp.trace(x):
            out = mlp.layer1.output.save()
        return out

    def zero_read() -> Any:
        with mlp.trace(x):
            mlp.layer1.output[:] = 0
            out = mlp.output.save()
        return out

    def save_k(k: int) -> Callable[[], Any]:
        def run() -> Any:
            with deep.trace(xd):
                outs = [deep.layers[i].output.save() for i in range(k)]
            return outs

        return run

    return {"empty": empty, "save1": save1, "zero_read": zero_read, "deep_save1": save_k(1), "deep_save32": save_k(32)}


def count(fn: Callable[[], Any]) -> collections.Counter:
    for _ in range(50):
        fn()
    counts: collections.Counter = collections.Counter()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return counts


def where(filename: str) -> str:
    if filename.startswith(_PACKAGE):
        return "raysight/" + os.path.relpath(filename, _PACKAGE)
    if "site-packages" in filename:
        return filename.split("site-packages" + os.sep, 1)[1]
    return os.path.basename(filename)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--top", type=int, default=15, help="functions listed per case (default 15)")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    chosen = cases()
    names = [n for n in args.cases.split(",") if n] or list(chosen)
    unknown = [n for n in names if n not in chosen]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(chosen)}")
    totals: dict[str, tuple[int, int]] = {}
    for name in names:
        counts = count(chosen[name])
        ours = sum(v for (f, _, _), v in counts.items() if f.startswith(_PACKAGE))
        total = sum(counts.values())
        totals[name] = (total, ours)
        print(f"\n{name}: {total:,} instructions, {ours:,} in raysight, {total - ours:,} elsewhere (torch, the case)")
        for (filename, line, function), n in counts.most_common(args.top):
            print(f"  {n:6,}  {where(filename)}:{line} {function}")
    if "deep_save1" in totals and "deep_save32" in totals:
        (t1, o1), (t32, o32) = totals["deep_save1"], totals["deep_save32"]
        print(f"\nmarginal per saved module: {(t32 - t1) / 31:,.0f} instructions, {(o32 - o1) / 31:,.0f} in raysight")


if __name__ == "__main__":
    main()
