"""Train the small default text model shipped in workers/models/text-small.

No pretrained causal LM ships in an installable package, so the project trains
its own: a few-million-parameter GPT-2 (transformers ``GPT2LMHeadModel``) with a
byte-level BPE tokenizer trained here too, on English prose that ships with
Python itself (PSF licence): ``pydoc_data.topics`` and the docstrings of the
standard-library sources, read with ``ast`` (nothing is imported or downloaded).

    python scripts/train_text_model.py --out workers/models/text-small

The data helpers (``load_documents``, ``split_documents``) and ``evaluate``
(held-out and unigram perplexity, in-vocabulary fraction of generated words)
are imported by benchmarks/text_model_quality.py and the tests.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import re
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

EOS = "<|endoftext|>"
EVAL_PROMPTS = [  # the first three are the model card's samples
    "Write an article about gardening.\n\nTitle:",
    "Write an ad for a new coffee shop.\n\n",
    "The history of the city",
    "Here are five tips for better sleep:",
    "Product description: a waterproof backpack",
    "In this post we explain",
]
GREEDY = {"do_sample": False, "repetition_penalty": 1.3}  # the model card's samples
WORD_RE = re.compile(r"[A-Za-z]+")


@dataclass
class TrainConfig:
    out: str = "workers/models/text-small"  # output directory (save_pretrained layout)
    seed: int = 1337  # seeds the split, init, batch order and the sample generations
    heldout_frac: float = 0.05  # fraction of documents held out for evaluation
    max_chars: int = 0  # stop reading the corpus after this many characters (0: all)
    vocab_size: int = 8192  # byte-level BPE vocabulary, including <|endoftext|>
    n_layer: int = 4  # transformer blocks
    n_embd: int = 256  # hidden size
    n_head: int = 4  # attention heads
    n_ctx: int = 256  # context length in tokens
    batch_size: int = 16  # sequences per optimizer step
    max_steps: int = 800  # optimizer steps (the cosine schedule spans these)
    max_minutes: float = 0.0  # stop early after this much training time (0: no limit)
    lr: float = 2e-3  # peak AdamW learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay on matrices
    dropout: float = 0.1  # dropout in embeddings, attention and MLP
    log_every: int = 50  # print the loss every this many steps
    eval_every: int = 200  # log held-out loss every this many steps (0: only at the end)
    fp16: bool = True  # store weights as float16 (they load as float32)
    threads: int = 2  # torch CPU threads


def raw_texts():
    """Yield the pydoc topics, then every module/class/function docstring of the stdlib sources."""
    from pydoc_data.topics import topics

    yield from (topics[k] for k in sorted(topics))
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or {"test", "tests", "idle_test"} & set(parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield ast.get_docstring(node) or ""


def load_documents(max_chars: int = 0) -> list[str]:
    """Return the corpus as a list of documents, in a fixed order.

    Doctest paragraphs and grammar productions are dropped so that what is
    left is mostly prose; short and duplicate documents are skipped.
    ``max_chars`` stops reading once that many characters are collected.
    """
    docs, seen, total = [], set(), 0
    for text in raw_texts():
        paragraphs = [p for p in text.split("\n\n") if ">>>" not in p and "::=" not in p]
        text = "\n\n".join(paragraphs).strip()
        if len(text) < 40 or text in seen:
            continue
        seen.add(text)
        docs.append(text)
        total += len(text)
        if max_chars and total >= max_chars:
            break
    return docs


def split_documents(docs: list[str], heldout_frac: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle documents with ``seed`` and return (train, heldout)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(len(docs) * heldout_frac))
    heldout = sorted(order[:n_heldout])
    train = sorted(order[n_heldout:])
    return [docs[i] for i in train], [docs[i] for i in heldout]


def train_tokenizer(docs: list[str], vocab_size: int):
    """Train a GPT-2-style byte-level BPE on ``docs``; return a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(docs, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GPT2Tokenizer(
        vocab=model["vocab"], merges=merges, pad_token=EOS, clean_up_tokenization_spaces=False
    )


def encode_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """Tokenize ``docs`` into one stream, each document followed by <|endoftext|>."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for ids_doc in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(ids_doc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def heldout_perplexity(model, ids: torch.Tensor, n_ctx: int, batch_size: int = 16) -> float:
    """Perplexity over ``ids[1:]``, read in non-overlapping windows of ``n_ctx`` targets."""
    model.eval()
    full = ids[: len(ids) - 1 - (len(ids) - 1) % n_ctx + 1].unfold(0, n_ctx + 1, n_ctx)  # windows overlap by 1
    batches = list(full.split(batch_size)) + ([ids[len(full) * n_ctx :][None]] if (len(ids) - 1) % n_ctx else [])
    nll = 0.0
    for batch in batches:
        logits = model(batch[:, :-1], attention_mask=torch.ones_like(batch[:, :-1])).logits.float()
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
    return math.exp(nll / (len(ids) - 1))


def unigram_perplexity(train_ids: torch.Tensor, heldout_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity over ``heldout_ids[1:]`` of an add-one-smoothed unigram fitted on ``train_ids``."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-logp[heldout_ids[1:]].mean().item())


def training_words(docs: list[str]) -> set[str]:
    """Lower-cased words (runs of ASCII letters) occurring in ``docs``."""
    return {w.lower() for d in docs for w in WORD_RE.findall(d)}


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], seed: int, max_new_tokens: int = 80, **kwargs) -> list[str]:
    """Continue each prompt (generation_config updated by ``kwargs``); prompt i is seeded with seed + i."""
    model.eval()
    out = []
    for i, prompt in enumerate(prompts):
        torch.manual_seed(seed + i)
        enc = tokenizer(prompt, return_tensors="pt")
        room = model.config.n_positions - enc["input_ids"].shape[1]  # positions past n_positions do not exist
        gen = model.generate(**enc, max_new_tokens=min(max_new_tokens, room), **kwargs)
        out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def vocab_fraction(texts: list[str], vocab: set[str]) -> float:
    """Fraction of the words in ``texts`` that are in ``vocab`` (lower-cased)."""
    words = [w.lower() for t in texts for w in WORD_RE.findall(t)]
    return sum(w in vocab for w in words) / max(1, len(words))


def evaluate(model, tokenizer, train_docs: list[str], heldout_docs: list[str], n_ctx: int, seed: int) -> dict:
    """Held-out perplexity vs an add-one unigram, bits per character, and the fraction of words generated
    from EVAL_PROMPTS (greedy, and sampled with generation_config) that occur in the training split."""
    train_ids = encode_documents(tokenizer, train_docs)
    heldout_ids = encode_documents(tokenizer, heldout_docs)
    ppl = heldout_perplexity(model, heldout_ids, n_ctx)
    greedy = generate_samples(model, tokenizer, EVAL_PROMPTS, seed, **GREEDY)
    sampled = generate_samples(model, tokenizer, EVAL_PROMPTS, seed)
    words = training_words(train_docs)
    return {
        "heldout_tokens": len(heldout_ids),
        "heldout_ppl": ppl,
        "unigram_ppl": unigram_perplexity(train_ids, heldout_ids, len(tokenizer)),
        # targets are every held-out token but the first; each <|endoftext|> counts as one character
        "bits_per_char": math.log2(ppl) * (len(heldout_ids) - 1) / sum(len(d) + 1 for d in heldout_docs),
        "vocab_fraction_greedy": vocab_fraction(greedy, words),
        "vocab_fraction_sampled": vocab_fraction(sampled, words),
        "samples": greedy,
        "sampled": sampled,
    }


def generation_config(eos_id: int):
    """Defaults for generate(): sampling, since the service asks for varied texts."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=0.8, top_k=50, repetition_penalty=1.2, max_new_tokens=128,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay from ``lr`` to ``min_lr`` over ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def write_model_card(out: Path, cfg: TrainConfig, report: dict) -> None:
    """Write README.md describing data, licence, size, training and quality figures."""
    samples = "\n\n".join(
        f"**Prompt** `{json.dumps(p)}`\n\n```text\n{p}{s}\n```" for p, s in zip(EVAL_PROMPTS[:3], report["samples"])
    )
    out.joinpath("README.md").write_text(f"""# text-small: the default offline text model

A small GPT-2 (`GPT2LMHeadModel`) trained from scratch by `scripts/train_text_model.py`, so
that aigc produces English text with nothing downloaded. It writes plausible-looking English
words and phrases in the style of Python's documentation; it does not follow instructions and
is not a good language model. Use a real model for real work.

## Data and licence

Prose that ships with Python {report["python"]} itself: the `pydoc_data.topics` pages and the
module, class and function docstrings of the standard-library sources (tests excluded; doctest
paragraphs and grammar productions dropped; duplicates removed), read with `ast`.
{report["documents"]} documents, {report["chars"]:,} characters; {cfg.heldout_frac:.0%} of the documents (seeded
shuffle, seed {cfg.seed}) are held out. This text is (c) the Python Software Foundation, under the
PSF License Agreement (Python Software Foundation License Version 2), which permits
redistribution of derived works; the weights are a derivative of it.

## Model

- Architecture: GPT-2, {cfg.n_layer} layers, {cfg.n_embd} hidden, {cfg.n_head} heads, context {cfg.n_ctx}; tied embeddings
- Parameters: {report["parameters"]:,}
- Tokenizer: byte-level BPE, {cfg.vocab_size} tokens (trained on the training split), `<|endoftext|>` is eos, bos, unk and pad
- Weights: {"float16 on disk, loaded as float32 (`dtype` in config.json)" if cfg.fp16 else "float32"}; folder size {report["size_mb"]:.1f} MB
- Training: {report["steps"]} steps of {cfg.batch_size} x {cfg.n_ctx} tokens ({report["train_tokens"]:,} training tokens,
  {report["epochs"]:.1f} epochs), AdamW, peak lr {cfg.lr}, cosine decay, dropout {cfg.dropout};
  {report["train_minutes"]:.1f} minutes on {cfg.threads} CPU threads (held-out checks included); seed {cfg.seed}

## Quality (held-out split, `benchmarks/text_model_quality.py`)

| figure | value |
|---|---|
| held-out perplexity (per token) | {report["heldout_ppl"]:.2f} |
| unigram baseline perplexity (add-one, same tokens) | {report["unigram_ppl"]:.2f} |
| held-out bits per character | {report["bits_per_char"]:.3f} |
| generated words found in the training text, greedy ({len(EVAL_PROMPTS)} prompts) | {report["vocab_fraction_greedy"]:.1%} |
| generated words found in the training text, sampled ({len(EVAL_PROMPTS)} prompts) | {report["vocab_fraction_sampled"]:.1%} |

## Samples

Greedy decoding with `repetition_penalty=1.3`, at most 80 new tokens. (`generation_config.json` samples
instead: temperature 0.8, top-k 50, repetition penalty 1.2; `train_log.json` has such samples too.)

{samples}

## Reproduce

```
{report["command"]}
python benchmarks/text_model_quality.py {cfg.out}  # recomputes the quality figures
```

The run is seeded (split, tokenizer, initialisation, batches); tests/test_text_model.py checks that a
tiny configuration repeats its losses exactly. The corpus is read from the running Python's
standard library, so another Python version gives a different corpus and split.
""")


def train(cfg: TrainConfig, command: str) -> dict:
    """Train the tokenizer and model, save both to ``cfg.out``; return the training part of the report."""
    from transformers import GPT2Config, GPT2LMHeadModel

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = load_documents(cfg.max_chars)
    train_docs, heldout_docs = split_documents(docs, cfg.heldout_frac, cfg.seed)  # benchmarks repeat this
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
    train_ids = encode_documents(tokenizer, train_docs)
    heldout_ids = encode_documents(tokenizer, heldout_docs)
    print(f"{len(docs)} docs, {len(train_ids):,} train / {len(heldout_ids):,} held-out tokens", flush=True)

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, heldout_losses, t0 = [], {}, time.time()
    model.train()
    for step in range(cfg.max_steps):
        if cfg.max_minutes and time.time() - t0 > cfg.max_minutes * 60:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        starts = torch.randint(0, len(train_ids) - cfg.n_ctx, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + cfg.n_ctx] for s in starts])
        loss = model(batch, attention_mask=torch.ones_like(batch), labels=batch).loss  # shifts labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))
        if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
            print(f"step {step} loss {loss.item():.3f} lr {lr_at(step, cfg):.2e} {time.time() - t0:.0f}s", flush=True)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            heldout_losses[step + 1] = round(math.log(heldout_perplexity(model, heldout_ids, cfg.n_ctx)), 4)
            print(f"step {step + 1} held-out loss {heldout_losses[step + 1]:.3f}", flush=True)
            model.train()
    train_minutes = (time.time() - t0) / 60

    if cfg.fp16:
        model.half()  # halves the file; config.json still says float32 (below), so it loads as float32
    model.generation_config = generation_config(tokenizer.eos_token_id)
    model.save_pretrained(out)
    config_file = out / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "dtype": "float32"}, indent=2) + "\n")
    (out / "model.safetensors").chmod(0o644)
    tokenizer.model_max_length = cfg.n_ctx
    tokenizer.save_pretrained(out)
    out.joinpath("training_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return {
        "python": sys.version.split()[0], "documents": len(docs), "chars": sum(map(len, docs)),
        "parameters": sum(p.numel() for p in model.parameters()), "steps": len(losses),
        "train_tokens": len(train_ids), "epochs": len(losses) * cfg.batch_size * cfg.n_ctx / len(train_ids),
        "train_minutes": train_minutes, "command": command, "losses": losses, "heldout_losses": heldout_losses,
    }


