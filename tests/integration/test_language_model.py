"""LanguageModel: lazy loading on the meta device, the accepted input forms, encoders through ``automodel``, and bad
input. Every expected value comes from plain ``transformers`` (or sentence-transformers) run on the same tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import raysight
from helpers import assert_no_hooks
from lm_helpers import LAYERS, _config, bert_tokenizer, encode, hf_module, oracle_blocks, oracle_forward, submodule

TEXT = "The Eiffel Tower is in the city of"
SHORT = "hello world"
ATOL = 1e-5


def _state_equal(module: torch.nn.Module, ref: torch.nn.Module, ignore: tuple[str, ...] = ()) -> None:
    """``module`` holds ``ref``'s weights (but for the entries under the prefixes ``ignore``: attached modules)."""
    mine, theirs = module.state_dict(), ref.state_dict()
    if ignore:
        mine = {k: v for k, v in mine.items() if not k.startswith(ignore)}
        theirs = {k: v for k, v in theirs.items() if not k.startswith(ignore)}
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert mine[key].device.type != "meta", key
        assert torch.equal(mine[key], value), key


def _logits(model: raysight.LanguageModel, *inputs, **kwargs) -> torch.Tensor:
    with model.trace(*inputs, **kwargs):
        logits = model.output.logits.save()
    return logits.value


# -- construction and loading ---------------------------------------------------------------------------------
def test_construction_builds_on_the_meta_device(gpt2_path):
    model = raysight.LanguageModel(str(gpt2_path))
    assert model.dispatched is False
    params = list(hf_module(model).parameters())
    assert params and all(p.device.type == "meta" for p in params)
    assert model.transformer.wte.weight.device.type == "meta"


def test_the_meta_model_is_in_eval_mode_as_from_pretrained_leaves_it(gpt2_path, gpt2_ref):
    """A remote run uses the client's training modes, so the shape on the meta device is in eval mode, as the model
    from_pretrained loads; a mode set before the weights are loaded holds after."""
    model = raysight.LanguageModel(str(gpt2_path))
    assert not gpt2_ref.training
    assert not any(m.training for m in hf_module(model).modules())
    hf_module(model).transformer.h[1].train()
    model.dispatch()
    assert hf_module(model).transformer.wte.weight.device.type == "cpu"
    trained = sorted(name for name, m in hf_module(model).named_modules() if m.training)
    assert trained == sorted(name for name, _ in gpt2_ref.transformer.h[1].named_modules(prefix="transformer.h.1"))


def test_printing_works_without_weights(gpt2_path, gpt2_ref):
    model = raysight.LanguageModel(str(gpt2_path))
    text = str(model)
    assert text == str(gpt2_ref)
    assert "GPT2Block" in text
    assert model.dispatched is False


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_first_local_trace_loads_the_weights(gpt2_path, gpt2_ref, lm_tokenizer):
    model = raysight.LanguageModel(str(gpt2_path))
    with model.trace(TEXT):
        logits = model.output.logits.save()
    assert model.dispatched is True
    _state_equal(hf_module(model), gpt2_ref)
    expected = oracle_forward(gpt2_ref, encode(gpt2_ref, lm_tokenizer, TEXT)).logits
    assert torch.allclose(logits.value, expected, atol=ATOL)


def test_envoy_taken_before_loading_reads_the_loaded_model(gpt2_path, gpt2_ref, lm_tokenizer):
    model = raysight.LanguageModel(str(gpt2_path))
    block = model.transformer.h[0]  # taken while the model is still on the meta device
    with model.trace(TEXT):
        hidden = block.output.save()
    expected, _ = oracle_blocks(gpt2_ref, "gpt2", encode(gpt2_ref, lm_tokenizer, TEXT))
    assert hidden.value.device.type == "cpu"
    assert torch.allclose(hidden.value, expected[0], atol=ATOL)


