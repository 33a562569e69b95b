"""The causal LM backend in process, on a tiny random GPT-2: batching, seeds, limits, loading."""

from __future__ import annotations

import pytest

from aigc.schemas.specs import GenerationParams
from aigc.workers.decode import DecodeStats
from aigc.workers.errors import ModelNotFoundError
from aigc.workers.lm import CausalLM, TextRequest, resolve_model

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


def forward_sizes(lm, monkeypatch, fits: int | None = None) -> list[tuple[int, int]]:
    """Record (rows, positions) of every forward pass; rows > ``fits`` run out of memory."""
    import torch

    sizes, real = [], lm.model.forward

    def forward(*args, input_ids=None, attention_mask=None, **kwargs):
        sizes.append((input_ids.shape[0], attention_mask.shape[1]))
        if fits is not None and input_ids.shape[0] > fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(lm.model, "forward", forward)
    return sizes


@pytest.mark.parametrize("bucketing", [True, False])
@pytest.mark.parametrize("params", [
    GenerationParams(max_new_tokens=16),
    GenerationParams(max_new_tokens=16, temperature=1.0, top_p=0.9),
    GenerationParams(max_new_tokens=16, repetition_penalty=1.5, min_new_tokens=2),
], ids=["greedy", "sampled", "penalised"])
def test_rows_that_join_a_running_batch_write_what_they_write_alone(tiny_model, monkeypatch, params, bucketing):
    lm = CausalLM(str(tiny_model), device="cpu")
    limits = [3, 12, 7, 16, 1, 9]  # rows end at different steps: the others join as they do
    requests = [TextRequest(i, p, params.model_copy(update={"max_new_tokens": n}), seed=i)
                for i, (p, n) in enumerate(zip(PROMPTS, limits))]
    alone = {r.key: run(lm, [r], max_rows=1)[r.key] for r in requests}
    sizes = forward_sizes(lm, monkeypatch)
    prefills = lm.stats.prefills

    joined = [o for batch in lm.generate(requests, max_rows=3, max_tokens=100_000, bucketing=bucketing)
              for o in batch]

    assert {o.key: (o.text, o.output_tokens) for o in joined} == \
        {k: (o.text, o.output_tokens) for k, o in alone.items()}
    assert max(rows for rows, _ in sizes) <= 3
    assert lm.stats.prefills - prefills > 2  # rows joined the running batch, not batch after batch


def test_requests_that_arrive_later_join_the_running_batch(tiny_model, monkeypatch):
    from aigc.workers import lm as lm_module

    lm = CausalLM(str(tiny_model), device="cpu")
    params = GenerationParams(max_new_tokens=24)
    requests = [TextRequest(i, p, params, seed=0) for i, p in enumerate(PROMPTS)]
    alone = {r.key: run(lm, [r], max_rows=1)[r.key] for r in requests}
    late = list(requests[2:])
    asked = []

    def more(room):
        asked.append(room)
        return [late.pop(0)] if late else []

    monkeypatch.setattr(lm_module, "MORE_SECONDS", 0)  # ask at every step that has room
    sizes = forward_sizes(lm, monkeypatch)
    first = lm.stats.prefills
    got = {o.key: o for batch in lm.generate(requests[:2], max_rows=4, max_tokens=100_000, more=more)
           for o in batch}

    assert {k: o.text for k, o in got.items()} == {k: o.text for k, o in alone.items()}
    assert asked[0] == 2 and all(0 < room <= 4 for room in asked)  # only asked while there was room
    # The first late one joins the first prefill; each later one joins the running batch.
    assert lm.stats.prefills - first == len(requests) - 2 and not late
    assert [rows for rows, _ in sizes[:4]] == [3, 3, 1, 4]  # prefill, step, join, step of four


@pytest.mark.parametrize("params", [GenerationParams(max_new_tokens=12),
                                    GenerationParams(max_new_tokens=12, temperature=1.0, repetition_penalty=1.3)],
                         ids=["greedy", "sampled"])
