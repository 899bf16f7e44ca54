"""``model.generate(...)`` interleaved with HF ``generate``: generated ids, per-step module values (``.next()``,
``.all()``), several invokes, the streamer hook point, and bad arguments. The oracle is plain greedy HF ``generate``
on the same checkpoint (min_new_tokens = max_new_tokens on both sides so that an early eos cannot end either)."""

from __future__ import annotations

import pytest
import torch

import raysight
from helpers import assert_no_hooks
from lm_helpers import ARCHS, PROMPTS, encode, hf_module, oracle_generate

ATOL = 1e-5
N = 4
TEXT = PROMPTS[0]


def _generate_alone(ref, tok, text, n=N, **kwargs):
    return oracle_generate(ref, encode(ref, tok, text), n, **kwargs)


def _assert_row_is(row: torch.Tensor, expected: torch.Tensor, pad_id: int) -> None:
    """``row`` (1, L) is ``expected`` (1, n) left-padded with ``pad_id``."""
    n = expected.shape[1]
    assert row.shape[0] == 1 and row.shape[1] >= n
    assert torch.equal(row[:, -n:], expected), (row, expected)
    assert (row[:, :-n] == pad_id).all(), row


class _Recorder:
    """A minimal HF streamer: records every ``put``."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.detach().clone())

    def end(self) -> None:
        self.ended = True


@pytest.mark.parametrize("arch", ARCHS)
def test_generator_output_equals_hf_generate(arch, lms, oracles, lm_tokenizer):
    model, ref = lms[arch], oracles[arch]
    with model.generate(TEXT, max_new_tokens=N, min_new_tokens=N):
        ids = model.generator.output.save()
    expected = _generate_alone(ref, lm_tokenizer, TEXT)
    assert expected.shape[1] == len(lm_tokenizer(TEXT)["input_ids"]) + N
    assert torch.equal(ids.value, expected)


def test_default_max_new_tokens_is_one(llama, llama_ref, lm_tokenizer):
    with llama.generate(TEXT):
        ids = llama.generator.output.save()
    expected = _generate_alone(llama_ref, lm_tokenizer, TEXT, n=1, exact=False)
    assert expected.shape[1] == len(lm_tokenizer(TEXT)["input_ids"]) + 1
    assert torch.equal(ids.value, expected)


def test_next_steps_the_head_through_generation(llama, llama_ref, lm_tokenizer):
    with llama.generate(TEXT, max_new_tokens=N, min_new_tokens=N):
        steps = [llama.lm_head.output.save()]
        for _ in range(N - 1):
            steps.append(llama.lm_head.next().output.save())
    expected = _generate_alone(llama_ref, lm_tokenizer, TEXT, output_logits=True, return_dict_in_generate=True)
    assert len(expected.logits) == N
    for k, (got, want) in enumerate(zip(steps, expected.logits)):
        assert torch.allclose(got.value[:, -1], want, atol=ATOL), f"step {k}"
    # the steps really differ (the test would not notice a step that re-reads step 0 otherwise)
    assert not torch.allclose(expected.logits[0], expected.logits[1])


def test_all_collects_the_head_output_of_every_step(llama, llama_ref, lm_tokenizer):
    with llama.generate(TEXT, max_new_tokens=N, min_new_tokens=N):
        logits = raysight.list().save()
        with llama.lm_head.all():
            logits.append(llama.lm_head.output[:, -1])
    expected = _generate_alone(llama_ref, lm_tokenizer, TEXT, output_logits=True, return_dict_in_generate=True)
    assert len(logits.value) == N
    for k, (got, want) in enumerate(zip(logits.value, expected.logits)):
        assert torch.allclose(got, want, atol=ATOL), f"step {k}"


@pytest.mark.parametrize("arch", ARCHS)
def test_invokes_of_different_lengths_each_equal_their_own_generate(arch, lms, oracles, lm_tokenizer):
    model, ref = lms[arch], oracles[arch]
    with model.generate(max_new_tokens=N, min_new_tokens=N) as tracer:
        outputs = []
        for text in PROMPTS:
            with tracer.invoke(text):
                outputs.append(model.generator.output.save())
    for text, ids in zip(PROMPTS, outputs):
        _assert_row_is(ids.value, _generate_alone(ref, lm_tokenizer, text), model.tokenizer.pad_token_id)


def test_next_in_a_padded_invoke_equals_its_own_generate_logits(llama, llama_ref, lm_tokenizer):
    short = "hello"
    with llama.generate(max_new_tokens=N, min_new_tokens=N) as tracer:
        with tracer.invoke(TEXT):
            pass
        with tracer.invoke(short):
            steps = [llama.lm_head.output.save()]
            for _ in range(N - 1):
                steps.append(llama.lm_head.next().output.save())
    expected = _generate_alone(llama_ref, lm_tokenizer, short, output_logits=True, return_dict_in_generate=True)
    for k, (got, want) in enumerate(zip(steps, expected.logits)):
        assert got.value.shape[0] == 1
        assert torch.allclose(got.value[:, -1], want, atol=ATOL), f"step {k}"


def test_embeddings_read_in_one_invoke_written_into_another(gpt2, gpt2_ref, lm_tokenizer):
    source, target = TEXT, "_ _ _ _ _ _ _ _ _ _"
    n = 3
    assert len(lm_tokenizer(source)["input_ids"]) == len(lm_tokenizer(target)["input_ids"])
    with gpt2.generate(max_new_tokens=n, min_new_tokens=n) as tracer:
        with tracer.invoke(source):
            embeddings = gpt2.transformer.wte.output
        with tracer.invoke(target):
            gpt2.transformer.wte.output = embeddings
            logits = raysight.list().save()
            with gpt2.lm_head.all():
                logits.append(gpt2.lm_head.output[:, -1])
            ids = gpt2.generator.output.save()

    # oracle: the target prompt alone, with a plain hook that swaps in the source's token embeddings at the first
    # call of wte (the prompt pass; GPT-2 calls wte again for token_type_ids and at every later step)
    with torch.no_grad():
        source_embeddings = gpt2_ref.transformer.wte(encode(gpt2_ref, lm_tokenizer, source)["input_ids"])
    calls = [0]

    def swap(module, args, output):
        calls[0] += 1
        return source_embeddings if calls[0] == 1 else None

    handle = gpt2_ref.transformer.wte.register_forward_hook(swap)
    try:
        expected = _generate_alone(gpt2_ref, lm_tokenizer, target, n=n, output_logits=True,
                                   return_dict_in_generate=True)  # fmt: skip
    finally:
        handle.remove()
    plain = _generate_alone(gpt2_ref, lm_tokenizer, target, n=n, output_logits=True, return_dict_in_generate=True)
    assert not torch.allclose(plain.logits[0], expected.logits[0])  # the swap matters

    assert torch.equal(ids.value, expected.sequences)
    assert len(logits.value) == n
    for k, (got, want) in enumerate(zip(logits.value, expected.logits)):
        assert torch.allclose(got, want, atol=ATOL), f"step {k}"


def test_streamer_hook_point_sees_each_steps_tokens(llama, llama_ref, lm_tokenizer):
    with llama.generate(TEXT, max_new_tokens=N, min_new_tokens=N):
        seen = raysight.list().save()
        with llama.generator.streamer.all():
            seen.append(llama.generator.streamer.output)
    recorder = _Recorder()
    _generate_alone(llama_ref, lm_tokenizer, TEXT, streamer=recorder)
    assert len(recorder.puts) == N + 1  # the prompt, then one put per new token
    assert len(seen.value) == len(recorder.puts)
    for k, (got, want) in enumerate(zip(seen.value, recorder.puts)):
        assert torch.equal(got.cpu(), want), f"put {k}"


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_a_users_streamer_still_receives_every_put(llama, llama_ref, lm_tokenizer):
    mine = _Recorder()
    with llama.generate(TEXT, max_new_tokens=N, min_new_tokens=N, streamer=mine):
        llama.generator.output.save()
    theirs = _Recorder()
    _generate_alone(llama_ref, lm_tokenizer, TEXT, streamer=theirs)
    assert len(mine.puts) == len(theirs.puts) == N + 1
    for got, want in zip(mine.puts, theirs.puts):
        assert torch.equal(got.cpu(), want)
    assert mine.ended and theirs.ended


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_accepts_the_tokenizers_batch_encoding(arch, lms, oracles, lm_tokenizer):
    model, ref = lms[arch], oracles[arch]
    enc = model.tokenizer(TEXT, return_tensors="pt")  # a BERT tokenizer also returns token_type_ids
    with model.generate(enc, max_new_tokens=N, min_new_tokens=N):
        ids = model.generator.output.save()
    assert torch.equal(ids.value, _generate_alone(ref, lm_tokenizer, TEXT))
    assert_no_hooks(hf_module(model))


@pytest.mark.parametrize("bad", [0, -1], ids=["zero", "negative"])
def test_max_new_tokens_below_one_raises_valueerror(bad, llama, count_calls):
    module = hf_module(llama)
    with count_calls(module) as calls:
        with pytest.raises(ValueError, match="max_new_tokens"):
            with llama.generate(TEXT, max_new_tokens=bad):
                llama.generator.output.save()
    assert calls[0] == 0
    assert_no_hooks(module)


def _stop_token_at_step(ref, tok, text: str, step: int) -> tuple[int, torch.Tensor]:
    """A token the model generates at ``step`` (0-based) and not before, and the plain-HF generation that uses it as
    end-of-sequence: it ends early, after ``step + 1`` of N new tokens."""
    free = _generate_alone(ref, tok, text)[0, -N:]
    assert int(free[step]) not in free[:step].tolist(), "pick another prompt: its stop token comes earlier"
    eos = int(free[step])
    ended = _generate_alone(ref, tok, text, exact=False, eos_token_id=eos)
    assert ended.shape[1] == len(tok(text)["input_ids"]) + step + 1
    return eos, ended


def test_a_next_loop_over_max_new_tokens_keeps_the_steps_of_a_generation_that_ended_early(
    llama, llama_ref, lm_tokenizer
):
    """nnsight 0.4's multi-token loop on a generation that hits its end-of-sequence token after 2 of N steps: the
    reads of the steps that never came are not set (and what uses them is skipped); the run is not an error."""
    eos, ended = _stop_token_at_step(llama_ref, lm_tokenizer, TEXT, 1)
    with llama.generate(TEXT, max_new_tokens=N, eos_token_id=eos):
        tokens = raysight.list().save()
        last = None
        for _ in range(N):
            last = llama.lm_head.output[0, -1].argmax(dim=-1).save()
            tokens.append(last)
            llama.lm_head.next()
        ids = llama.generator.output.save()
    made = ended.shape[1] - len(lm_tokenizer(TEXT)["input_ids"])
    assert made == 2 < N
    assert torch.equal(ids.value, ended)
    assert [int(t) for t in tokens.value] == ended[0, -made:].tolist()
    with pytest.raises(ValueError, match="was never produced"):
        last.value  # the last step's read: that step never ran
    assert_no_hooks(hf_module(llama))


def test_iter_over_steps_of_a_generation_that_ended_early_keeps_the_steps_that_ran(llama, llama_ref, lm_tokenizer):
    eos, ended = _stop_token_at_step(llama_ref, lm_tokenizer, TEXT, 1)
    with llama.generate(TEXT, max_new_tokens=N, eos_token_id=eos) as tracer:
        tokens = raysight.list().save()
        with tracer.iter[1:N]:
            tokens.append(llama.lm_head.output[0, -1].argmax(dim=-1))
    assert [int(t) for t in tokens.value] == ended[0, -1:].tolist()  # step 1 only: steps 2.. never ran


def test_next_past_max_new_tokens_of_a_full_generation_is_missed_provider_error(llama):
    with pytest.raises(raysight.MissedProviderError, match=r"ran only 2 time\(s\)"):
        with llama.generate(TEXT, max_new_tokens=2, min_new_tokens=2):
            llama.lm_head.next().next().output.save()
    assert_no_hooks(hf_module(llama))


def test_an_error_while_generating_leaves_no_hooks(llama):
    module = hf_module(llama)
    with pytest.raises(IndexError):
        with llama.generate(TEXT, max_new_tokens=2):
            llama.lm_head.output[:, :, 10**7].save()
    assert_no_hooks(module)
    # and the model still generates afterwards
    with llama.generate(TEXT, max_new_tokens=2, min_new_tokens=2):
        ids = llama.generator.output.save()
    assert ids.shape[1] == len(llama.tokenizer(TEXT)["input_ids"]) + 2


def test_beam_search_generates_like_plain_hf(gpt2, gpt2_ref, lm_tokenizer):
    inputs = {k: v for k, v in lm_tokenizer("the quick brown fox", return_tensors="pt").items()}
    with torch.no_grad():
        want = gpt2_ref.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False,
                                 pad_token_id=lm_tokenizer.pad_token_id)  # fmt: skip
    with gpt2.generate("the quick brown fox", max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False):
        ids = gpt2.generator.output.save()
    assert torch.equal(ids.value, want)


BEAMS = dict(max_new_tokens=3, min_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
PAIR = ("the quick brown fox", "a lazy old dog")  # (the same number of tokens: no padding between them)


def test_beam_search_invokes_get_their_own_beams_and_returned_sequences(gpt2, gpt2_ref, lm_tokenizer):
    """Beam search runs num_beams rows per prompt and returns num_return_sequences rows per prompt: each invoke sees
    its own block of rows, in every step and in the generated ids."""
    assert len(lm_tokenizer(PAIR[0])["input_ids"]) == len(lm_tokenizer(PAIR[1])["input_ids"])
    with torch.no_grad():
        want = [gpt2_ref.generate(**encode(gpt2_ref, lm_tokenizer, p), pad_token_id=lm_tokenizer.pad_token_id, **BEAMS)
                for p in PAIR]  # fmt: skip
    with gpt2.generate(**BEAMS) as tracer:
        with tracer.invoke(PAIR[0]):
            first = gpt2.generator.output.save()
        with tracer.invoke(PAIR[1]):
            head = gpt2.lm_head.output.save()  # the prompt step: 2 beams of this prompt
            second = gpt2.generator.output.save()
        whole = gpt2.lm_head.output.save()  # outside the invokes: all 4 rows
    assert torch.equal(first.value, want[0]) and torch.equal(second.value, want[1])
    assert head.value.shape[0] == 2 and whole.value.shape[0] == 4
    assert torch.equal(head.value, whole.value[2:])


def test_beam_search_edit_in_one_invoke_leaves_the_others_beams(gpt2, gpt2_ref, lm_tokenizer):
    with torch.no_grad():
        want = gpt2_ref.generate(**encode(gpt2_ref, lm_tokenizer, PAIR[0]), pad_token_id=lm_tokenizer.pad_token_id,
                                 **BEAMS)  # fmt: skip
        alone = gpt2_ref.generate(**encode(gpt2_ref, lm_tokenizer, PAIR[1]), pad_token_id=lm_tokenizer.pad_token_id,
                                  **BEAMS)  # fmt: skip
    with gpt2.generate(**BEAMS) as tracer:
        with tracer.invoke(PAIR[0]):
            first = gpt2.generator.output.save()
        with tracer.invoke(PAIR[1]):
            with gpt2.transformer.h[-1].all():
                gpt2.transformer.h[-1].output[:] = 0  # every step, this prompt's beams only
            second = gpt2.generator.output.save()
    assert torch.equal(first.value, want)
    assert second.value.shape == alone.shape and not torch.equal(second.value, alone)


def _step_logits(ref, inputs, n, tok):
    """The last-position logits of each generation step, by a hook on the oracle's lm_head."""
    steps = []
    handle = ref.lm_head.register_forward_hook(lambda m, a, out: steps.append(out[:, -1].detach().clone()))
    try:
        with torch.no_grad():
            ids = ref.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=tok.pad_token_id)  # fmt: skip
    finally:
        handle.remove()
    return steps, ids