def finish(cfg: TrainConfig, report: dict) -> dict:
    """Evaluate the model saved in ``cfg.out`` as it ships; write README.md and train_log.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cfg.out)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    train_docs, heldout_docs = split_documents(load_documents(cfg.max_chars), cfg.heldout_frac, cfg.seed)
    report = {**report, **evaluate(model, tokenizer, train_docs, heldout_docs, cfg.n_ctx, cfg.seed), "size_mb": 0.0}
    for _ in range(2):  # the second pass puts the final folder size (card included) in the card
        write_model_card(out, cfg, report)
        out.joinpath("train_log.json").write_text(json.dumps(report) + "\n")
        report["size_mb"] = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    return report


def main(argv: list[str] | None = None) -> dict:
    """Train, save and evaluate; return the report (also written to train_log.json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(TrainConfig):
        if f.type == "bool":
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--card-only", action="store_true",
                        help="re-evaluate the model already in --out and rewrite its card (and generation_config.json)")
    args = vars(parser.parse_args(argv))
    card_only = args.pop("card_only")
    cfg = TrainConfig(**args)
    torch.set_num_threads(cfg.threads)
    if card_only:
        out = Path(cfg.out)
        cfg = TrainConfig(**{**json.loads((out / "training_config.json").read_text()), "out": cfg.out})
        keys = "python documents chars parameters steps train_tokens epochs train_minutes command losses heldout_losses"
        report = {k: v for k, v in json.loads((out / "train_log.json").read_text()).items() if k in keys.split()}
        eos_id = json.loads((out / "config.json").read_text())["eos_token_id"]
        generation_config(eos_id).save_pretrained(out)
    else:
        command = "python scripts/train_text_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
        report = train(cfg, command)
    report = finish(cfg, report)
    print(json.dumps({k: v for k, v in report.items() if k != "losses"}, indent=2))
    return report


if __name__ == "__main__":
    main()