def test_module_attached_before_loading_runs_on_the_loaded_model(gpt2_path, gpt2_ref, lm_tokenizer):
    """nnsight 0.4's SAE tutorial on a model not loaded yet: ``block.sae = SAE()`` on the meta-device shape, an
    in-place edit calling it, then traces; loading the weights keeps the attachment and the envoys taken before."""
    model = raysight.LanguageModel(str(gpt2_path))
    block = model.transformer.h[0]
    torch.manual_seed(3)
    sae = torch.nn.Linear(gpt2_ref.config.n_embd, gpt2_ref.config.n_embd)
    block.sae = sae
    with model.edit(inplace=True):
        block.sae(block.output)  # hooked (an attached module called in an edit), so its value can be read later
    with model.trace(TEXT):
        code = block.sae.output.save()
        logits = model.output.logits.save()
    hidden, _ = oracle_blocks(gpt2_ref, "gpt2", encode(gpt2_ref, lm_tokenizer, TEXT))
    with torch.no_grad():
        assert torch.allclose(code.value, sae(hidden[0]), atol=ATOL)
    expected = oracle_forward(gpt2_ref, encode(gpt2_ref, lm_tokenizer, TEXT)).logits
    assert torch.allclose(logits.value, expected, atol=ATOL)  # the edit only reads: the model's output is its own


def test_an_edited_copy_made_before_loading_runs_its_edit_and_the_model_does_not(gpt2_path, gpt2_ref, lm_tokenizer):
    model = raysight.LanguageModel(str(gpt2_path))
    with model.edit() as edited:
        model.transformer.h[0].output[:] = 0
    hidden, _ = oracle_blocks(gpt2_ref, "gpt2", encode(gpt2_ref, lm_tokenizer, TEXT))
    for who, want in ((model, hidden[0]), (edited, torch.zeros_like(hidden[0])), (model, hidden[0])):
        with who.trace(TEXT):
            got = who.transformer.h[0].output.save()
        assert torch.allclose(got.value, want, atol=ATOL)


@pytest.mark.local_only  # inspects the client's own torch modules
def test_loading_keeps_envoys_and_attachments_and_shares_weights_with_earlier_copies(gpt2_path, gpt2_ref):
    model = raysight.LanguageModel(str(gpt2_path))
    block = model.transformer.h[0]
    block.extra = torch.nn.Linear(2, 2)
    torch.manual_seed(5)
    mine = torch.nn.Linear(gpt2_ref.config.n_embd, gpt2_ref.config.n_embd)
    model.transformer.h[1].attn.c_proj = mine  # replaces a module of the architecture: it stays after loading
    with model.edit() as edited:  # a copy made while the weights are not loaded
        model.transformer.h[0].output[:] = 0
    edited.dispatch()  # loading through the copy loads the model it was made from
    assert model.dispatched and edited.dispatched
    assert hf_module(edited) is hf_module(model)
    assert block._module is hf_module(model).transformer.h[0]
    assert hf_module(model).transformer.h[0].extra is block.extra._module
    assert torch.equal(block.attn.c_attn.weight, gpt2_ref.transformer.h[0].attn.c_attn.weight)
    assert hf_module(model).transformer.h[1].attn.c_proj is mine
    _state_equal(hf_module(model), gpt2_ref, ignore=("transformer.h.0.extra.", "transformer.h.1.attn.c_proj."))


def test_dispatch_true_loads_at_once(gpt2_path, gpt2_ref):
    model = raysight.LanguageModel(str(gpt2_path), dispatch=True)
    assert model.dispatched is True
    _state_equal(hf_module(model), gpt2_ref)
    assert model.transformer.wte.weight.device.type == "cpu"


def test_dispatch_method_loads_the_weights(gpt2_path, gpt2_ref):
    model = raysight.LanguageModel(str(gpt2_path))
    model.dispatch()
    assert model.dispatched is True
    _state_equal(hf_module(model), gpt2_ref)
    assert torch.equal(model.transformer.wte.weight, gpt2_ref.transformer.wte.weight)


