"""Overhead of raysight's tracing next to plain PyTorch hooks and nnsight, on one CPU thread.

    .venv/bin/python bench/bench_trace.py            # full run, about 2.5 minutes on 2 cores
    .venv/bin/python bench/bench_trace.py --quick    # about 20 s, smaller GPT-shaped input, fewer blocks
    .venv/bin/python bench/bench_trace.py --json results.json

Method: every implementation of a case runs in the same process, interleaved block by block (block b runs impl A,
then B, then C, rotating the order each block), so slow drift of the machine hits all of them alike. A block is
many calls (calibrated to ``--block-ms``); its per-call time is one sample. The table reports the median and the
inter-quartile range (Q3 - Q1) of the block samples in microseconds. Each implementation is warmed up, and its
result checked against the plain-PyTorch version, before timing. Every model is a separate copy with the same
weights: nnsight 0.8 replaces ``forward`` of the modules it wraps, which would otherwise slow the raw forward.

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)

import nnsight  # noqa: E402
from nnsight import NNsight as NNsightNN  # noqa: E402

import raysight  # noqa: E402

perf_ns = time.perf_counter_ns


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(5, 10)
        self.layer2 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(x))


class Deep(nn.Module):
    """32 x Linear(8, 8) in sequence."""

    def __init__(self, n: int = 32, width: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        shape = (b, t, self.heads, c // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Like(nn.Module):
    """GPT-2 small's shape (12 blocks, width 768, 12 heads) on hidden states: no embedding, random weights."""

    def __init__(self, layers: int = 12, d: int = 768, heads: int = 12) -> None:
        super().__init__()
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


def three_copies(module: nn.Module) -> tuple[nn.Module, Any, Any]:
    """The module for raw/hook runs, an nnsight wrapper and a raysight wrapper, each on its own copy."""
    return module, NNsightNN(copy.deepcopy(module)), raysight.NNsight(copy.deepcopy(module))


def val(x: Any) -> Any:
    """A saved value: raysight proxies hold it in ``.value``; nnsight 0.8 saves the tensor itself."""
    return x.value if isinstance(x, raysight.Proxy) else x


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    case: str
    impl: str
    median_us: float
    iqr_us: float
    q1_us: float
    q3_us: float
    added_us: Optional[float] = None  # over the raw forward
    ratio: Optional[float] = None  # over the case's baseline
    paired_ratio: Optional[float] = None  # median over blocks of (this block / the baseline's block of that round)
    baseline: str = ""
    calls_per_block: int = 0
    blocks: int = 0
    samples_us: list = field(default_factory=list)


