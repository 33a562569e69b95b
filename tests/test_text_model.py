"""The shipped default text model (workers/models/text-small) and the script that trains it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "workers" / "models" / "text-small"
sys.path.insert(0, str(ROOT / "scripts"))

import train_text_model  # noqa: E402


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True, padding_side="left")
    return model.eval(), tokenizer, time.perf_counter() - t0


def test_shipped_model_is_small_and_loads_fast_in_float32(shipped):
    model, tokenizer, load_seconds = shipped
    assert load_seconds < 5.0
    assert model.dtype == torch.float32  # stored as float16, upcast on load for CPU inference
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert size < 25_000_000


def test_shipped_model_generates_for_a_left_padded_batch(shipped):
    model, tokenizer, _ = shipped
    prompts = ["Title:", "Write an article about gardening.\n\nTitle:"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].all()  # padded on the left
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        alone = model.generate(**tokenizer(prompts[:1], return_tensors="pt"), max_new_tokens=12, do_sample=False)
    width = batch["input_ids"].shape[1]
    assert out.shape == (2, width + 12)
    new = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    assert all(len(t.strip()) > 0 for t in new), new
    # padding must not change what the short prompt produces
    assert out[0, width:].tolist() == alone[0, alone.shape[1] - 12 :].tolist()


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "Write an article about gardening.\n\nTitle: Ten tips for spring",
        "  Leading spaces,  double  spaces , and a tab\there; trailing space ",
        "Prices: $4.99 (was 5.49!) -- 50% off? Yes: \"quoted\" & 'single'.",
        "naïve café, Zürich — “curly quotes” … 日本語 😀\r\n",
    ],
)
def test_shipped_tokenizer_round_trips(shipped, text):
    _, tokenizer, _ = shipped
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


@pytest.mark.integration  # trains for a few seconds
def test_training_script_loss_falls_and_output_loads(tmp_path):
    out = tmp_path / "tiny"
    tiny = "--max-chars 60000 --vocab-size 300 --n-layer 1 --n-embd 32 --n-head 2 --n-ctx 64 --batch-size 8"
    report = train_text_model.main(
        [*tiny.split(), "--max-steps", "40", "--warmup-steps", "5", "--lr", "3e-3", "--eval-every", "0",
         "--out", str(out)]
    )
    losses = json.loads((out / "train_log.json").read_text())["losses"]
    assert losses == report["losses"] and len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.dtype == torch.float32 and model.config.n_layer == 1 and len(tokenizer) == 300
    assert (out / "README.md").read_text().count("held-out perplexity") == 1
    assert report["heldout_ppl"] > 1 and report["unigram_ppl"] > 1
    again = train_text_model.main([*tiny.split(), "--max-steps", "5", "--warmup-steps", "5", "--lr", "3e-3",
                                   "--eval-every", "0", "--out", str(tmp_path / "again")])
    assert again["losses"] == losses[:5]  # same seed, same data, init and batches (warmup lr is the same)