def test_tokenizer_is_the_checkpoints_tokenizer_padding_left(gpt2, lm_tokenizer):
    tok = gpt2.tokenizer
    assert tok.get_vocab() == lm_tokenizer.get_vocab()
    assert tok(TEXT)["input_ids"] == lm_tokenizer(TEXT)["input_ids"]
    assert tok.padding_side == "left"
    assert tok.pad_token_id == lm_tokenizer.pad_token_id


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_config_is_the_checkpoints_config(arch, lm_paths):
    model = raysight.LanguageModel(str(lm_paths[arch]))
    expected = AutoConfig.from_pretrained(str(lm_paths[arch]))
    assert type(model.config) is type(expected)
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "bos_token_id", "eos_token_id", "pad_token_id"):  # fmt: skip
        assert getattr(model.config, key) == getattr(expected, key), key
    assert model.dispatched is False


def test_wrapping_a_transformers_module_with_a_tokenizer(gpt2_path, gpt2_ref, lm_tokenizer):
    module = AutoModelForCausalLM.from_pretrained(str(gpt2_path)).eval()
    tok = bert_tokenizer()
    model = raysight.LanguageModel(module, tokenizer=tok)
    assert model.dispatched is True
    assert model.tokenizer is tok
    assert hf_module(model) is module
    expected = oracle_forward(gpt2_ref, encode(gpt2_ref, lm_tokenizer, TEXT)).logits
    assert torch.allclose(_logits(model, TEXT), expected, atol=ATOL)


def test_wrapping_a_module_built_from_a_config_without_tokenizer_raises_valueerror(lm_tokenizer):
    # a module made with from_config has no checkpoint path to load a tokenizer from
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(_config("gpt2", lm_tokenizer))
    with pytest.raises(ValueError, match="tokenizer"):
        raysight.LanguageModel(module)


# -- an encoder through automodel="AutoModel" ------------------------------------------------------------------
SENTENCES = ["hello world", "The quick brown fox jumps over the lazy dog", "A sentence of medium length here"]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return raysight.LanguageModel(str(minilm_path), automodel="AutoModel")


@pytest.fixture(scope="module")
def st_embeddings(minilm_path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_path), device="cpu")
    # the pipeline is Transformer -> mean Pooling -> Normalize, so raysight's pooled states are L2-normalized too
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
    return st.encode(SENTENCES, convert_to_tensor=True).cpu()


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


def test_automodel_bert_mean_pooled_states_equal_sentence_transformers(minilm, st_embeddings):
    assert type(hf_module(minilm)).__name__ == "BertModel"
    with minilm.trace(SENTENCES):
        mask = minilm.inputs[1]["attention_mask"].save()
        hidden = minilm.output.last_hidden_state.save()
    pooled = _mean_pool(hidden.value.detach(), mask.value)
    assert torch.allclose(pooled, st_embeddings, atol=ATOL)


def test_automodel_bert_invokes_of_different_lengths_equal_sentence_transformers(minilm, st_embeddings):
    tok = bert_tokenizer()
    with minilm.trace() as tracer:
        states = []
        for sentence in SENTENCES:
            with tracer.invoke(sentence):
                states.append(minilm.encoder.output.last_hidden_state.save())
    for i, sentence in enumerate(SENTENCES):
        n = len(tok(sentence)["input_ids"])
        hidden = states[i].value.detach()
        # an encoder is padded on the right: the sentence's own tokens come first
        pooled = _mean_pool(hidden[:, :n], torch.ones(1, n))
        assert torch.allclose(pooled[0], st_embeddings[i], atol=ATOL), sentence


# -- accepted input forms ----------------------------------------------------------------------------------------
def test_string_input(gpt2, gpt2_ref, lm_tokenizer):
    expected = oracle_forward(gpt2_ref, encode(gpt2_ref, lm_tokenizer, TEXT)).logits
    assert torch.allclose(_logits(gpt2, TEXT), expected, atol=ATOL)


def test_list_of_strings_input_each_row_equals_its_prompt_alone(llama, llama_ref, lm_tokenizer):
    texts = [SHORT, TEXT]
    got = _logits(llama, texts)
    assert got.shape[0] == 2
    for row, text in enumerate(texts):
        expected = oracle_forward(llama_ref, encode(llama_ref, lm_tokenizer, text)).logits[0]
        n = expected.shape[0]
        assert torch.allclose(got[row, -n:], expected, atol=ATOL), text


def _ids(text: str) -> list[int]:
    return bert_tokenizer()(text)["input_ids"]


