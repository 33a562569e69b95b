"""Text throughput of the whole system against bare ``model.generate``, side by side.

Everything runs in one invocation on the same random-initialised model (real GPT-2
architecture and tokenizer; speed does not depend on the weights) and prints one JSON object:

- ``text_e2e_over_bare``: tokens/s of a job through submit → Redis → worker → rows committed,
  over bare batched ``model.generate`` on the same prompts, batch size and model.
- ``batched_over_naive``: the system over a naive Celery task per prompt at batch 1.
- ``bucketed_over_unbucketed``: length-bucketed batches over submission-order batches, on
  prompts of 8 to 256 tokens (in process, the LM alone).
- ``two_workers_over_one``: two worker processes of one thread each over one.

Usage: ``python benchmarks/text_throughput.py [--size distil] [--items 512] [--new-tokens 32] [--batch 32]``
(``--size tiny --items 128`` for a quick run; ``--model smollm2-135m-instruct`` or a model
directory runs a real model instead of a random one). Needs Redis on 127.0.0.1:6379.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import redis  # noqa: E402
import torch  # noqa: E402
from celery import Celery  # noqa: E402

from aigc import api  # noqa: E402
from aigc.schemas.settings import Settings  # noqa: E402
from aigc.schemas.specs import GenerationParams  # noqa: E402
from tiny_models import build_tiny_gpt2  # noqa: E402
from aigc.workers.lm import CausalLM, TextRequest, resolve_model  # noqa: E402

BROKER = "redis://127.0.0.1:6379/10"
SIZES = {  # name: (n_layer, n_embd, n_head)
    "tiny": (2, 128, 2),
    "distil": (6, 768, 12),  # distilgpt2's shape, 82M parameters
    "gpt2": (12, 768, 12),  # GPT-2 small, 124M
    "1b": (22, 2048, 16),  # about 1.2B: for GPUs
}
BATCH = 32


def prompts(n: int) -> list[str]:
    return [f"Write a short article about topic number {i} for our readers." for i in range(n)]


def mixed_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(["word"] * rng.randint(8, 256)) for _ in range(n)]


def bare_tokens_per_s(lm: CausalLM, texts: list[str], new_tokens: int) -> float:
    """A tight loop of batched ``model.generate``: what a user would write themselves."""
    tokenizer, model = lm.tokenizer, lm.model
    started, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), BATCH):
        batch = tokenizer(texts[i:i + BATCH], return_tensors="pt", padding=True).to(lm.device)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=lm.pad_id)
        new = out[:, batch["input_ids"].shape[1]:]
        tokens += int((new != lm.pad_id).sum())
    return tokens / (time.perf_counter() - started)


def lm_tokens_per_s(lm: CausalLM, texts: list[str], new_tokens: int, bucketing: bool) -> float:
    params = GenerationParams(max_new_tokens=new_tokens)
    requests = [TextRequest(i, t, params, 0) for i, t in enumerate(texts)]
    started = time.perf_counter()
    tokens = sum(o.output_tokens for batch in lm.generate(requests, max_rows=BATCH, max_tokens=10**9,
                                                          bucketing=bucketing) for o in batch)
    return tokens / (time.perf_counter() - started)


def start_workers(settings: Settings, count: int, threads: int, log_dir: Path) -> list[subprocess.Popen]:
    env = os.environ | settings.to_env()
    env["AIGC_TORCH_THREADS"] = str(threads)
    procs = [subprocess.Popen([sys.executable, "-m", "aigc.workers", "--devices", "cpu", "--hostname",
                               f"bench{i}@%h"], env=env, cwd=REPO,
                              stdout=open(log_dir / f"worker{i}.log", "wb"), stderr=subprocess.STDOUT)
             for i in range(count)]
    app = Celery(set_as_current=False, broker=settings.broker_url)
    deadline = time.monotonic() + 180
    while len(app.control.ping(timeout=1)) < count:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"workers did not start; see {log_dir}")
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(60)


def system_tokens_per_s(settings: Settings, texts: list[str], new_tokens: int) -> float:
    items = [{"custom_id": f"c{i}", "prompt": t} for i, t in enumerate(texts)]
    warm = api.submit("article", items[:BATCH], params={"max_new_tokens": 2}, settings=settings)
    api.wait(warm, timeout=600, poll=0.05, settings=settings)
    started = time.perf_counter()
    job_id = api.submit("article", items, params={"max_new_tokens": new_tokens}, settings=settings)
    job = api.wait(job_id, timeout=3600, poll=0.05, settings=settings)
    seconds = time.perf_counter() - started
    assert job.status == "completed", job.status
    return sum(r["output_tokens"] for r in api.results(job_id, settings=settings)) / seconds


def naive_tokens_per_s(model_dir: Path, texts: list[str], new_tokens: int, folder: Path) -> float:
    db = folder / "naive.db"
    env = os.environ | {"NAIVE_BROKER_URL": BROKER, "NAIVE_MODEL": str(model_dir), "NAIVE_DB": str(db)}
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "benchmarks.naive_celery", "worker",
                               "--pool=solo", "-Q", "naive", "--hostname", "naive@%h"], env=env, cwd=REPO,
                              stdout=open(folder / "naive.log", "wb"), stderr=subprocess.STDOUT)
    app = Celery(set_as_current=False, broker=BROKER)
    try:
        while not app.control.ping(destination=[f"naive@{os.uname().nodename}"], timeout=1):
            if worker.poll() is not None:
                raise RuntimeError("naive worker died; see naive.log")
        app.send_task("naive.generate", args=["warm", "warm up", 2], queue="naive")
        while not db.exists():
            time.sleep(0.05)
        started = time.perf_counter()
        for i, text in enumerate(texts):
            app.send_task("naive.generate", args=[f"c{i}", text, new_tokens], queue="naive")
        while True:
            with sqlite3.connect(db, timeout=60) as conn:
                done, tokens = conn.execute("SELECT count(*), coalesce(sum(tokens), 0) FROM results "
                                            "WHERE custom_id != 'warm'").fetchone()
            if done == len(texts):
                return tokens / (time.perf_counter() - started)
            time.sleep(0.05)
    finally:
        stop([worker])


def main() -> None:
    global BATCH
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=SIZES, default="distil")
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--naive-items", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=BATCH, help="rows per forward pass, system and bare")
    parser.add_argument("--model", help="a real model (a name aigc resolves, or a directory) "
                        "instead of a random one of --size")
    args = parser.parse_args()
    BATCH = args.batch
    redis.Redis.from_url(BROKER).flushdb()
    n_layer, n_embd, n_head = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir = Path(resolve_model(args.model)) if args.model else build_tiny_gpt2(
            folder / "model", n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024)
        texts = prompts(args.items)
        lm = CausalLM(str(model_dir))
        bare = bare_tokens_per_s(lm, texts, args.new_tokens)
        mixed = mixed_prompts(max(64, args.items // 2))
        unbucketed = lm_tokens_per_s(lm, mixed, args.new_tokens, bucketing=False)
        bucketed = lm_tokens_per_s(lm, mixed, args.new_tokens, bucketing=True)
        del lm
        settings = Settings(broker_url=BROKER, database_url=f"sqlite:///{folder}/aigc.db",
                            text_model=str(model_dir), chunk_size=max(64, 2 * BATCH), max_batch_rows=BATCH,
                            max_batch_tokens=10**9, data_dir=folder)
        procs = start_workers(settings, 1, 0, folder)
        try:
            system = system_tokens_per_s(settings, texts, args.new_tokens)
        finally:
            stop(procs)
        half = texts[: max(128, args.items // 2)]
        scale = {}
        for count in (1, 2):
            procs = start_workers(settings, count, 1, folder)
            try:
                scale[count] = system_tokens_per_s(settings, half, args.new_tokens)
            finally:
                stop(procs)
        naive = naive_tokens_per_s(model_dir, texts[: args.naive_items], args.new_tokens, folder)
    report = {
        "benchmark": "text_throughput", "device": "cpu", "torch_threads": torch.get_num_threads(),
        "model": args.model or f"random GPT-2 {args.size} {SIZES[args.size]}", "items": args.items,
        "new_tokens": args.new_tokens, "batch": BATCH,
        "tokens_per_s": {"bare_generate": round(bare, 1), "system": round(system, 1),
                         "naive_celery_batch1": round(naive, 1), "lm_bucketed": round(bucketed, 1),
                         "lm_unbucketed": round(unbucketed, 1), "system_1_worker_1_thread": round(scale[1], 1),
                         "system_2_workers_1_thread": round(scale[2], 1)},
        "text_e2e_over_bare": round(system / bare, 3),
        "batched_over_naive": round(system / naive, 2),
        "bucketed_over_unbucketed": round(bucketed / unbucketed, 2),
        "two_workers_over_one": round(scale[2] / scale[1], 2),
        "targets": {"text_e2e_over_bare": 0.95, "batched_over_naive": 9, "bucketed_over_unbucketed": 1.3,
                    "two_workers_over_one": 1.8},
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