def test_prompts_that_start_alike_share_one_prefill_of_the_start_and_write_what_they_write_alone(
        tiny_model, params):
    lm = CausalLM(str(tiny_model), device="cpu")
    start = "You are a careful writer who checks every fact twice. Write a short, plain article for a general audience about"
    endings = ["bees", "the history of tides and the moon", "A", "how a clerk in Bern wrote four papers"]
    requests = [TextRequest(i, f"{start} {e}", params, seed=i) for i, e in enumerate(endings)]
    alone = {r.key: run(lm, [r], max_rows=1)[r.key] for r in requests}
    shared = len(lm.encode([start])[0])
    before = DecodeStats()
    before.add(lm.stats)

    together = run(lm, requests, max_rows=8)

    assert {k: (o.text, o.output_tokens) for k, o in together.items()} == \
        {k: (o.text, o.output_tokens) for k, o in alone.items()}
    assert lm.stats.prefills - before.prefills == 1
    computed = lm.stats.prompt_padded - before.prompt_padded
    widest = max(len(lm.encode([r.prompt])[0]) for r in requests)
    assert computed <= len(requests) * widest - (len(requests) - 1) * (shared - 1)  # the start ran once


def test_the_batch_keeps_within_the_token_budget_and_drops_padding_every_row_has(tiny_model, monkeypatch):
    from aigc.workers import decode

    lm = CausalLM(str(tiny_model), device="cpu")
    long_prompt = " ".join(["word"] * 90)
    requests = [TextRequest(0, long_prompt, GenerationParams(max_new_tokens=2), 0)] + [
        TextRequest(i, p, GenerationParams(max_new_tokens=40), 0) for i, p in enumerate(["Hello", "Tides", "A"], 1)]
    alone = {r.key: run(lm, [r], max_rows=1)[r.key] for r in requests}
    dropped = []
    real = decode.GrowingLayer.drop_front
    monkeypatch.setattr(decode.GrowingLayer, "drop_front", lambda self, n: (dropped.append(n), real(self, n)))
    sizes = forward_sizes(lm, monkeypatch)

    got = run(lm, requests, max_rows=8, max_tokens=4 * 140)

    assert {k: o.text for k, o in got.items()} == {k: o.text for k, o in alone.items()}
    assert all(rows == 1 or rows * width <= 4 * 140 for rows, width in sizes)
    assert dropped and min(dropped) >= decode.TRIM  # the long prompt's columns went with it
    assert sizes[-1][1] < 90  # the rows that went on attend to their own positions only


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
    from aigc.workers.errors import TransientError

    lm = CausalLM(str(tiny_model), device="cpu")
    params = GenerationParams(max_new_tokens=6)
    requests = [TextRequest(i, p, params, seed=0) for i, p in enumerate(PROMPTS)]
    expected = run(lm, requests, max_rows=8)
    sizes = forward_sizes(lm, monkeypatch, fits=2)  # as if only 2 rows fit in memory

    got = run(lm, requests, max_rows=8)

    assert {k: o.text for k, o in got.items()} == {k: o.text for k, o in expected.items()}
    assert sizes[0][0] == 6 and max(rows for rows, _ in sizes[1:]) <= 3 and lm.rows_cap == 2
    sizes.clear()
    run(lm, requests, max_rows=8)
    assert max(rows for rows, _ in sizes) <= 2  # later batches start at the size that fit

    forward_sizes(lm, monkeypatch, fits=0)
    with pytest.raises(TransientError, match="single row"):
        run(lm, requests[:1], max_rows=8)


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


@pytest.mark.parametrize("grace,finished", [(60.0, {0, 1}), (0.0, {0})], ids=["rows-in-flight-finish", "grace-over"])
def test_once_shutdown_begins_no_row_starts_and_those_in_flight_finish_within_the_grace(lm, grace, finished):
    from aigc.workers.shutdown import Shutdown

    shutdown = Shutdown()
    short, long = GenerationParams(max_new_tokens=4), GenerationParams(max_new_tokens=40)
    late = [TextRequest(i, p, short, seed=0) for i, p in enumerate(PROMPTS[2:], start=2)]
    asked = []

    def more(room):  # the room row 0 leaves would be filled from here
        asked.append(room)
        return [late.pop(0)] if late else []

    got = {}
    for batch in lm.generate([TextRequest(0, PROMPTS[0], short, seed=0), TextRequest(1, PROMPTS[1], long, seed=0)],
                             max_rows=2, max_tokens=100_000, flush_seconds=0, more=more, shutdown=shutdown):
        got |= {o.key: o for o in batch}
        shutdown.begin(grace)  # row 0 has ended; row 1 is 4 of its 40 tokens in

    assert set(got) == finished  # nothing joined; without grace, the long row was dropped
    assert [got[k].output_tokens for k in sorted(got)] == [4, 40][:len(finished)]
    assert asked == [] and len(late) == 4
    waiting = [TextRequest(i, p, short, seed=0) for i, p in enumerate(PROMPTS)]
    assert list(lm.generate(waiting, max_rows=2, max_tokens=100_000, shutdown=shutdown)) == []
