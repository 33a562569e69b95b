"""The CPU speed options on a tiny random GPT-2: int8 Linear layers, and decoding that drops rows
as they end. What they compute is checked here; how fast is for benchmarks/text_vs_peer.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from aigc import api
from aigc.schemas.settings import Settings
from aigc.schemas.specs import GenerationParams
from aigc.workers.decode import DecodeStats, GrowingLayer, Row, Sampling, decode, new_cache
from aigc.workers.lm import CausalLM, TextRequest
from aigc.workers.precision import PrecisionError, RowScaledInt8Linear, has_native_bf16, resolve_precision

from conftest import REPO, WorkerProcess

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog", "Write an article about bees.",
           "A", "In 1905, a young clerk in the patent office in Bern wrote four papers that"]


@pytest.fixture(scope="module")
def int8_lm(tiny_model):
    return CausalLM(str(tiny_model), device="cpu", precision="int8")


def outputs(lm, requests, max_rows):
    return {o.key: o for batch in lm.generate(requests, max_rows=max_rows, max_tokens=100_000) for o in batch}


def test_int8_replaces_every_linear_and_generates(int8_lm, tiny_model):
    fp32 = CausalLM(str(tiny_model), device="cpu", precision="fp32")
    quantized = [m for m in int8_lm.model.modules() if isinstance(m, RowScaledInt8Linear)]
    # GPT-2: four Conv1D per block (attention in/out, MLP up/down) and the LM head
    assert int8_lm.precision == "int8" and len(quantized) == 4 * 2 + 1
    assert fp32.precision == "fp32" and not any(isinstance(m, RowScaledInt8Linear) for m in fp32.model.modules())

    got = outputs(int8_lm, [TextRequest(i, p, GenerationParams(max_new_tokens=10), 0)
                            for i, p in enumerate(PROMPTS)], max_rows=8)

    assert all(got[i].text and got[i].output_tokens == 10 for i in range(len(PROMPTS)))
    ids = torch.tensor([int8_lm.encode(["The tide comes in"])[0]])
    with torch.inference_mode():  # close to float32, not equal to it
        difference = (int8_lm.model(ids).logits - fp32.model(ids).logits).abs().max()
    assert 0 < difference < 0.5


def test_int8_sampling_follows_the_seed_and_repeats_alone_and_in_a_crowd_on_the_tiny_model(int8_lm):
    # Holds here (12 tokens of a tiny model). With SmolLM2, bf16 and int8 text can change with
    # the batch an item shares (its padding); fp32 cannot (docs/benchmarks.md, README).
    params = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.95)
    target = TextRequest(0, "Write an article about bees.", params, seed=1234)
    others = [TextRequest(i, p, params, seed=i) for i, p in enumerate(PROMPTS, start=1)]

    alone = outputs(int8_lm, [target], max_rows=1)[0].text
    again = outputs(int8_lm, [target], max_rows=1)[0].text
    crowded = outputs(int8_lm, [*others, target], max_rows=8)[0].text
    reseeded = outputs(int8_lm, [TextRequest(0, target.prompt, params, seed=99)], max_rows=1)[0].text

    assert alone == again == crowded
    assert reseeded != alone


def test_the_int8_kernel_quantizes_each_row_on_its_own():
    torch.manual_seed(0)
    layer = RowScaledInt8Linear(torch.nn.Linear(64, 48))
    x = torch.randn(9, 64) * torch.logspace(-2, 2, 9)[:, None]  # rows of very different size

    together = layer(x)

    for row in range(9):
        assert torch.equal(layer(x[row:row + 1]), together[row:row + 1])


# Full-range activations against all-large weights: where the int8 kernel adds pairs of u8 x s8
# products in 16 bits (fbgemm without VNNI), 8-bit weights would saturate and give about 0.5 for 62.
SATURATION_CHECK = """
import json, torch
from aigc.workers.precision import RowScaledInt8Linear, kernel_saturates
linear = torch.nn.Linear(64, 16, bias=False)
torch.nn.init.constant_(linear.weight, 1.0)
layer = RowScaledInt8Linear(linear)
x = torch.ones(3, 64)
x[:, 0] = -1.0
error = ((layer(x) - linear(x)).abs().max() / linear(x).abs().max()).item()
print(json.dumps({"saturates": kernel_saturates(), "levels": layer.weight_levels, "error": error}))
"""


@pytest.mark.parametrize("instructions", ["", "AVX2"])
def test_int8_never_saturates_the_kernel(instructions):
    """FBGEMM_ENABLE_INSTRUCTIONS=AVX2 makes fbgemm run its AVX2 kernels on any x86 CPU (read
    once per process, hence the child); on an AVX2-only machine both cases are that."""
    env = os.environ | {"FBGEMM_ENABLE_INSTRUCTIONS": instructions}
    done = subprocess.run([sys.executable, "-c", SATURATION_CHECK], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])

    if instructions == "AVX2":
        assert got["saturates"] and got["levels"] == 63
    assert got["levels"] == (63 if got["saturates"] else 127)
    assert got["error"] < 0.02


def test_precision_names_and_devices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == ("bf16" if has_native_bf16() else "int8")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("auto", cuda) in ("bf16", "fp16")
    with pytest.raises(PrecisionError, match="CPU only"):
        resolve_precision("int8", cuda)
    with pytest.raises(PrecisionError, match="unknown"):
        resolve_precision("int4", cpu)
    assert Settings().text_precision == "auto"
    with pytest.raises(ValueError):
        Settings(text_precision="int4")


def test_decode_gives_what_generate_gives_and_stops_computing_ended_rows(tiny_model):
    lm = CausalLM(str(tiny_model), device="cpu", precision="fp32")
    ids = [lm.encode([p])[0] for p in PROMPTS]
    width = max(map(len, ids))
    input_ids = torch.tensor([[lm.pad_id] * (width - len(r)) + r for r in ids])  # (B, T)
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])  # (B, T)
    limits = [3, 12, 7, 12, 1]
    with torch.inference_mode():
        reference = lm.model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=12,
                                      do_sample=False, pad_token_id=lm.pad_id)[:, width:]
    stats = DecodeStats()
    rows = [Row(i, r, limit) for i, (r, limit) in enumerate(zip(ids, limits))]
    given = iter([rows])

    new = dict(kv for done in decode(lm.model, lambda running, width: next(given, []), sampling=Sampling(),
                                     eos_id=None, pad_id=lm.pad_id, stats=stats) for kv in done)

    assert [len(new[row]) for row in range(len(limits))] == limits
    for row, limit in enumerate(limits):
        assert new[row] == reference[row, :limit].tolist()
    assert stats.decoded == sum(limits) < len(limits) * max(limits)  # ended rows were dropped
    assert stats.kept == sum(limits) and stats.prompt_tokens == sum(map(len, ids))


def test_the_growing_cache_holds_what_was_written():
    cache = new_cache(None)  # no config: layers are made on first use
    keys = torch.randn(3, 2, 5, 4)  # (B, H, T, D)
    cache.update(keys, keys + 1, 0)
    for step in range(300):  # past the first room: the buffer regrows
        token = torch.full((3, 2, 1, 4), float(step))
        k, v = cache.update(token, token + 1, 0)
    assert isinstance(cache.layers[0], GrowingLayer) and k.shape == (3, 2, 305, 4)
    assert torch.equal(k[:, :, :5], keys) and torch.equal(v[:, :, -1], torch.full((3, 2, 4), 300.0))
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(cache.layers[0].keys[:, :, :5], keys[[2, 0]]) and cache.get_seq_length() == 305


@pytest.mark.integration
def test_the_worker_runs_int8_and_says_so(redis_url, sqlite_url, tiny_model, tmp_path):
    settings = Settings(broker_url=redis_url, database_url=sqlite_url, text_model=str(tiny_model),
                        text_precision="int8", data_dir=tmp_path)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        items = [{"custom_id": f"c{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
        params = {"max_new_tokens": 8, "temperature": 0.9, "seed": 5}
        first = api.submit("article", items, params=params, settings=settings)
        second = api.submit("article", items[::-1], params=params, settings=settings)
        for job_id in (first, second):
            assert api.wait(job_id, timeout=120, settings=settings).status == "completed"
        rows = {j: {r["custom_id"]: r for r in api.results(j, settings=settings)} for j in (first, second)}
    finally:
        worker.stop()

    for row in rows[first].values():
        assert row["params"]["precision"] == "int8" and row["output_text"]
        assert row["output_text"] == rows[second][row["custom_id"]]["output_text"]  # same seed, same text
