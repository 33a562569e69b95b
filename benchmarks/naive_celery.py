"""The baseline people write by hand: one Celery task per prompt, batch 1, a row per task.

Started by benchmarks/text_throughput.py as ``celery -A benchmarks.naive_celery worker``.
"""

from __future__ import annotations

import functools
import os
import sqlite3

from celery import Celery

app = Celery("naive", broker=os.environ["NAIVE_BROKER_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], worker_prefetch_multiplier=1,
                task_acks_late=True, task_ignore_result=True)


@functools.cache
def model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.environ["NAIVE_MODEL"]
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


@app.task(name="naive.generate")
def generate(custom_id: str, prompt: str, max_new_tokens: int) -> None:
    import torch

    tokenizer, lm = model()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:]
    with sqlite3.connect(os.environ["NAIVE_DB"], timeout=60) as db:
        db.execute("CREATE TABLE IF NOT EXISTS results (custom_id TEXT, text TEXT, tokens INT)")
        db.execute("INSERT INTO results VALUES (?, ?, ?)",
                   (custom_id, tokenizer.decode(new, skip_special_tokens=True), len(new)))