def _stats(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    q1, med, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return med, q1, q3


def _calibrate(fn: Callable[[], Any], block_ns: float) -> int:
    n = 1
    while True:
        t0 = perf_ns()
        for _ in range(n):
            fn()
        dt = perf_ns() - t0
        if dt >= block_ns / 4 or n >= 1 << 20:
            return max(1, round(n * block_ns / max(dt, 1)))
        n *= 2


def measure(
    impls: dict[str, Callable[[], Any]],
    *,
    blocks: int,
    block_ms: float,
    warmup_ms: float,
    fixed_calls: Optional[int] = None,
) -> dict[str, tuple[list[float], int]]:
    """Per-call µs of each block for each impl, blocks interleaved across impls in a rotating order."""
    block_ns = block_ms * 1e6
    calls: dict[str, int] = {}
    for name, fn in impls.items():
        t_end = perf_ns() + warmup_ms * 1e6
        fn()
        while perf_ns() < t_end:
            fn()
        calls[name] = fixed_calls or _calibrate(fn, block_ns)
    gc.collect()
    samples: dict[str, list[float]] = {name: [] for name in impls}
    order = list(impls)
    for b in range(blocks):
        k = b % len(order)
        for name in order[k:] + order[:k]:
            fn, n = impls[name], calls[name]
            t0 = perf_ns()
            for _ in range(n):
                fn()
            samples[name].append((perf_ns() - t0) / n / 1e3)
    return {name: (samples[name], calls[name]) for name in impls}


def rows_for(
    case: str,
    results: dict[str, tuple[list[float], int]],
    raw: Optional[str],
    baseline: Optional[str],
    *,
    raw_us: Optional[float] = None,
) -> list[Row]:
    out = []
    meds = {name: _stats(s)[0] for name, (s, _) in results.items()}
    if raw is not None:
        raw_us = meds[raw]
    base_us = meds[baseline] if baseline is not None else None
    base_s = results[baseline][0] if baseline is not None else None
    for name, (s, n) in results.items():
        med, q1, q3 = _stats(s)
        out.append(
            Row(
                case=case, impl=name, median_us=med, iqr_us=q3 - q1, q1_us=q1, q3_us=q3,
                added_us=(med - raw_us) if raw_us is not None else None,
                ratio=(med / base_us) if base_us else None, baseline=baseline or "",
                paired_ratio=statistics.median(a / b for a, b in zip(s, base_s)) if base_s else None,
                calls_per_block=n, blocks=len(s), samples_us=[round(v, 3) for v in s],
            )
        )  # fmt: skip
    return out


def check(name: str, got: Any, want: torch.Tensor) -> None:
    got = val(got)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.allclose(got, want, atol=1e-5):
        raise AssertionError(f"{name}: result differs from plain PyTorch ({got!r} vs {want!r})")


# ---------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------
def case1(cfg: argparse.Namespace) -> tuple[list[Row], dict]:
    torch.manual_seed(0)
    m, nm, rm = three_copies(TwoLayer())
    x = torch.randn(1, 5)

    def raw():
        return m(x)

    def hooks():
        store = {}

        def save(mod, args, out):
            store["h"] = out

        def noop(mod, args, out):
            return None

        h1 = m.layer1.register_forward_hook(save)
        h2 = m.layer2.register_forward_hook(noop)
        m(x)
        h1.remove()
        h2.remove()
        return store["h"]

    def nn_empty():
        with nm.trace(x):
            pass

    def nn_one():
        with nm.trace(x):
            h = nm.layer1.output.save()
        return h

    def rs_empty():
        with rm.trace(x):
            pass

    def rs_one():
        with rm.trace(x):
            h = rm.layer1.output.save()
        return h

    want = m.layer1(x)
    for name, fn in (("hooks", hooks), ("nnsight", nn_one), ("raysight", rs_one)):
        check(f"case 1 {name}", fn(), want)

    impls = {
        "raw forward": raw,
        "hand hooks x2 (reg+remove)": hooks,
        "nnsight empty trace": nn_empty,
        "nnsight save 1 output": nn_one,
        "raysight empty trace": rs_empty,
        "raysight save 1 output": rs_one,
    }
    res = measure(impls, blocks=cfg.blocks, block_ms=cfg.block_ms, warmup_ms=cfg.warmup_ms)
    rows = rows_for("1 two-layer MLP", res, "raw forward", "raw forward")
    by = {r.impl: r for r in rows}
    extra = {
        "raysight_added_over_nnsight_added_empty": by["raysight empty trace"].added_us
        / by["nnsight empty trace"].added_us,
        "raysight_added_over_nnsight_added_save1": by["raysight save 1 output"].added_us
        / by["nnsight save 1 output"].added_us,
        "raysight_added_save1_us": by["raysight save 1 output"].added_us,
        "raysight_added_empty_us": by["raysight empty trace"].added_us,
        "hooks_added_us": by["hand hooks x2 (reg+remove)"].added_us,
    }
    return rows, extra


def case2(cfg: argparse.Namespace) -> tuple[list[Row], dict]:
    torch.manual_seed(0)
    m, nm, rm = three_copies(Deep())
    x = torch.randn(1, 8)

    def raw():
        return m(x)

    def hooks(k):
        def fn():
            store = []
            handles = [m.layers[i].register_forward_hook(lambda mod, a, out: store.append(out)) for i in range(k)]
            m(x)
            for handle in handles:
                handle.remove()
            return store

        return fn

    def nn_k(k):
        def fn():
            outs = []
            with nm.trace(x):
                for i in range(k):
                    outs.append(nm.layers[i].output.save())
            return outs

        return fn

    def rs_k(k):
        def fn():
            outs = []
            with rm.trace(x):
                for i in range(k):
                    outs.append(rm.layers[i].output.save())
            return outs

        return fn

    wants = []
    h = x
    for layer in m.layers:
        h = layer(h)
        wants.append(h)
    for name, make in (("hooks", hooks), ("nnsight", nn_k), ("raysight", rs_k)):
        got = make(32)()
        assert len(got) == 32, name
        for i, (g, w) in enumerate(zip(got, wants)):
            check(f"case 2 {name} layer {i}", g, w)

    impls = {"raw forward": raw}
    for label, make in (("hand hooks", hooks), ("nnsight", nn_k), ("raysight", rs_k)):
        for k in (1, 32):
            impls[f"{label} save {k}"] = make(k)
    res = measure(impls, blocks=cfg.blocks, block_ms=cfg.block_ms, warmup_ms=cfg.warmup_ms)
    rows = rows_for("2 32 x Linear(8,8)", res, "raw forward", "raw forward")
    by = {r.impl: r for r in rows}
    extra = {}
    for label in ("hand hooks", "nnsight", "raysight"):
        extra[f"marginal_us_{label.replace(' ', '_')}"] = (
            by[f"{label} save 32"].median_us - by[f"{label} save 1"].median_us
        ) / 31
    return rows, extra


def gpt_setup(cfg: argparse.Namespace):
    torch.manual_seed(0)
    model = GPT2Like().eval()
    m, nm, rm = three_copies(model)
    x = torch.randn(*cfg.gpt_shape, 768)
    return m, nm, rm, x


def case3(cfg: argparse.Namespace, gpt) -> tuple[list[Row], dict]:
    m, nm, rm, x = gpt
    n = len(m.h)

    def raw():
        return m(x)

    def nn_all():
        outs = []
        with nm.trace(x):
            for i in range(n):
                outs.append(nm.h[i].output.save())
        return outs

    def rs_all():
        outs = []
        with rm.trace(x):
            for i in range(n):
                outs.append(rm.h[i].output.save())
        return outs

    with torch.no_grad():
        wants, h = [], x
        for block in m.h:
            h = block(h)
            wants.append(h)
        for name, fn in (("nnsight", nn_all), ("raysight", rs_all)):
            got = fn()
            for i, (g, w) in enumerate(zip(got, wants)):
                check(f"case 3 {name} block {i}", g, w)
        del wants, h, got
        impls = {"raw forward": raw, f"nnsight save {n} blocks": nn_all, f"raysight save {n} blocks": rs_all}
        res = measure(impls, blocks=cfg.gpt_reps, block_ms=0, warmup_ms=0, fixed_calls=1)
    rows = rows_for(f"3 GPT-2 {tuple(x.shape)}", res, "raw forward", "raw forward")
    by = {r.impl: r for r in rows}
    return rows, {
        "raysight_paired_ratio_to_raw": by[f"raysight save {n} blocks"].paired_ratio,
        "nnsight_paired_ratio_to_raw": by[f"nnsight save {n} blocks"].paired_ratio,
        "raysight_ratio_to_raw": by[f"raysight save {n} blocks"].ratio,
        "nnsight_ratio_to_raw": by[f"nnsight save {n} blocks"].ratio,
        "raw_us": by["raw forward"].median_us,
    }


def case4(cfg: argparse.Namespace, gpt) -> tuple[list[Row], dict]:
    rows: list[Row] = []
    extra: dict = {}

    # -- two-layer MLP --------------------------------------------------------------------------------------
    torch.manual_seed(0)
    m, nm, rm = three_copies(TwoLayer())
    x = torch.randn(1, 5)

    def raw():
        return m(x)

    def zero(mod, args, out):
        out[:] = 0

    def hook():
        handle = m.layer1.register_forward_hook(zero)
        out = m(x)
        handle.remove()
        return out

    def nn_zero():
        with nm.trace(x):
            nm.layer1.output[:] = 0
            out = nm.output.save()
        return out

    def rs_zero():
        with rm.trace(x):
            rm.layer1.output[:] = 0
            out = rm.output.save()
        return out

    want = m.layer2(torch.zeros(1, 10))
    for name, fn in (("hook", hook), ("nnsight", nn_zero), ("raysight", rs_zero)):
        check(f"case 4 {name}", fn(), want)
    impls = {"raw forward": raw, "hand hook zero (reg+remove)": hook, "nnsight zero+read": nn_zero,
             "raysight zero+read": rs_zero}  # fmt: skip
    res = measure(impls, blocks=cfg.blocks, block_ms=cfg.block_ms, warmup_ms=cfg.warmup_ms)
    small = rows_for("4 zero layer1, two-layer", res, "raw forward", "hand hook zero (reg+remove)")
    rows += small
    by = {r.impl: r for r in small}
    extra["mlp_raysight_over_hook"] = by["raysight zero+read"].ratio
    extra["mlp_nnsight_over_hook"] = by["nnsight zero+read"].ratio
    extra["mlp_raysight_added_over_hook_us"] = by["raysight zero+read"].median_us - by[
        "hand hook zero (reg+remove)"].median_us  # fmt: skip

    # -- GPT-2-shaped ---------------------------------------------------------------------------------------
    if gpt is None:
        return rows, extra
    m, nm, rm, x = gpt

    def gzero(mod, args, out):
        out.zero_()

    def ghook():
        handle = m.h[5].register_forward_hook(gzero)
        out = m(x)
        handle.remove()
        return out

    def g_rs():
        with rm.trace(x):
            rm.h[5].output[:] = 0
            out = rm.output.save()
        return out

    def g_nn():
        with nm.trace(x):
            nm.h[5].output[:] = 0
            out = nm.output.save()
        return out

    with torch.no_grad():
        want = ghook()
        h = torch.zeros_like(x)
        for block in m.h[6:]:
            h = block(h)
        check("case 4 gpt hook", want, m.ln_f(h))
        check("case 4 gpt raysight", g_rs(), want)
        impls = {"raw forward": lambda: m(x), "hand hook zero h[5] (reg+remove)": ghook,
                 "raysight zero h[5]+read": g_rs}  # fmt: skip
        if cfg.gpt_nnsight_zero:
            check("case 4 gpt nnsight", g_nn(), want)
            impls["nnsight zero h[5]+read"] = g_nn
        res = measure(impls, blocks=cfg.gpt_reps, block_ms=0, warmup_ms=0, fixed_calls=1)
    big = rows_for(f"4 zero h[5], GPT-2 {tuple(x.shape)}", res, "raw forward", "hand hook zero h[5] (reg+remove)")
    rows += big
    by = {r.impl: r for r in big}
    extra["gpt_raysight_over_hook"] = by["raysight zero h[5]+read"].ratio
    extra["gpt_raysight_over_hook_paired"] = by["raysight zero h[5]+read"].paired_ratio
    return rows, extra


def print_targets(targets: list, t_start: float, load: float, digits: int) -> tuple[list[dict], float, float]:
    """Print each (label, value, limit, unit) as PASS/MISS and the run's duration and load; return the verdicts,
    the elapsed seconds and the load average at the end."""
    print()
    print("targets:")
    verdicts = []
    for label, value, limit, unit in targets:
        ok = value <= limit
        verdicts.append({"target": label, "value": value, "limit": limit, "unit": unit, "pass": ok})
        print(f"  {'PASS' if ok else 'MISS'}  {label:<56} measured {value:.{digits}f} {unit}")
    elapsed = time.perf_counter() - t_start
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print(f"\ntotal {elapsed:.0f} s; load average at start {load:.2f}, at end {load_end:.2f} (this run adds ~1)")
    return verdicts, elapsed, load_end


def raysight_revision() -> str:
    """The git commit raysight was imported from, with "+dirty" when its files differ from that commit."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(raysight.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "raysight"], capture_output=True,
                               text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, not current: a fallback only


def case5(cfg: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    rm = raysight.NNsight(TwoLayer())
    x = torch.randn(1, 5)
    n = cfg.mem_traces

    def empty():
        with rm.trace(x):
            pass

    def save_one():
        with rm.trace(x):
            h = rm.layer1.output.save()
        return h

    out = {"traces": n}
    for label, fn in (("empty", empty), ("save1", save_one)):
        for _ in range(1000):
            fn()
        gc.collect()
        objs0, rss0 = len(gc.get_objects()), rss_bytes()
        t0 = perf_ns()
        for _ in range(n):
            fn()
        dt = perf_ns() - t0
        gc.collect()
        objs1, rss1 = len(gc.get_objects()), rss_bytes()

        gc.collect()
        gc.disable()  # count what only the cycle collector can free: the garbage cycles each trace leaves
        try:
            for _ in range(1000):
                fn()
            cyclic = gc.collect()
        finally:
            gc.enable()

        tracemalloc.start()
        for _ in range(200):
            fn()
        gc.collect()
        cur0, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(n):
            fn()
        gc.collect()
        cur1, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[label] = {
            "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20, "rss_growth_kb": (rss1 - rss0) / 1024,
            "gc_objects_growth": objs1 - objs0, "cyclic_garbage_objects_per_trace": cyclic / 1000,
            "tracemalloc_growth_kb": (cur1 - cur0) / 1024, "tracemalloc_peak_over_start_kb": (peak - cur0) / 1024,
            "us_per_trace_untraced": dt / n / 1e3,
        }  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def fmt(v: Optional[float], spec: str = "10.2f") -> str:
    return format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0].lstrip("+"))


def print_table(rows: list[Row]) -> None:
    head = f"{'case':<32} {'impl':<34} {'median µs':>11} {'IQR µs':>9} {'added µs':>10} {'ratio':>7}  baseline"
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and r.case != last:
            print()
        case = r.case if r.case != last else ""
        last = r.case
        print(f"{case:<32} {r.impl:<34} {r.median_us:>11.1f} {r.iqr_us:>9.1f} {fmt(r.added_us, '10.1f')} "
              f"{fmt(r.ratio, '7.3f')}  {r.baseline if r.ratio is not None else ''}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~20 s: fewer blocks, a (2, 64) GPT-shaped input")
    ap.add_argument("--json", metavar="PATH", help="write all results (with raw block samples) to PATH")
    ap.add_argument("--cases", default="1,2,3,4,5", help="comma-separated subset of 1..5 (default: all)")
    cfg = ap.parse_args()
    cases = {int(c) for c in cfg.cases.split(",") if c.strip()}
    if cfg.quick:
        cfg.blocks, cfg.block_ms, cfg.warmup_ms = 11, 8.0, 60.0
        cfg.gpt_shape, cfg.gpt_reps, cfg.mem_traces = (2, 64), 5, 3000
        cfg.gpt_nnsight_zero = True
    else:
        cfg.blocks, cfg.block_ms, cfg.warmup_ms = 31, 25.0, 200.0
        cfg.gpt_shape, cfg.gpt_reps, cfg.mem_traces = (8, 128), 15, 10_000
        cfg.gpt_nnsight_zero = False  # one more 1 s forward x 15: left out to keep the run under ~3 minutes

    t_start = time.perf_counter()
    revision = raysight_revision()
    print(f"raysight {raysight.__version__} ({revision}) | nnsight {nnsight.__version__} | torch {torch.__version__} | "
          f"python {platform.python_version()} | threads {torch.get_num_threads()} | "
          f"{platform.processor() or platform.machine()} x{os.cpu_count()} | {'quick' if cfg.quick else 'full'}")  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        print(f"WARNING: load average {load:.2f} before start: other processes compete for the CPU, timings are noisy")
    print(f"small cases: {cfg.blocks} interleaved blocks of ~{cfg.block_ms:g} ms per impl; GPT cases: "
          f"{cfg.gpt_reps} interleaved single forwards per impl, input {cfg.gpt_shape + (768,)}, torch.no_grad()")
    print()

    rows: list[Row] = []
    extra: dict[str, Any] = {}

    def run(n, label, fn, *a):
        if n not in cases:
            return None
        t = time.perf_counter()
        print(f"running case {label} ...", end="", flush=True)
        result = fn(*a)
        print(f" {time.perf_counter() - t:.1f} s", flush=True)
        return result

    for n, fn in ((1, case1), (2, case2)):
        got = run(n, str(n), fn, cfg)
        if got:
            rows += got[0]
            extra[f"case{n}"] = got[1]
    gpt = gpt_setup(cfg) if cases & {3, 4} else None
    got = run(3, "3", case3, cfg, gpt)
    if got:
        rows += got[0]
        extra["case3"] = got[1]
    got = run(4, "4", case4, cfg, gpt if 4 in cases else None)
    if got:
        rows += got[0]
        extra["case4"] = got[1]
    del gpt
    mem = run(5, "5", case5, cfg)

    print_table(rows)
    print()

    print("comparisons:")
    c1, c2, c3, c4 = (extra.get(f"case{i}") for i in (1, 2, 3, 4))
    if c1:
        print(f"  case 1  added over raw: hooks {c1['hooks_added_us']:.1f} µs, raysight empty "
              f"{c1['raysight_added_empty_us']:.1f} µs, raysight save 1 {c1['raysight_added_save1_us']:.1f} µs")
        print(f"  case 1  raysight_added / nnsight_added: empty trace {c1['raysight_added_over_nnsight_added_empty']:.3f},"
              f" save 1 output {c1['raysight_added_over_nnsight_added_save1']:.3f}")  # fmt: skip
    if c2:
        print(f"  case 2  marginal µs per extra saved module, (t32 - t1) / 31: hand hooks "
              f"{c2['marginal_us_hand_hooks']:.2f}, nnsight {c2['marginal_us_nnsight']:.2f}, raysight "
              f"{c2['marginal_us_raysight']:.2f}")
    if c3:
        print(f"  case 3  ratio to raw forward: raysight {c3['raysight_ratio_to_raw']:.4f}, nnsight "
              f"{c3['nnsight_ratio_to_raw']:.4f} (paired per round: raysight {c3['raysight_paired_ratio_to_raw']:.4f}, "
              f"nnsight {c3['nnsight_paired_ratio_to_raw']:.4f})")
    if c4:
        line = f"  case 4  raysight / hand hook: two-layer {c4['mlp_raysight_over_hook']:.2f}x " \
               f"(+{c4['mlp_raysight_added_over_hook_us']:.1f} µs; nnsight {c4['mlp_nnsight_over_hook']:.2f}x)"
        if "gpt_raysight_over_hook" in c4:
            line += f", GPT-2-shaped {c4['gpt_raysight_over_hook']:.4f}x (paired {c4['gpt_raysight_over_hook_paired']:.4f}x)"
        print(line)
    if mem:
        print(f"  case 5  memory over {mem['traces']} raysight traces (after 1000 warm-up traces):")
        for label in ("empty", "save1"):
            d = mem[label]
            print(f"          {label:<6} RSS {d['rss_before_mb']:.1f} -> {d['rss_after_mb']:.1f} MiB "
                  f"({d['rss_growth_kb']:+.0f} KiB), gc objects {d['gc_objects_growth']:+d}, tracemalloc current "
                  f"{d['tracemalloc_growth_kb']:+.1f} KiB, peak {d['tracemalloc_peak_over_start_kb']:.1f} KiB over "
                  f"start, {d['cyclic_garbage_objects_per_trace']:.0f} objects/trace left to the cycle collector, "
                  f"{d['us_per_trace_untraced']:.1f} µs/trace")  # fmt: skip

    targets = []
    if c1:
        targets.append(("case 1 raysight save-1 added over raw <= 30 µs", c1["raysight_added_save1_us"], 30.0, "µs"))
    if c2:
        targets.append(("case 2 raysight marginal per saved module <= 4 µs", c2["marginal_us_raysight"], 4.0, "µs"))
    if c3:
        targets.append(("case 3 raysight save-all / raw <= 1.01x", c3["raysight_ratio_to_raw"], 1.01, "x"))
    if mem:
        targets.append(("case 5 tracemalloc growth over the loop ~0 (<= 64 KiB)",
                        max(mem["empty"]["tracemalloc_growth_kb"], mem["save1"]["tracemalloc_growth_kb"]), 64.0,
                        "KiB"))  # fmt: skip
        targets.append(("case 5 RSS growth over the loop ~0 (<= 1024 KiB)",
                        max(mem["empty"]["rss_growth_kb"], mem["save1"]["rss_growth_kb"]), 1024.0, "KiB"))
    verdicts, elapsed, load_end = print_targets(targets, t_start, load, digits=3)

    if cfg.json:
        doc = {
            "meta": {"raysight": raysight.__version__, "raysight_revision": revision, "nnsight": nnsight.__version__, "torch": torch.__version__,
                     "python": platform.python_version(), "cpus": os.cpu_count(), "threads": 1, "quick": cfg.quick,
                     "blocks": cfg.blocks, "block_ms": cfg.block_ms, "gpt_shape": list(cfg.gpt_shape) + [768],
                     "gpt_reps": cfg.gpt_reps, "elapsed_s": elapsed, "loadavg_start": load, "loadavg_end": load_end},
            "rows": [asdict(r) for r in rows], "comparisons": extra, "memory": mem, "targets": verdicts,
        }  # fmt: skip
        with open(cfg.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {cfg.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
