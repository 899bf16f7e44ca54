"""Instructions per trace, counted by valgrind's callgrind: the same numbers on every run, whatever else the machine
is doing. A complement to ``bench_trace.py``, whose microsecond medians move by tens of percent on a noisy 2-core VM.

    .venv/bin/python bench/bench_icount.py            # ~4 min: most of it is valgrind starting torch
    .venv/bin/python bench/bench_icount.py --n 200    # more calls per case (the counts barely change)
    .venv/bin/python bench/bench_icount.py --gc       # keep the cycle collector on while counting
    .venv/bin/python bench/bench_icount.py --only raysight,raw --keep /tmp/cg   # some cases; keep the files:
    callgrind_annotate /tmp/cg/deep_raysight_save_32.callgrind | head -40      # where each case's instructions go

Needs ``valgrind`` and ``gcc`` (with ``valgrind/callgrind.h``). The script compiles a three-function helper that
issues callgrind client requests (start/stop counting, dump a named part), runs itself under callgrind, and counts
only the calls of each case: one part per case, ``n`` calls each, after a warm-up, with ``gc.freeze()`` first (and the
collector off unless ``--gc``). Instructions are not time (torch's C++ and the interpreter retire instructions at
different rates), so quote them next to ``bench_trace.py``'s medians, not instead of them.

Cases are those of ``bench_trace.py`` cases 1, 2 and 4 (two-layer MLP; 32 x Linear(8, 8); zeroing layer1 and reading
the logits), for raw PyTorch, hand-written hooks, raysight and nnsight (when installed).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable

HELPER = r"""
#include <valgrind/callgrind.h>
void cg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void cg_dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
void cg_zero(void) { CALLGRIND_ZERO_STATS; }
"""


def cases() -> dict[str, Callable[[], object]]:
    import torch
    from torch import nn

    import raysight

    torch.set_num_threads(1)
    torch.manual_seed(0)
    mlp = nn.Sequential()
    mlp.add_module("layer1", nn.Linear(5, 10))
    mlp.add_module("layer2", nn.Linear(10, 2))
    x = torch.randn(1, 5)

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(32)])

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                h = layer(h)
            return h

    deep = Deep()
    xd = torch.randn(1, 8)
    saved: list = []

    def keep(m: nn.Module, a: tuple, o: torch.Tensor) -> None:
        saved.append(o)

    def zero(m: nn.Module, a: tuple, o: torch.Tensor) -> None:
        o[:] = 0

    def noop(m: nn.Module, a: tuple, o: torch.Tensor) -> None:
        pass

    def hooked(module: nn.Module, x_in: torch.Tensor, pairs: Callable[[], list]) -> Callable[[], object]:
        """Register the (module, hook) pairs, run ``module``, remove them: what a hand-written hook pays per call."""

        def run() -> object:
            handles = [m.register_forward_hook(h) for m, h in pairs()]
            try:
                return module(x_in)
            finally:
                for handle in handles:
                    handle.remove()
                saved.clear()

        return run

    found = {
        "mlp raw forward": lambda: mlp(x),
        "mlp hand hooks x2": hooked(mlp, x, lambda: [(mlp.layer1, keep), (mlp.layer2, noop)]),
        "mlp hand hook zero": hooked(mlp, x, lambda: [(mlp.layer1, zero)]),
        "deep raw forward": lambda: deep(xd),
        "deep hand hooks save 1": hooked(deep, xd, lambda: [(deep.layers[0], keep)]),
        "deep hand hooks save 32": hooked(deep, xd, lambda: [(layer, keep) for layer in deep.layers]),
    }
    found.update(traced_cases("raysight", raysight.NNsight, mlp, x, deep, xd))
    try:
        from nnsight import NNsight
    except Exception:  # not installed, or fails to import: its rows are left out
        NNsight = None
    if NNsight is not None:
        found.update(traced_cases("nnsight", NNsight, mlp, x, deep, xd))
    return found


def traced_cases(name: str, wrap: Callable, mlp: Any, x: Any, deep: Any, xd: Any) -> dict[str, Callable[[], object]]:
    """The traced cases for raysight or nnsight, each on its own copy of the models. (Written so nnsight can run
    them too: it runs the body of a traced `with` itself and needs it to start on its own line.)"""
    m, d = wrap(copy.deepcopy(mlp)), wrap(copy.deepcopy(deep))

    def empty() -> None:
        with m.trace(x):
            pass

    def save1() -> object:
        with m.trace(x):
            h = m.layer1.output.save()
        return h

    def zero_read() -> object:
        with m.trace(x):
            m.layer1.output[:] = 0
            out = m.output.save()
        return out

    def save_k(k: int) -> Callable[[], object]:
        def run() -> object:
            outs = []
            with d.trace(xd):
                for i in range(k):
                    outs.append(d.layers[i].output.save())
            return outs

        return run

    return {f"mlp {name} empty trace": empty, f"mlp {name} save 1": save1, f"mlp {name} zero+read": zero_read,
            f"deep {name} save 1": save_k(1), f"deep {name} save 32": save_k(32)}  # fmt: skip


def worker(helper: str, n: int, keep_gc: bool, only: str = "") -> None:
    """Runs under callgrind: one dumped part per case (those whose name contains one of ``only``'s words)."""
    cg = ctypes.CDLL(helper)
    words = only.split(",") if only else []
    for name, fn in cases().items():
        if words and not any(w in name for w in words):
            continue
        for _ in range(30):
            fn()
        gc.collect()
        gc.freeze()
        if not keep_gc:
            gc.disable()
        cg.cg_zero()
        cg.cg_toggle()
        for _ in range(n):
            fn()
        cg.cg_toggle()
        cg.cg_dump(name.encode())
        gc.enable()


def count(n: int, keep_gc: bool, only: str = "", keep: str = "") -> dict[str, float]:
    for tool in ("valgrind", "gcc"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_icount needs {tool} on PATH (Debian: apt-get install valgrind gcc)")
    with tempfile.TemporaryDirectory() as tmp:
        helper = pathlib.Path(tmp, "cgctl.so")
        source = pathlib.Path(tmp, "cgctl.c")
        source.write_text(HELPER)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(helper), str(source)], check=True)
        out = pathlib.Path(tmp, "cg.out")
        cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out}", sys.executable,
               __file__, "--worker", str(helper), "--n", str(n), "--only", only]  # fmt: skip
        cmd += ["--gc"] if keep_gc else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"callgrind run failed:\n{done.stderr[-3000:]}")
        counts = {}
        for part in sorted(pathlib.Path(tmp).glob("cg.out.*"), key=lambda p: int(p.suffix[1:])):
            text = part.read_text(errors="replace")
            name = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.M)
            total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
            if name and total:
                counts[name.group(1)] = int(total.group(1)) / n
                if keep:  # for callgrind_annotate: one file per case, named after it
                    pathlib.Path(keep).mkdir(parents=True, exist_ok=True)
                    shutil.copy(part, pathlib.Path(keep, name.group(1).replace(" ", "_") + ".callgrind"))
        return counts