def test_a_python_loop_with_next_reads_every_generation_step(gpt2, gpt2_ref, lm_tokenizer):
    inputs = {k: v for k, v in lm_tokenizer("The Eiffel Tower is in the city of", return_tensors="pt").items()}
    want, _ = _step_logits(gpt2_ref, inputs, 3, lm_tokenizer)
    with gpt2.generate("The Eiffel Tower is in the city of", max_new_tokens=3, min_new_tokens=3):
        logits = raysight.list().save()
        for _ in range(3):
            logits.append(gpt2.lm_head.output[:, -1])
            gpt2.lm_head.next()
    assert len(logits.value) == 3
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(logits.value, want))


def test_tracer_all_applies_to_every_step(gpt2, gpt2_ref, lm_tokenizer):
    inputs = {k: v for k, v in lm_tokenizer("hello there", return_tensors="pt").items()}
    zero = gpt2_ref.transformer.h[0].register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        want, want_ids = _step_logits(gpt2_ref, inputs, 3, lm_tokenizer)
    finally:
        zero.remove()
    with gpt2.generate("hello there", max_new_tokens=3, min_new_tokens=3) as tracer:
        logits = raysight.list().save()
        with tracer.all():
            gpt2.transformer.h[0].output[:] = 0
            logits.append(gpt2.lm_head.output[:, -1])
        ids = gpt2.generator.output.save()
    assert torch.equal(ids.value, want_ids)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(logits.value, want))