@pytest.mark.parametrize(
    "form",
    ["list", "1d_tensor", "2d_tensor"],
)
def test_token_ids_input(form, gpt2, gpt2_ref):
    ids = _ids(TEXT)
    given = {"list": ids, "1d_tensor": torch.tensor(ids), "2d_tensor": torch.tensor([ids])}[form]
    expected = oracle_forward(gpt2_ref, {"input_ids": torch.tensor([ids])}).logits
    assert torch.allclose(_logits(gpt2, given), expected, atol=ATOL)


def test_list_of_token_id_lists_of_equal_length(gpt2, gpt2_ref):
    rows = [_ids("hello world"), _ids("goodbye world")]
    assert len(rows[0]) == len(rows[1])
    expected = oracle_forward(gpt2_ref, {"input_ids": torch.tensor(rows)}).logits
    assert torch.allclose(_logits(gpt2, rows), expected, atol=ATOL)


def test_list_of_token_id_lists_of_different_lengths_is_padded(llama, llama_ref):
    rows = [_ids(SHORT), _ids(TEXT)]
    got = _logits(llama, rows)
    for i, ids in enumerate(rows):
        expected = oracle_forward(llama_ref, {"input_ids": torch.tensor([ids])}).logits[0]
        assert torch.allclose(got[i, -len(ids):], expected, atol=ATOL), i


@pytest.mark.parametrize("as_dict", [False, True], ids=["batch_encoding", "dict"])
def test_tokenizer_output_input(as_dict, gpt2, gpt2_ref, lm_tokenizer):
    enc = gpt2.tokenizer(TEXT, return_tensors="pt")
    given = dict(enc) if as_dict else enc
    expected = oracle_forward(gpt2_ref, encode(gpt2_ref, lm_tokenizer, TEXT)).logits
    assert torch.allclose(_logits(gpt2, given), expected, atol=ATOL)


