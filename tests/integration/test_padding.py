"""Left padding: a prompt's activations and outputs inside a padded batch equal those of the prompt run alone through
plain transformers (compared at the prompt's own, last n, positions of its row)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import raysight
from lm_helpers import ARCHS, LAYERS, PROMPTS, bert_tokenizer, block_output, encode, oracle_blocks, oracle_forward, submodule

ATOL = 1e-5


def _alone(ref, arch, tok, text):
    """(block hidden states, logits) of ``text`` run alone through plain transformers, batch row 0."""
    blocks, out = oracle_blocks(ref, arch, encode(ref, tok, text))
    return [b[0] for b in blocks], out.logits[0]


def _traced(model, arch, texts):
    """One trace with one invoke per text; per invoke: ([block outputs], logits), all saved."""
    saved = []
    with model.trace() as tracer:
        for text in texts:
            with tracer.invoke(text):
                blocks = [layer.output.save() for layer in submodule(model, LAYERS[arch])]
                saved.append((blocks, model.output.logits.save()))
    return [([block_output(b.value)[0] for b in blocks], logits.value[0]) for blocks, logits in saved]


@pytest.mark.parametrize("arch", ARCHS)
def test_block_outputs_in_a_padded_batch_equal_the_prompt_alone(arch, lms, oracles, lm_tokenizer):
    model, ref = lms[arch], oracles[arch]
    lengths = {len(lm_tokenizer(t)["input_ids"]) for t in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # the rows really are padded
    for text, (blocks, _) in zip(PROMPTS, _traced(model, arch, PROMPTS)):
        expected, _ = _alone(ref, arch, lm_tokenizer, text)
        assert len(blocks) == len(expected) == 2
        for i, (got, want) in enumerate(zip(blocks, expected)):
            n = want.shape[0]
            assert got.shape[0] == max(lengths)
            assert torch.allclose(got[-n:], want, atol=ATOL), f"{text!r} layer {i}: {(got[-n:] - want).abs().max()}"


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_in_a_padded_batch_equal_the_prompt_alone(arch, lms, oracles, lm_tokenizer):
    model, ref = lms[arch], oracles[arch]
    for text, (_, logits) in zip(PROMPTS, _traced(model, arch, PROMPTS)):
        _, expected = _alone(ref, arch, lm_tokenizer, text)
        n = expected.shape[0]
        assert torch.allclose(logits[-n:], expected, atol=ATOL), f"{text!r}: {(logits[-n:] - expected).abs().max()}"


@pytest.mark.parametrize("arch", ARCHS)
def test_a_list_of_strings_in_one_invoke_equals_each_prompt_alone(arch, lms, oracles, lm_tokenizer):
    model, ref = lms[arch], oracles[arch]
    texts = list(PROMPTS)
    with model.trace(texts):
        head = model.lm_head.output.save()
    for row, text in enumerate(texts):
        _, expected = _alone(ref, arch, lm_tokenizer, text)
        n = expected.shape[0]
        assert torch.allclose(head.value[row, -n:], expected, atol=ATOL), text


def test_the_batch_is_padded_on_the_left_with_the_pad_token(gpt2, lm_tokenizer):
    short, long = "hello", PROMPTS[0]
    with gpt2.trace() as tracer:
        with tracer.invoke(short):
            pass
        with tracer.invoke(long):
            pass
        inputs = gpt2.inputs.save()
    kwargs = inputs.value[1]
    ids_short, ids_long = lm_tokenizer(short)["input_ids"], lm_tokenizer(long)["input_ids"]
    missing = len(ids_long) - len(ids_short)
    expected_ids = torch.tensor([[lm_tokenizer.pad_token_id] * missing + ids_short, ids_long])
    expected_mask = torch.tensor([[0] * missing + [1] * len(ids_short), [1] * len(ids_long)])
    assert torch.equal(kwargs["input_ids"].cpu(), expected_ids)
    assert torch.equal(kwargs["attention_mask"].cpu(), expected_mask)


def test_labels_of_several_invokes_ignore_the_padding(gpt2, gpt2_ref, lm_tokenizer):
    texts = ["hello", PROMPTS[0]]
    with gpt2.trace() as tracer:
        for text in texts:
            ids = lm_tokenizer(text, return_tensors="pt")["input_ids"]
            with tracer.invoke(text, labels=ids):
                pass
        loss = gpt2.output.loss.save()
    # the mean token loss over both prompts, each computed alone: padding must add no term. (Padding the labels
    # with -100 alone is not enough: the logits at the last pad position then "predict" the row's first real token.)
    total, count = 0.0, 0
    for text in texts:
        inputs = encode(gpt2_ref, lm_tokenizer, text)
        logits = oracle_forward(gpt2_ref, inputs).logits[0]
        targets = inputs["input_ids"][0]
        total += F.cross_entropy(logits[:-1], targets[1:], reduction="sum")
        count += targets.shape[0] - 1
    assert torch.allclose(loss.value, total / count, atol=ATOL)


def test_an_edit_in_one_invoke_leaves_the_other_padded_invoke_unchanged(gpt2, gpt2_ref, lm_tokenizer):
    short, long = "hello", PROMPTS[0]
    with gpt2.trace() as tracer:
        with tracer.invoke(short):
            gpt2.transformer.h[0].output[:] = 0
            edited = gpt2.output.logits.save()
        with tracer.invoke(long):
            untouched = gpt2.output.logits.save()
    _, expected_long = _alone(gpt2_ref, "gpt2", lm_tokenizer, long)
    assert torch.allclose(untouched.value[0], expected_long, atol=ATOL)
    handle = gpt2_ref.transformer.h[0].register_forward_hook(lambda m, a, out: torch.zeros_like(block_output(out)))
    try:
        expected_short = oracle_forward(gpt2_ref, encode(gpt2_ref, lm_tokenizer, short)).logits[0]
    finally:
        handle.remove()
    n = expected_short.shape[0]
    assert torch.allclose(edited.value[0, -n:], expected_short, atol=ATOL)


# -- a tokenizer without a pad token ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_pad_path(lm_paths, tmp_path_factory):
    """The Llama checkpoint saved with a tokenizer that has an eos token ([SEP]) but no pad token."""
    directory = tmp_path_factory.mktemp("no_pad")
    AutoModelForCausalLM.from_pretrained(str(lm_paths["llama"])).save_pretrained(str(directory))
    tok = bert_tokenizer()
    tok.pad_token = None
    tok.eos_token = "[SEP]"
    tok.save_pretrained(str(directory))
    reloaded = AutoTokenizer.from_pretrained(str(directory))
    assert reloaded.pad_token is None and reloaded.eos_token == "[SEP]"
    return directory


def test_a_tokenizer_without_pad_token_pads_with_eos(no_pad_path):
    model = raysight.LanguageModel(str(no_pad_path))
    eos = AutoTokenizer.from_pretrained(str(no_pad_path)).eos_token
    assert model.tokenizer.pad_token == eos
    assert model.tokenizer.pad_token_id == model.tokenizer.convert_tokens_to_ids(eos)


def test_a_tokenizer_without_pad_token_still_batches_invokes(no_pad_path, llama_ref):
    model = raysight.LanguageModel(str(no_pad_path))
    tok = AutoTokenizer.from_pretrained(str(no_pad_path))
    texts = ["hello", PROMPTS[0]]
    with model.trace() as tracer:
        saved = []
        for text in texts:
            with tracer.invoke(text):
                saved.append(model.output.logits.save())
        ids = model.inputs[1]["input_ids"].save()
    short = tok("hello")["input_ids"]
    assert ids.value[0, : ids.shape[1] - len(short)].tolist() == [tok.eos_token_id] * (ids.shape[1] - len(short))
    for text, logits in zip(texts, saved):
        inputs = {"input_ids": tok(text, return_tensors="pt")["input_ids"]}
        expected = oracle_forward(llama_ref, inputs).logits[0]
        n = expected.shape[0]
        assert torch.allclose(logits.value[0, -n:], expected, atol=ATOL), text