def test_invoker_inputs_hold_the_invokes_encoding(gpt2, lm_tokenizer):
    with gpt2.trace() as tracer:
        with tracer.invoke("the eiffel tower") as invoker:
            tokens = invoker.inputs[0]["input_ids"][0]
            gpt2.output.save()
    assert torch.equal(tokens, lm_tokenizer("the eiffel tower", return_tensors="pt")["input_ids"][0])


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_trace_false_returns_the_generated_ids(arch, lms, oracles, lm_tokenizer):
    model, ref = lms[arch], oracles[arch]
    ids = model.generate(TEXT, max_new_tokens=N, min_new_tokens=N, trace=False)
    assert isinstance(ids, torch.Tensor)
    assert torch.equal(ids, _generate_alone(ref, lm_tokenizer, TEXT))


def test_generate_takes_input_ids_and_attention_mask_as_keywords(gpt2, gpt2_ref, lm_tokenizer):
    enc = encode(gpt2_ref, lm_tokenizer, TEXT)  # input_ids, attention_mask (and token_type_ids, which GPT-2 takes)
    assert {"input_ids", "attention_mask"} <= set(enc)
    with gpt2.generate(**enc, max_new_tokens=N, min_new_tokens=N):
        ids = gpt2.generator.output.save()
    assert torch.equal(ids.value, _generate_alone(gpt2_ref, lm_tokenizer, TEXT))