def report(counts: dict[str, float], n: int, keep_gc: bool) -> None:
    print(f"instructions per call (callgrind, {n} calls per case, cycle collector {'on' if keep_gc else 'off'})\n")
    print(f"{'case':34s} {'instr/call':>12s} {'added':>12s}")
    for name, value in counts.items():
        base = counts.get(name.split()[0] + " raw forward", 0.0)
        print(f"{name:34s} {value:12,.0f} {value - base:12,.0f}")
    g = counts.get

    def added(name: str) -> float:
        return g(name, 0.0) - g(name.split()[0] + " raw forward", 0.0)

    def marginal(impl: str) -> float:
        return (g(f"deep {impl} save 32", 0.0) - g(f"deep {impl} save 1", 0.0)) / 31

    print("\nratios")
    if "mlp nnsight save 1" in counts:
        print(f"  case 1  raysight added / nnsight added: empty {added('mlp raysight empty trace') / added('mlp nnsight empty trace'):.3f}, "  # noqa: E501
              f"save 1 {added('mlp raysight save 1') / added('mlp nnsight save 1'):.3f}")  # fmt: skip
        print(f"  case 4  raysight added / nnsight added, zero+read: "
              f"{added('mlp raysight zero+read') / added('mlp nnsight zero+read'):.3f}")  # fmt: skip
    if "deep hand hooks save 32" not in counts:  # (--only without the hooks)
        print(f"  case 2  marginal instructions per saved module: raysight {marginal('raysight'):,.0f}")
        return
    print(f"  case 1  raysight save 1 added / hand hooks x2 added: "
          f"{added('mlp raysight save 1') / added('mlp hand hooks x2'):.2f}")  # fmt: skip
    line = f"  case 2  marginal instructions per saved module: hand hooks {marginal('hand hooks'):,.0f}, " \
           f"raysight {marginal('raysight'):,.0f}"  # fmt: skip
    if "deep nnsight save 32" in counts:
        line += f", nnsight {marginal('nnsight'):,.0f}; raysight / nnsight {marginal('raysight') / marginal('nnsight'):.2f}"
    print(line + f"; raysight / hooks {marginal('raysight') / marginal('hand hooks'):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="calls counted per case")
    parser.add_argument("--gc", action="store_true", help="keep the cycle collector on while counting")
    parser.add_argument("--only", default="", help="count only the cases whose name contains one of these "
                        "comma-separated words (e.g. 'raysight,raw')")
    parser.add_argument("--keep", default="", help="copy each case's callgrind file into this folder "
                        "(read them with callgrind_annotate)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.n, args.gc, args.only)
        return
    os.environ.setdefault("PYTHONHASHSEED", "0")
    report(count(args.n, args.gc, args.only, args.keep), args.n, args.gc)


if __name__ == "__main__":
    main()
