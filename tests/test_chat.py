"""The LM's prompting and limits in process, on tiny random GPT-2s: chat templates, flattened
chat for models without one, finish reasons, what does not fit the context, per-row limits."""

from __future__ import annotations

import pytest

from aigc.schemas.specs import GenerationParams
from aigc.workers.lm import FLATTENED_CHAT_STOP, CausalLM, TextRequest, flatten_messages

from tiny_models import build_tiny_chat_gpt2

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a planet."}]


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory):
    return CausalLM(str(build_tiny_chat_gpt2(tmp_path_factory.mktemp("m") / "chat")), device="cpu")


@pytest.fixture(scope="module")
def base_lm(tiny_model):
    return CausalLM(str(tiny_model), device="cpu")


def run(lm, requests, max_rows=8):
    return {o.key: o for batch in lm.generate(requests, max_rows=max_rows, max_tokens=100_000) for o in batch}


def test_chat_messages_go_through_the_models_own_template(chat_lm):
    params = GenerationParams(max_new_tokens=8)
    rendered = chat_lm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n") and "Name a planet." in rendered

    chat = run(chat_lm, [TextRequest(0, "", params, 0, messages=MESSAGES, prefix="Title:")])[0]
    raw = run(chat_lm, [TextRequest(0, rendered + "Title:", params, 0)])[0]

    assert chat.text == raw.text
    assert chat.prompt_tokens == len(chat_lm.encode([rendered + "Title:"])[0]) == raw.prompt_tokens


def test_a_model_without_a_template_gets_the_chat_as_text_and_stops_before_the_next_turn(base_lm):
    assert not base_lm.has_chat_template
    request = TextRequest(0, "", GenerationParams(max_new_tokens=8, stop=["END"]), 0, messages=MESSAGES)

    text, params = base_lm.render(request)

    assert text == flatten_messages(MESSAGES) == "Be brief.\n\nUser: Name a planet.\nAssistant:"
    assert params.stop == ["END", FLATTENED_CHAT_STOP]
    developer = [{"role": "developer", "content": "Rules."}, {"role": "user", "content": "Hi"}]
    assert base_lm.render(TextRequest(0, "", request.params, 0, messages=developer))[0].startswith("Rules.\n\n")


def test_finish_reason_says_whether_the_limit_was_hit(base_lm):
    long = run(base_lm, [TextRequest(0, "Hello", GenerationParams(max_new_tokens=6), 0)])[0]
    assert (long.finish_reason, long.output_tokens) == ("length", 6)

    stop = long.text[2:5]
    cut = run(base_lm, [TextRequest(0, "Hello", GenerationParams(max_new_tokens=6, stop=[stop]), 0)])[0]
    assert cut.finish_reason == "stop" and cut.output_tokens < 6

    first_token = base_lm.encode([long.text])[0][0]
    eos, base_lm.eos_id = base_lm.eos_id, first_token  # the greedy first token ends the text
    try:
        ended = run(base_lm, [TextRequest(0, "Hello", GenerationParams(max_new_tokens=6), 0)])[0]
    finally:
        base_lm.eos_id = eos
    assert (ended.finish_reason, ended.output_tokens, ended.text) == ("stop", 0, "")


def test_max_new_tokens_that_cannot_fit_is_the_items_error_naming_it(base_lm):
    prompt = "word " * 200
    room = base_lm.context - len(base_lm.encode([prompt])[0])  # about 55 of a 256-token context
    wanted = GenerationParams(max_new_tokens=100)

    out = run(base_lm, [TextRequest(0, prompt, wanted, 0), TextRequest(1, "Hello", wanted, 0)])

    assert out[0].error_code == "max_new_tokens_too_large" and out[0].text is None
    assert "max_new_tokens=100" in out[0].error_message and f"at most {room}" in out[0].error_message
    assert "prompt_too_long" != out[0].error_code and out[1].output_tokens == 100


def test_a_default_budget_shrinks_to_fit_the_context(base_lm):
    prompt = "word " * 200
    room = base_lm.context - len(base_lm.encode([prompt])[0])
    out = run(base_lm, [TextRequest(0, prompt, GenerationParams(max_new_tokens=100), 0, fit=True)])[0]

    assert out.error_code is None and out.params.max_new_tokens == room and 0 < out.output_tokens <= room


def test_rows_with_different_limits_share_a_batch_and_keep_their_own(base_lm):
    requests = [TextRequest(i, p, GenerationParams(max_new_tokens=n, min_new_tokens=min(n, 3)), 0)
                for i, (p, n) in enumerate([("Hello", 3), ("The sea", 9), ("Bees", 5), ("A", 12)])]

    alone = {r.key: run(base_lm, [r], max_rows=1)[r.key] for r in requests}
    prefills = base_lm.stats.prefills
    together = run(base_lm, requests, max_rows=8)

    assert {k: (o.text, o.output_tokens, o.finish_reason) for k, o in together.items()} == \
        {k: (o.text, o.output_tokens, o.finish_reason) for k, o in alone.items()}
    assert [together[i].output_tokens for i in range(4)] == [3, 9, 5, 12]
    assert base_lm.stats.prefills == prefills + 1  # one prefill for all four, then one batch


def test_per_row_minimums_hold_back_the_end_of_text_row_by_row(base_lm):
    first = run(base_lm, [TextRequest(0, "Hello", GenerationParams(max_new_tokens=1), 0)])[0]
    eos, base_lm.eos_id = base_lm.eos_id, base_lm.encode([first.text])[0][0]
    try:
        out = run(base_lm, [TextRequest(0, "Hello", GenerationParams(max_new_tokens=8), 0),
                            TextRequest(1, "Hello", GenerationParams(max_new_tokens=8, min_new_tokens=4), 0)])
    finally:
        base_lm.eos_id = eos
    assert out[0].output_tokens == 0 and out[1].output_tokens >= 4


def test_the_repetition_penalty_applies_to_generated_tokens_only_and_batches_alike(base_lm):
    plain = GenerationParams(max_new_tokens=24)
    penalised = GenerationParams(max_new_tokens=24, repetition_penalty=1.5)
    prompt = "the the the the the"

    free = run(base_lm, [TextRequest(0, prompt, plain, 0)])[0].text
    held = run(base_lm, [TextRequest(0, prompt, penalised, 0)])[0].text
    crowded = run(base_lm, [TextRequest(0, prompt, penalised, 0), TextRequest(1, "Bees", penalised, 0)])[0].text

    assert held != free and held == crowded
    words = held.split()
    assert len(set(words)) >= len(words) // 2  # fewer repeats than a looping random model
