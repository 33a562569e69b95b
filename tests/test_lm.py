"""The causal LM backend in process, on a tiny random GPT-2: batching, seeds, limits, loading."""

from __future__ import annotations

import pytest

from aigc.schemas.specs import GenerationParams
from aigc.workers.errors import ModelNotFoundError
from aigc.workers.lm import CausalLM, TextRequest, plan_batches, resolve_model

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog and keeps running far away",
    "Write an article about bees.",
    "A",
    "In 1905, a young clerk in the patent office in Bern wrote four papers that",
    "Tides",
]


@pytest.fixture(scope="module")
def lm(tiny_model):
    return CausalLM(str(tiny_model), device="cpu")


def run(lm, requests, max_rows, max_tokens=100_000):
    outputs = [o for batch in lm.generate(requests, max_rows=max_rows, max_tokens=max_tokens)
               for o in batch]
    return {o.key: o for o in outputs}


def test_batched_greedy_equals_one_at_a_time(lm):
    params = GenerationParams(max_new_tokens=16)
    requests = [TextRequest(i, p, params, seed=0) for i, p in enumerate(PROMPTS)]

    batched = run(lm, requests, max_rows=len(PROMPTS))
    single = run(lm, requests, max_rows=1)

    assert sorted(batched) == list(range(len(PROMPTS)))
    for key in batched:
        assert batched[key].text == single[key].text
        assert batched[key].output_tokens == single[key].output_tokens == 16
        assert batched[key].prompt_tokens == len(lm.encode([PROMPTS[key]])[0])


def test_sampled_output_depends_only_on_the_items_seed(lm):
    params = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.95)
    target = TextRequest(0, "Write an article about bees.", params, seed=1234)
    others = [TextRequest(i, p, params, seed=i) for i, p in enumerate(PROMPTS[:4], start=1)]

    alone = run(lm, [target], max_rows=1)[0].text
    crowded = run(lm, [*others, target], max_rows=8)[0].text
    reseeded = run(lm, [TextRequest(0, target.prompt, params, seed=99)], max_rows=1)[0].text

    assert alone == crowded
    assert reseeded != alone


def test_stop_sequence_cuts_the_text(lm):
    free = run(lm, [TextRequest(0, "Hello", GenerationParams(max_new_tokens=24), 0)], 1)[0]
    stop = free.text[5:9]
    cut = run(lm, [TextRequest(0, "Hello", GenerationParams(max_new_tokens=24, stop=[stop]), 0)], 1)[0]

    assert stop not in cut.text
    assert free.text.startswith(cut.text)
    assert cut.output_tokens < free.output_tokens


def test_a_prompt_too_long_for_the_context_fails_alone(lm):
    params = GenerationParams(max_new_tokens=16)
    long_prompt = "word " * (lm.context + 10)
    outputs = run(lm, [TextRequest(0, long_prompt, params, 0), TextRequest(1, "Hello", params, 0)], 8)

    assert outputs[0].error_code == "prompt_too_long" and outputs[0].text is None
    assert str(lm.context) in outputs[0].error_message
    assert outputs[1].error_code is None and outputs[1].output_tokens == 16


@pytest.mark.parametrize("lengths,max_new,rows,tokens", [
    ([5, 300, 7, 250, 6, 8, 290, 9], 10, 3, 10_000),
    ([5, 300, 7, 250, 6, 8, 290, 9], 10, 8, 700),
    ([50] * 7, 50, 8, 150),  # one row alone exceeds the token budget
])
def test_plan_batches_buckets_by_length_within_limits(lengths, max_new, rows, tokens):
    batches = plan_batches(lengths, max_new, rows, tokens)

    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch) + max_new
        assert len(batch) <= rows
        assert len(batch) == 1 or len(batch) * width <= tokens
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)  # similar lengths share a batch: little padding


def test_resolve_model_names_what_is_missing(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="hf download some-org/some-model") as caught:
        resolve_model("some-org/some-model", allow_downloads=True)
    assert "local Hugging Face cache" in str(caught.value)


def test_resolve_model_accepts_a_model_directory(tiny_model):
    assert resolve_model(str(tiny_model)) == str(tiny_model)


def test_out_of_memory_halves_the_batch_and_remembers(tiny_model, monkeypatch):
    import torch

    from aigc.workers.errors import TransientError

    lm = CausalLM(str(tiny_model), device="cpu")
    params = GenerationParams(max_new_tokens=6)
    requests = [TextRequest(i, p, params, seed=0) for i, p in enumerate(PROMPTS)]
    expected = run(lm, requests, max_rows=8)
    real = lm._run_batch
    sizes = []

    def small_device(reqs, ids):  # as if only 2 rows fit in memory
        sizes.append(len(reqs))
        if len(reqs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(reqs, ids)

    monkeypatch.setattr(lm, "_run_batch", small_device)
    got = run(lm, requests, max_rows=8)

    assert {k: o.text for k, o in got.items()} == {k: o.text for k, o in expected.items()}
    assert sizes[0] == 6 and max(sizes[1:]) <= 3 and lm.rows_cap == 2
    sizes.clear()
    run(lm, requests, max_rows=8)
    assert max(sizes) <= 2  # later batches start at the size that fit

    monkeypatch.setattr(lm, "_run_batch", lambda reqs, ids: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(TransientError, match="single row"):
        run(lm, requests[:1], max_rows=8)


def test_plan_batches_without_bucketing_keeps_submission_order():
    lengths = [5, 300, 7, 250, 6]
    batches = plan_batches(lengths, 10, 2, 10_000, bucketing=False)
    assert batches == [[0, 1], [2, 3], [4]]
    assert plan_batches(lengths, 10, 8, 600, bucketing=False) == [[0], [1], [2, 3], [4]]


def test_min_new_tokens_holds_back_the_end_of_text(tiny_model):
    from aigc.schemas.specs import effective_params

    lm = CausalLM(str(tiny_model), device="cpu")
    first = run(lm, [TextRequest(0, "Hello", GenerationParams(max_new_tokens=1), 0)], 1)[0]
    lm.eos_id = lm.encode([first.text])[0][0]  # make the greedy first token the end of text

    ended = run(lm, [TextRequest(0, "Hello", GenerationParams(max_new_tokens=8), 0)], 1)[0]
    held = run(lm, [TextRequest(0, "Hello", GenerationParams(max_new_tokens=8, min_new_tokens=5), 0)], 1)[0]

    assert ended.output_tokens == 0 and ended.text == ""
    assert held.output_tokens >= 5 and held.text
    capped = GenerationParams(max_new_tokens=4, min_new_tokens=9)
    assert effective_params("article", capped.model_dump(), {"prompt": "x"}).min_new_tokens == 4