def test_right_padded_batch_encoding_rows_equal_their_prompts_alone(llama, llama_ref, lm_tokenizer):
    texts = [SHORT, TEXT]
    right = bert_tokenizer()
    assert right.padding_side == "right"
    enc = right(texts, return_tensors="pt", padding=True)
    got = _logits(llama, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    for row, text in enumerate(texts):
        expected = oracle_forward(llama_ref, encode(llama_ref, lm_tokenizer, text)).logits[0]
        n = expected.shape[0]
        assert torch.allclose(got[row, :n], expected, atol=ATOL), text


def test_input_ids_keyword_in_an_invoke(gpt2, gpt2_ref):
    ids = torch.tensor([_ids(TEXT)])
    with gpt2.trace() as tracer:
        with tracer.invoke(input_ids=ids):
            logits = gpt2.output.logits.save()
    expected = oracle_forward(gpt2_ref, {"input_ids": ids}).logits
    assert torch.allclose(logits.value, expected, atol=ATOL)


@pytest.mark.parametrize("with_mask", [True, False])
def test_input_ids_and_attention_mask_as_trace_keywords(gpt2, gpt2_ref, lm_tokenizer, with_mask):
    """`model.trace(input_ids=..., attention_mask=...)`: the keywords are the input (no invoke needed)."""
    inputs = encode(gpt2_ref, lm_tokenizer, [TEXT, TEXT])
    inputs["attention_mask"][1, :2] = 0  # row 1 as if left-padded by two: the mask must reach the model
    given = inputs if with_mask else {"input_ids": inputs["input_ids"][:1, :4]}
    with gpt2.trace(**given):
        logits = gpt2.output.logits.save()
    mask = given.get("attention_mask", torch.ones_like(given["input_ids"]))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padded rows count positions from their first token
    expected = oracle_forward(gpt2_ref, {**given, "position_ids": positions}).logits
    assert torch.allclose(logits.value, expected, atol=ATOL)
    if with_mask:
        assert not torch.allclose(expected[0], expected[1], atol=ATOL)


def test_labels_give_the_oracle_loss(gpt2, gpt2_ref, lm_tokenizer):
    inputs = encode(gpt2_ref, lm_tokenizer, TEXT)
    with gpt2.trace() as tracer:
        with tracer.invoke(TEXT, labels=inputs["input_ids"]):
            loss = gpt2.output.loss.save()
    expected = oracle_forward(gpt2_ref, inputs, labels=inputs["input_ids"]).loss
    assert torch.allclose(loss.value, expected, atol=ATOL)


def test_tokenizer_options_per_invoke(gpt2, gpt2_ref, lm_tokenizer):
    with gpt2.trace() as tracer:
        with tracer.invoke(TEXT, max_length=4, truncation=True):
            short = gpt2.output.logits.save()
        with tracer.invoke(TEXT):
            full = gpt2.output.logits.save()
    truncated = encode(gpt2_ref, lm_tokenizer, TEXT, max_length=4, truncation=True)
    assert truncated["input_ids"].shape[1] == 4
    expected_short = oracle_forward(gpt2_ref, truncated).logits[0]
    expected_full = oracle_forward(gpt2_ref, encode(gpt2_ref, lm_tokenizer, TEXT)).logits[0]
    assert torch.allclose(short.value[0, -4:], expected_short, atol=ATOL)
    assert torch.allclose(full.value[0], expected_full, atol=ATOL)


def test_a_padding_option_of_an_invoke_replaces_the_default(gpt2, gpt2_ref, lm_tokenizer):
    """The tokenizer pads batches by default (padding=True); an invoke's own padding= is what it gets instead."""
    with gpt2.trace() as tracer:
        with tracer.invoke("hello", padding="max_length", max_length=8):
            padded = gpt2.output.logits.save()
    alone = encode(gpt2_ref, lm_tokenizer, "hello")
    n = alone["input_ids"].shape[1]
    assert padded.value.shape[1] == 8 > n
    # left padding (raysight's, for generation) whose real positions equal the prompt run alone
    assert gpt2.tokenizer.padding_side == "left"
    assert torch.allclose(padded.value[0, -n:], oracle_forward(gpt2_ref, alone).logits[0], atol=ATOL)


def test_invoker_args_of_trace_go_to_the_tokenizer(gpt2, gpt2_ref, lm_tokenizer):
    got = _logits(gpt2, TEXT, invoker_args={"max_length": 4, "truncation": True})
    expected = oracle_forward(gpt2_ref, encode(gpt2_ref, lm_tokenizer, TEXT, max_length=4, truncation=True)).logits
    assert torch.allclose(got, expected, atol=ATOL)


@pytest.mark.same_process
def test_several_invokes_of_different_lengths_run_one_forward(gpt2, gpt2_ref, lm_tokenizer, count_calls):
    texts = ["hello", TEXT, "a b c"]
    with count_calls(hf_module(gpt2), hf_module(gpt2).lm_head) as calls:
        with gpt2.trace() as tracer:
            saved = []
            for text in texts:
                with tracer.invoke(text):
                    saved.append(gpt2.output.logits.save())
    assert calls.counts == [1, 1]
    for text, logits in zip(texts, saved):
        expected = oracle_forward(gpt2_ref, encode(gpt2_ref, lm_tokenizer, text)).logits[0]
        n = expected.shape[0]
        assert torch.allclose(logits.value[0, -n:], expected, atol=ATOL), text


def test_invokes_of_different_input_forms_in_one_batch(llama, llama_ref, lm_tokenizer):
    ids = _ids(SHORT)
    with llama.trace() as tracer:
        with tracer.invoke(TEXT):
            from_text = llama.output.logits.save()
        with tracer.invoke(torch.tensor(ids)):
            from_ids = llama.output.logits.save()
    expected_text = oracle_forward(llama_ref, encode(llama_ref, lm_tokenizer, TEXT)).logits[0]
    expected_ids = oracle_forward(llama_ref, {"input_ids": torch.tensor([ids])}).logits[0]
    assert torch.allclose(from_text.value[0], expected_text, atol=ATOL)
    assert torch.allclose(from_ids.value[0, -len(ids):], expected_ids, atol=ATOL)


def test_block_outputs_are_what_the_blocks_return(llama, llama_ref, lm_tokenizer):
    with llama.trace(TEXT):
        hidden = [layer.output.save() for layer in submodule(llama, LAYERS["llama"])]
    expected, _ = oracle_blocks(llama_ref, "llama", encode(llama_ref, lm_tokenizer, TEXT))
    for got, want in zip(hidden, expected):
        assert type(got.value) is torch.Tensor
        assert torch.allclose(got.value, want, atol=ATOL)


# -- bad input ---------------------------------------------------------------------------------------------------
def test_a_directory_that_is_not_a_model_raises_valueerror_naming_it(tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(ValueError) as info:
        raysight.LanguageModel(str(empty))
    assert str(empty) in str(info.value)


@pytest.mark.parametrize("bad", [1.5, object(), None, b"bytes"], ids=["float", "object", "none", "bytes"])
def test_an_input_of_the_wrong_type_raises_typeerror_naming_accepted_types(bad, gpt2, count_calls):
    module = hf_module(gpt2)
    with count_calls(module) as calls:
        with pytest.raises(TypeError) as info:
            with gpt2.trace(bad):
                gpt2.output.save()
    message = str(info.value)
    assert type(bad).__name__ in message
    for accepted in ("string", "token ids", "dict"):
        assert accepted in message
    assert calls[0] == 0
    assert_no_hooks(module)


@pytest.mark.parametrize(
    "bad",
    [[1.5, 2.5], [101, "a"], ["a", 101], torch.tensor([101.0, 102.0])],
    ids=["list_of_floats", "int_then_str", "str_then_int", "float_tensor"],
)
def test_malformed_token_ids_raise_typeerror_before_running(bad, gpt2, count_calls):
    module = hf_module(gpt2)
    with count_calls(module) as calls:
        with pytest.raises(TypeError) as info:
            with gpt2.trace(bad):
                gpt2.output.save()
    assert "token ids" in str(info.value)
    assert calls[0] == 0
    assert_no_hooks(module)


def test_an_empty_list_is_rejected_before_running(gpt2, count_calls):
    module = hf_module(gpt2)
    with count_calls(module) as calls:
        with pytest.raises((TypeError, ValueError)):
            with gpt2.trace([]):
                gpt2.output.save()
    assert calls[0] == 0
    assert_no_hooks(module)


def test_a_dict_without_input_ids_raises_typeerror(gpt2):
    with pytest.raises(TypeError, match="input_ids"):
        with gpt2.trace({"attention_mask": torch.ones(1, 3, dtype=torch.long)}):
            gpt2.output.save()
    assert_no_hooks(hf_module(gpt2))


def test_three_dimensional_token_ids_raise_typeerror(gpt2):
    with pytest.raises(TypeError, match="1-D or 2-D"):
        with gpt2.trace(torch.zeros(1, 2, 3, dtype=torch.long)):
            gpt2.output.save()
    assert_no_hooks(hf_module(gpt2))


def test_scanning_a_model_on_the_meta_device_loads_no_weights(gpt2_path, gpt2_ref, lm_tokenizer):
    model = raysight.LanguageModel(str(gpt2_path))
    n = lm_tokenizer("hello world", return_tensors="pt")["input_ids"].shape[1]
    with model.scan("hello world"):
        shape = model.transformer.h[0].output.shape
    assert shape == (1, n, gpt2_ref.config.n_embd)
    assert not model.dispatched
    assert all(p.device.type == "meta" for p in model._module.parameters())


def test_generate_with_scan_and_validate_gives_shapes_while_tracing(gpt2_path, gpt2_ref, lm_tokenizer):
    model = raysight.LanguageModel(str(gpt2_path))
    n = lm_tokenizer("hello", return_tensors="pt")["input_ids"].shape[1]
    with model.generate("hello", max_new_tokens=2, scan=True, validate=True):
        seen = model.transformer.h[-1].output.shape
        last = model.transformer.h[-1].output[0].save()
    assert seen == (1, n, gpt2_ref.config.n_embd)
    inputs = {k: v for k, v in lm_tokenizer("hello", return_tensors="pt").items()}
    captured = {}
    handle = gpt2_ref.transformer.h[-1].register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
    try:
        with torch.no_grad():
            gpt2_ref(**inputs)
    finally:
        handle.remove()
    assert torch.allclose(last.value, captured["h"][0], atol=1e-5)
